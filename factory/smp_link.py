"""One serial session with a board's SMP console: exclusive port, timeouts from the line, bounded retries.

The framing is `smp.packet`'s (through `board.protocol.frame_lines` for requests, `smp.packet.decode` for
answers), the message format `board.protocol`'s; this module adds only what a real line needs:

- The port is opened exclusively (pyserial's advisory flock), so two stations never interleave requests
  on one board, and it is closed on every way out.
- Each request waits for as long as its bytes and its answer's take on the wire at the port's baud rate,
  plus a fixed allowance for the board's own work: a slow line must not look like a dead one, and a dead
  line must not hang a station.
- Every attempt carries a new SMP sequence number, and `board.protocol.decode_answer` refuses an answer to
  another one, so a late answer to an earlier attempt is never taken for this one. Writes are idempotent on
  the board (docs/design.md §5), so resending a request whose answer was lost is safe.
- A request read back from the line is skipped: a half-duplex RS-485 adapter or a console in echo mode
  hands the station its own bytes before the board's answer.
- A frame that arrives broken (CRC16, base64, length) during the wait is almost surely the answer, damaged
  by the line: the request is resent at once rather than after the timeout.
"""

from __future__ import annotations

import binascii
import errno
import struct
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Final

import serial
from smp import packet as smp_packet
from smp.exceptions import SMPDecodeError

from board import protocol as wire

from .errors import BoardProtocolError, BoardRefusedError, LineError, PortBusyError, PortError, PortGoneError

BOARD_ALLOWANCE_S: Final = 0.5
"""The board's own time per request (parsing, an fsync'd commit) on top of the wire time."""
WIRE_MARGIN: Final = 1.5
"""Line time is multiplied by this: UART FIFOs, USB adapters and the scheduler add latency."""
DEFAULT_RETRIES: Final = 8
"""Attempts per request beyond the first; at a byte error rate of 1e-3 a 600-byte exchange fails about
one time in two, so eight retries leave about one chance in 500 of giving up on a healthy board."""
READ_SLICE_S: Final = 0.02


def exchange_seconds(request_size: int, answer_size: int, baud: int) -> float:
    """How long one request may take: both messages' wire bytes at 10 bits a byte (8N1), with margin,
    plus the board's allowance."""
    wire_bytes = wire.wire_size(request_size) + wire.wire_size(answer_size)
    return BOARD_ALLOWANCE_S + WIRE_MARGIN * wire_bytes * 10 / baud


class FrameReader:
    """Reassembles SMP serial frames from arbitrary byte pieces (pure: no I/O).

    Lines that are neither a start nor a continuation of a frame in progress are skipped (console noise,
    a boot banner); a frame that fails to decode is counted in `broken` and dropped."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._decoder: Generator[Any, bytes, bytes] | None = None
        self.broken = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The SMP messages completed by `data`."""
        self._pending += data
        messages: list[bytes] = []
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[: end + 1])
            del self._pending[: end + 1]
            message = self._take_line(line)
            if message is not None:
                messages.append(message)
        if len(self._pending) > 4 * wire.MAX_LINE_LENGTH:  # a lost newline: no line is that long
            del self._pending[:]
            self._abandon()
        return messages

    def _take_line(self, line: bytes) -> bytes | None:
        start = line.rfind(smp_packet.START_DELIMITER)
        if start >= 0:
            self._abandon()
            self._decoder = smp_packet.decode()
            next(self._decoder)
            line = line[start:]
        elif self._decoder is None or not line.startswith(smp_packet.CONTINUE_DELIMITER):
            self._abandon()
            return None
        assert self._decoder is not None
        try:
            self._decoder.send(line)
        except StopIteration as done:
            self._decoder = None
            return bytes(done.value)
        except (SMPDecodeError, binascii.Error, struct.error, ValueError):
            self._decoder = None
            self.broken += 1
        return None

    def _abandon(self) -> None:
        if self._decoder is not None:
            self._decoder = None
            self.broken += 1


@dataclass
class LinkStats:
    """What crossed the line, for the benchmark's wire-time figure and for logs."""

    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0
    retries: int = 0


@dataclass
class SmpLink:
    """An open serial session with one board. Use `open` and close it (it is a context manager)."""

    connection: serial.Serial
    path: str
    baud: int
    retries: int = DEFAULT_RETRIES
    stats: LinkStats = field(default_factory=LinkStats)
    _sequence: int = 0
    _reader: FrameReader = field(default_factory=FrameReader)

    @classmethod
    def open(cls, path: str, baud: int, retries: int = DEFAULT_RETRIES) -> SmpLink:
        try:
            connection = serial.Serial(
                port=path,
                baudrate=baud,
                timeout=READ_SLICE_S,
                write_timeout=exchange_seconds(wire.MAX_MESSAGE_SIZE, 0, baud),
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as error:
            raise _open_error(path, error) from None
        try:
            connection.reset_input_buffer()  # whatever the board said before this session is not an answer
        except (serial.SerialException, OSError) as error:
            connection.close()
            raise PortGoneError(f"{path} failed right after opening: {error}") from None
        return cls(connection, path, baud, retries)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> SmpLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, command: wire.Command, body: bytes, answer_size: int = 512) -> bytes:
        """The CBOR body of the board's successful answer to `command`; a refusal raises
        `BoardRefusedError`, no valid answer within the retries `LineError`."""
        self.stats.requests += 1
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            self._sequence = (self._sequence + 1) & 0xFF
            message = wire.encode_request(command, self._sequence, body)
            self._send(b"".join(wire.frame_lines(message)))
            answer = self._await(
                command, self._sequence, exchange_seconds(len(message), answer_size, self.baud)
            )
            if answer is None:
                continue
            if isinstance(answer, wire.ErrorReply):
                raise BoardRefusedError(command.name, answer)
            return answer
        raise LineError(
            f"no valid answer to {command.name} from {self.path} after {self.retries + 1} attempts",
            field=command.name,
        )

    def _send(self, data: bytes) -> None:
        try:
            self.connection.write(data)
            self.connection.flush()
        except serial.SerialTimeoutException:
            raise LineError(f"{self.path} did not take a request within its write timeout") from None
        except (serial.SerialException, OSError) as error:
            raise PortGoneError(f"writing {self.path} failed: {error}") from None
        self.stats.bytes_sent += len(data)

    def _await(self, command: wire.Command, sequence: int, timeout: float) -> bytes | wire.ErrorReply | None:
        """The answer to `sequence`, or None when the wait ended (timeout, or a broken frame)."""
        deadline = time.monotonic() + timeout
        broken_before = self._reader.broken
        while time.monotonic() < deadline:
            data = self._read()
            for message in self._reader.feed(data):
                try:
                    return wire.decode_answer(command, sequence, message)
                except wire.ProtocolError as error:
                    if _not_an_answer_to(message, sequence):
                        continue  # a late answer to an earlier attempt, or our request echoed
                    raise BoardProtocolError(f"{command.name}: {error}") from None
            if self._reader.broken > broken_before:
                return None
        return None

    def _read(self) -> bytes:
        try:
            first = self.connection.read(1)
            if not first:
                return b""
            waiting = self.connection.in_waiting
            data = bytes(first) + (bytes(self.connection.read(waiting)) if waiting else b"")
        except (serial.SerialException, OSError) as error:
            raise PortGoneError(f"reading {self.path} failed: {error}") from None
        self.stats.bytes_received += len(data)
        return data


def _not_an_answer_to(message: bytes, sequence: int) -> bool:
    """Whether a message that is not the answer to `sequence` is to be skipped rather than refused.

    A request (op READ or WRITE) is never a board's answer: it is the station's own request handed back
    by the line, as half-duplex RS-485 adapters and consoles in echo mode do, with a valid CRC16 and the
    same sequence. Refusing it would fail every request on such a line; only a response that answers
    this sequence wrongly is the board's fault."""
    try:
        header, _ = wire.decode_message(message)
    except wire.ProtocolError:
        return True  # a damaged message that CRC16 let through: treat it as noise, the retry decides
    return header.op in (wire.Op.READ, wire.Op.WRITE) or header.sequence != sequence


def _open_error(path: str, error: Exception) -> PortError:
    number = getattr(error, "errno", None)
    text = str(error)
    if number in (errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in text:
        return PortBusyError(f"{path} is in use (another station holds it)")
    if number in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return PortGoneError(f"{path} does not exist")
    return PortError(f"cannot open {path}: {text}")

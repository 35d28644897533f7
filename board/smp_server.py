"""The board's side of SMP over serial: bytes in, frames out, requests dispatched, answers framed.

A serial line delivers noise, cut frames and garbage as readily as requests, and the console must keep
serving through all of it. `FrameReassembler` turns an arbitrary byte stream into whole SMP messages and
reports every broken frame as a value (never an exception): it finds start lines (``06 09``), takes
continuation lines (``04 14``) up to `MAX_LINE_LENGTH` bytes of base64, skips garbage between frames,
drops a frame with a bad line or CRC, and refuses a frame larger than the buffer before storing it, so
memory stays bounded whatever arrives. The base64 and CRC16 work is `smp.packet.decode`'s.

`SmpServer` feeds it, answers each message through a routing table of handlers (one per group and
command), and turns every failure of a request into an SMP error answer rather than a dead console.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import struct
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Final

from smp import header as smp_header
from smp import packet as smp_packet
from smp.exceptions import SMPBadCRC, SMPDecodeError

from .errors import BoardError
from .protocol import (
    BUFFER_SIZE,
    MAX_LINE_LENGTH,
    MAX_MESSAGE_SIZE,
    BodyLengthError,
    ErrorReply,
    GenericRc,
    Op,
    ProtocolError,
    SmpVersion,
    UnknownCommandError,
    decode_message,
    encode_body,
    encode_response,
    frame_lines,
)

logger = logging.getLogger(__name__)

_START: Final = smp_packet.START_DELIMITER
_CONTINUE: Final = smp_packet.CONTINUE_DELIMITER
_NEWLINE: Final = smp_packet.END_DELIMITER[0]
_DELIMITER: Final = smp_packet.DELIMITER_SIZE
_LENGTH_SIZE: Final = smp_packet.FRAME_LENGTH_STRUCT.size
_CRC_SIZE: Final = smp_packet.CRC16_STRUCT.size
_BASE64_RUN: Final = re.compile(rb"[A-Za-z0-9+/=]*")
_REQUEST_OPS: Final = (Op.READ, Op.WRITE)


# --- framing errors and events ------------------------------------------------------------------------


class FrameError(BoardError):
    """A frame that could not be received; it is dropped and the reassembler carries on."""

    field = "frame"


class BrokenLineError(FrameError):
    """A line with a byte outside base64, no newline within `MAX_LINE_LENGTH`, or a gap in a frame."""


class BadFrameError(FrameError):
    """A frame whose base64 or length does not decode."""


class BadCrcError(FrameError):
    """A frame whose CRC16 does not match: corrupted on the line."""


class InterruptedFrameError(FrameError):
    """A frame cut short by the start of the next one (the rest was lost on the line)."""


class OversizedFrameError(FrameError):
    """A frame announcing more than the buffer holds. `header` is the request's SMP header when the
    first line carries one that is consistent with the announced size, so the sender can be told."""

    def __init__(self, message: str, header: smp_header.Header | None) -> None:
        super().__init__(message)
        self.header = header


@dataclass(frozen=True)
class Received:
    """A whole SMP message (header and body) whose CRC matched."""

    message: bytes


@dataclass(frozen=True)
class Dropped:
    """A frame given up; `error` says why."""

    error: FrameError


FrameEvent = Received | Dropped


# --- reassembly ---------------------------------------------------------------------------------------


class FrameReassembler:
    """Arbitrary bytes in, `FrameEvent`s out; `feed` never raises for anything the line delivers."""

    def __init__(self, buffer_size: int = BUFFER_SIZE, max_line_length: int = MAX_LINE_LENGTH) -> None:
        self.buffer_size = buffer_size
        self.max_line_length = max_line_length
        self._pending = bytearray()
        self._decoder: Generator[None, bytes, bytes] | None = None
        self.garbage_bytes = 0  # skipped between frames; for diagnostics and tests

    def feed(self, data: bytes) -> list[FrameEvent]:
        self._pending += data
        events: list[FrameEvent] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[FrameEvent]) -> bool:
        """Consume one line or one run of garbage; False when more bytes are needed."""
        if self._decoder is None and not self._skip_to_start():
            return False
        if len(self._pending) < _DELIMITER:
            return False
        delimiter = bytes(self._pending[:_DELIMITER])
        if delimiter not in (_START, _CONTINUE):
            # inside a frame, anything but a line is a gap: the frame is lost
            self._give_up(events, BrokenLineError("bytes between the lines of a frame"))
            return True
        before = len(self._pending)
        line = self._take_line(events)
        if line is None:
            return len(self._pending) != before  # a broken line was dropped, or more bytes are needed
        if delimiter == _START:
            if self._decoder is not None:
                self._give_up(events, InterruptedFrameError("a new frame started before this one ended"))
            self._start_frame(line, events)
        else:
            self._send(line, events)
        return True

    def _skip_to_start(self) -> bool:
        """Drop garbage up to the next start delimiter; False if there is none yet."""
        start = self._pending.find(_START)
        if start < 0:
            # keep a trailing 0x06: it may be the first half of a start delimiter
            keep = 1 if self._pending.endswith(_START[:1]) else 0
            self.garbage_bytes += len(self._pending) - keep
            del self._pending[: len(self._pending) - keep]
            return False
        self.garbage_bytes += start
        del self._pending[:start]
        return True

    def _take_line(self, events: list[FrameEvent]) -> bytes | None:
        """The complete line at the front, or None: more bytes needed, or the line was broken (then
        its delimiter is dropped so that a start delimiter inside it is found again)."""
        run = _BASE64_RUN.match(self._pending, _DELIMITER, self.max_line_length)
        end = run.end() if run else _DELIMITER
        if end + 1 > self.max_line_length:
            self._break_line(events, f"no newline within {self.max_line_length} bytes")
            return None
        if end == len(self._pending):
            return None
        if self._pending[end] != _NEWLINE:
            self._break_line(events, f"byte {self._pending[end]:#04x} in a line")
            return None
        line = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        return line

    def _break_line(self, events: list[FrameEvent], reason: str) -> None:
        del self._pending[:_DELIMITER]
        self._give_up(events, BrokenLineError(reason), always=True)

    def _start_frame(self, line: bytes, events: list[FrameEvent]) -> None:
        try:
            first = base64.b64decode(line[_DELIMITER:-1])
            (announced,) = struct.unpack_from("!H", first)
        except (binascii.Error, struct.error, ValueError):
            events.append(Dropped(BadFrameError("the first line does not decode")))
            return
        # the buffer holds the length field, the message and the CRC; `announced` counts the last two
        if announced < smp_header.Header.SIZE + _CRC_SIZE:
            events.append(Dropped(BadFrameError(f"a frame of {announced} bytes cannot hold a header")))
            return
        if _LENGTH_SIZE + announced > self.buffer_size:
            error = OversizedFrameError(
                f"a frame of {announced + _LENGTH_SIZE} bytes exceeds the {self.buffer_size}-byte buffer",
                _header_if_consistent(first, announced),
            )
            events.append(Dropped(error))
            return
        self._decoder = smp_packet.decode()
        next(self._decoder)
        self._send(line, events)

    def _send(self, line: bytes, events: list[FrameEvent]) -> None:
        assert self._decoder is not None
        try:
            self._decoder.send(line)
        except StopIteration as done:
            self._decoder = None
            events.append(Received(bytes(done.value)))
        except SMPBadCRC:
            self._give_up(events, BadCrcError("CRC16 mismatch"))
        except (SMPDecodeError, binascii.Error, struct.error, ValueError) as error:
            self._give_up(events, BadFrameError(f"frame does not decode: {error}"))

    def _give_up(self, events: list[FrameEvent], error: FrameError, *, always: bool = False) -> None:
        """Drop the frame in progress (or, with `always`, report a broken line outside a frame too)."""
        if self._decoder is not None or always:
            events.append(Dropped(error))
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None


def _header_if_consistent(first: bytes, announced: int) -> smp_header.Header | None:
    """The SMP header at the start of an oversized frame, if it agrees with the announced size; the CRC
    is not checked yet, so an answer is only sent when both length fields tell the same story."""
    raw = first[_LENGTH_SIZE : _LENGTH_SIZE + smp_header.Header.SIZE]
    if len(raw) < smp_header.Header.SIZE:
        return None
    try:
        header = smp_header.Header.loads(raw)
    except ValueError:
        return None
    consistent = smp_header.Header.SIZE + header.length + _CRC_SIZE == announced
    return header if consistent and header.op in _REQUEST_OPS else None


# --- dispatch -------------------------------------------------------------------------------------------


class RequestRefusedError(BoardError):
    """Raised by a handler to answer with an SMP error (a group error, or a generic ``rc``)."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.describe())
        self.reply = reply


Handler = Callable[[bytes], bytes]
"""A request body (CBOR) in, a response body (CBOR) out; refusals raise `RequestRefusedError` or
`ProtocolError` (a body that does not follow the schema)."""


@dataclass(frozen=True)
class Route:
    op: Op
    handler: Handler
    after_response: Callable[[], None] | None = None  # e.g. a reset, once the answer is on the wire


@dataclass
class ServerStats:
    """Counters for logs and tests: what arrived and what became of it."""

    requests: int = 0
    errors: int = 0
    dropped_frames: int = 0
    drops_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """What the console writes for one frame event: the framed answer, and what to do once it is out."""

    wire: bytes
    after_response: Callable[[], None] | None = None


class SmpServer:
    """Routes SMP requests to handlers by (group, command) and frames the answers."""

    def __init__(
        self,
        routes: Mapping[tuple[int, int], Route],
        *,
        buffer_size: int = BUFFER_SIZE,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._routes = dict(routes)
        self._reassembler = FrameReassembler(buffer_size)
        self._max_message_size = max_message_size
        self.stats = ServerStats()

    def feed(self, data: bytes) -> list[Reply]:
        """Everything to write in answer to `data` (possibly nothing: a partial or dropped frame)."""
        replies: list[Reply] = []
        for event in self._reassembler.feed(data):
            reply = self._answer(event)
            if reply is not None:
                replies.append(reply)
        return replies

    def _answer(self, event: FrameEvent) -> Reply | None:
        if isinstance(event, Dropped):
            self._count_drop(event.error)
            header = event.error.header if isinstance(event.error, OversizedFrameError) else None
            if header is None:
                return None
            reply = ErrorReply(GenericRc.EMSGSIZE, reason=str(event.error))
            return Reply(self._frame(header, encode_body(reply.to_map(header.version))))
        return self.respond(event.message)

    def _count_drop(self, error: FrameError) -> None:
        self.stats.dropped_frames += 1
        kind = type(error).__name__
        self.stats.drops_by_kind[kind] = self.stats.drops_by_kind.get(kind, 0) + 1
        logger.info("dropped a frame: %s", error)

    def respond(self, message: bytes) -> Reply | None:
        """The answer to one whole SMP message, or None when it cannot be answered (no usable header,
        or it is itself a response: answering those could make two consoles talk forever)."""
        try:
            header, body = decode_message(message)
        except BodyLengthError as error:
            if error.header.op not in _REQUEST_OPS:
                self._count_drop(BadFrameError(f"op {error.header.op.name} is not a request"))
                return None
            return self._error(error.header, ErrorReply(GenericRc.EINVAL, reason=str(error)))
        except UnknownCommandError as unknown:
            return self._not_supported(unknown)
        except ProtocolError as error:
            self._count_drop(BadFrameError(str(error)))
            return None
        if header.op not in _REQUEST_OPS:
            self._count_drop(BadFrameError(f"op {header.op.name} is not a request"))
            return None
        return self._dispatch(header, body)

    def _not_supported(self, unknown: UnknownCommandError) -> Reply | None:
        """``ENOTSUP`` to a request the smp library cannot represent, as Zephyr answers it."""
        if not unknown.is_request:
            self._count_drop(BadFrameError("a response is never answered"))
            return None
        self.stats.requests += 1
        self.stats.errors += 1
        reply = ErrorReply(GenericRc.ENOTSUP, reason="command not supported")
        return Reply(b"".join(frame_lines(unknown.answer(encode_body(reply.to_map(SmpVersion.V2))))))

    def _dispatch(self, header: smp_header.Header, body: bytes) -> Reply:
        self.stats.requests += 1
        group, command = int(header.group_id), int(header.command_id)
        route = self._routes.get((group, command))
        if route is None or route.op != header.op:
            what = "command" if route is None else f"{header.op.name.lower()} of this command"
            reason = f"{what} not supported (group {group}, command {command})"
            return self._error(header, ErrorReply(GenericRc.ENOTSUP, reason=reason))
        answer = self._call(route.handler, body, group, command)
        if isinstance(answer, ErrorReply):
            return self._error(header, answer)
        if len(answer) + smp_header.Header.SIZE > self._max_message_size:
            return self._error(header, ErrorReply(GenericRc.EMSGSIZE, reason="response too large"))
        return Reply(self._frame(header, answer), route.after_response)

    @staticmethod
    def _call(handler: Handler, body: bytes, group: int, command: int) -> bytes | ErrorReply:
        try:
            return handler(body)
        except RequestRefusedError as refused:
            return refused.reply
        except ProtocolError as error:
            return ErrorReply(GenericRc.EINVAL, reason=str(error))
        except Exception as error:  # a handler bug must cost one request, not the console
            logger.exception("request %s/%s failed", group, command)
            return ErrorReply(GenericRc.EUNKNOWN, reason=f"internal error: {error}")

    def _error(self, header: smp_header.Header, reply: ErrorReply) -> Reply:
        self.stats.errors += 1
        logger.info("answering %s/%s with %s", int(header.group_id), int(header.command_id), reply.describe())
        return Reply(self._frame(header, encode_body(reply.to_map(header.version))))

    @staticmethod
    def _frame(header: smp_header.Header, body: bytes) -> bytes:
        return b"".join(frame_lines(encode_response(header, body)))

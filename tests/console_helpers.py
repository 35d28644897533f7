"""Test helpers for the provisioning console: the data a station writes, a small SMP client of our own
(smp.packet framing, cbor2 bodies, pyserial), and consoles served in a thread or a process of their own."""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import json
import os
import select
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import cbor2
import jwt
import serial
from smp import header as smp_header
from smp import packet as smp_packet
from smp.exceptions import SMPDecodeError

from board import console_cli
from board import protocol as wire
from board.console import PtyPort, impaired, serve
from board.interface import Identity
from board.line import LineConditions, Port
from board.simboard import SimBoard
from signing.keys import KeyAlgorithm
from tests.board_helpers import ca_bundle
from tests.forked_process import ForkedDriver
from tests.signing_helpers import signer_for

REPO = Path(__file__).resolve().parent.parent
IAT_EXPIRY = 2_000_000_000


# --- data a station writes ---------------------------------------------------------------------------


def trust_key(index: int = 0) -> bytes:
    """A trust anchor in the DER form MCUboot embeds (small keys: a noisy line prefers short frames)."""
    return signer_for(KeyAlgorithm.ECDSA_P256, index).public_key.der


def boarding_config(client_id: str = "agent-1", *, subject: str | None = None, **content: object) -> bytes:
    token = jwt.encode(
        {"sub": subject or client_id, "exp": IAT_EXPIRY, "jti": f"iat-{client_id}"},
        "a hub secret that is long enough to sign",
        algorithm="HS256",
    )
    fields: dict[str, object] = {
        "baseUrl": "https://hub.example:8443",
        "iat": token,
        "clientCredentialProfile": ["SHARED_SECRET"],
        "clientId": client_id,
        "tenant": "factory",
        **content,
    }
    return json.dumps({"content": fields, "expiration": "2033-05-18T03:33:20.000Z"}).encode()


def boarding(
    client_id: str = "agent-1", network: bytes | None = b'{"proxy": "http://proxy:3128"}'
) -> wire.WriteBoardingRequest:
    return wire.WriteBoardingRequest(boarding_config(client_id), ca_bundle(), network)


def new_board(directory: Path, serial_number: str = "GW-0001") -> Path:
    SimBoard.create(directory, Identity(serial_number, "Acme", "gw-100", "rev B"), slot_size=1 << 20)
    return directory


def keystore_bytes(board_dir: Path) -> bytes:
    return (board_dir / "keystore.json").read_bytes()


# --- a small SMP client: smp.packet framing, cbor2 bodies, pyserial ------------------------------------


class SmpTestClient:
    """A station in miniature. It reads answers with its own line splitter and `smp.packet.decode`, not
    with the board's reassembler, so a fault there cannot hide itself."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, 115200, timeout=0.01, write_timeout=5, exclusive=True)
        self.port.reset_input_buffer()
        self._pending = bytearray()
        self._decoder: Any = None
        self._sequence = 0
        self._messages: list[bytes] = []

    def close(self) -> None:
        self.port.close()

    def send_raw(self, data: bytes) -> None:
        self.port.write(data)

    def send(
        self,
        command: wire.Command,
        body: bytes,
        version: smp_header.Version = smp_header.Version.V2,
    ) -> int:
        self._sequence = (self._sequence + 1) & 0xFF
        self.send_raw(b"".join(wire.frame_lines(wire.encode_request(command, self._sequence, body, version))))
        return self._sequence

    def receive(self, sequence: int, timeout: float = 5.0) -> tuple[smp_header.Header, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self._messages:
                message = self._messages.pop(0)
                try:
                    header, body = wire.decode_message(message)
                except wire.ProtocolError:
                    continue
                if header.sequence == sequence:
                    return header, cbor2.loads(body)
            self._pending += self.port.read(max(1, self.port.in_waiting))  # back as soon as a byte is in
            self._split_lines()
        raise TimeoutError(f"no answer to sequence {sequence} within {timeout} s")

    def _split_lines(self) -> None:
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[: end + 1])
            del self._pending[: end + 1]
            start = line.rfind(smp_packet.START_DELIMITER)
            if start >= 0:
                self._decoder = smp_packet.decode()
                next(self._decoder)
                line = line[start:]
            elif not line.startswith(smp_packet.CONTINUE_DELIMITER) or self._decoder is None:
                continue
            try:
                self._decoder.send(line)
            except StopIteration as done:
                self._messages.append(bytes(done.value))
                self._decoder = None
            except (SMPDecodeError, binascii.Error, struct.error, ValueError):
                self._decoder = None

    def call(
        self,
        command: wire.Command,
        body: bytes,
        *,
        version: smp_header.Version = smp_header.Version.V2,
        timeout: float = 5.0,
    ) -> tuple[dict[str, Any], wire.ErrorReply | None]:
        header, answer = self.receive(self.send(command, body, version), timeout)
        assert header.op is wire.Op(int(command.op) + 1)
        assert (header.group_id, header.command_id, header.version) == (
            command.group,
            command.command,
            version,
        )
        return answer, wire.ErrorReply.from_map(answer, command.group)

    def ok(self, command: wire.Command, body: bytes, **options: Any) -> bytes:
        """The answer's CBOR, asserting it is a success."""
        answer, error = self.call(command, body, **options)
        assert error is None, error.describe()
        return cbor2.dumps(answer)

    def refused(self, command: wire.Command, body: bytes) -> wire.ErrorReply:
        answer, error = self.call(command, body)
        assert error is not None, f"expected an error, got {answer}"
        return error

    def info(self) -> wire.InfoResponse:
        return wire.InfoResponse.from_cbor(self.ok(wire.INFO, wire.EmptyRequest().to_cbor()))

    def echo(self, text: str, timeout: float = 5.0) -> str:
        answer = self.ok(wire.ECHO, wire.EchoRequest(text).to_cbor(), timeout=timeout)
        return wire.EchoResponse.from_cbor(answer).text


@contextlib.contextmanager
def client_for(path: str) -> Iterator[SmpTestClient]:
    client = SmpTestClient(path)
    try:
        yield client
    finally:
        client.close()


# --- consoles --------------------------------------------------------------------------------------------


class EchoingPort:
    """A line with local echo, as half-duplex RS-485 adapters and consoles left in echo mode are: every
    byte the station sends comes back to it, ahead of the board's answer."""

    def __init__(self, inner: Port) -> None:
        self.inner = inner

    def read(self, timeout: float) -> bytes:
        data = self.inner.read(timeout)
        if data:
            self.inner.write(data)
        return data

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def console_in_thread(
    board_dir: Path, conditions: LineConditions | None = None, *, echo: bool = False
) -> Iterator[str]:
    """A console serving `board_dir` on a new pty from a thread; yields the path a station opens. With
    `echo`, the line hands the station back every byte it sends (`EchoingPort`)."""
    board = SimBoard.open(board_dir)
    pty = PtyPort.open()
    stop = threading.Event()
    failures: list[BaseException] = []
    line: Port = EchoingPort(pty) if echo else pty

    def run() -> None:
        try:
            serve(board, impaired(line, conditions or LineConditions()), stop)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield pty.path
    finally:
        stop.set()
        thread.join(10)
        pty.close()
    assert not thread.is_alive()
    assert failures == []


def read_line(stream: IO[bytes], deadline: float) -> bytes:
    """The first line from a child's pipe, or what came before `deadline` (or before the child ended)."""
    fd = stream.fileno()
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0] + b"\n" if b"\n" in data else data


class ConsoleProcess:
    """`mers-board sim serve DIR --json` (the console CLI) in a process of its own, as the factory runs
    it, forked from a server that imported it once (`tests.forked_process`)."""

    def __init__(self, board_dir: Path, *options: str, command: str = "serve") -> None:
        self.driver = ForkedDriver(
            "tests.console_helpers:console_driver", [command, str(board_dir), "--json", *options]
        )
        line = self.driver.first_line(timeout=30)
        if not line:
            self.kill()
            raise AssertionError(f"the console did not start: {self.stderr()}")
        self.announcement = json.loads(line)
        self.port: str = self.announcement["port"]

    @property
    def pid(self) -> int:
        return self.driver.pid

    def running(self) -> bool:
        return self.driver.running()

    def signal(self, number: int) -> None:
        self.driver.signal(number)

    def stderr(self) -> str:
        return self.driver.stderr()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        self.driver.signal(signal.SIGTERM)
        return self.driver.wait(timeout=20).returncode

    def kill(self) -> None:
        self.driver.kill()
        self.driver.wait(timeout=20)

    def __enter__(self) -> ConsoleProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.driver.running():
            self.kill()


def console_driver(argv: list[str]) -> NoReturn:
    """The console's own command line (`board.console_cli`), for `ConsoleProcess`; click exits."""
    console_cli.standalone.main(argv, prog_name="mers-board-console")


def write_key(station: SmpTestClient, slot: int, key: bytes) -> wire.WriteKeyResponse:
    return wire.WriteKeyResponse.from_cbor(
        station.ok(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(slot, key).to_cbor())
    )


def write_boarding(station: SmpTestClient, request: wire.WriteBoardingRequest) -> wire.WriteBoardingResponse:
    return wire.WriteBoardingResponse.from_cbor(station.ok(wire.WRITE_BOARDING, request.to_cbor()))


def upload_boarding(
    station: SmpTestClient, request: wire.WriteBoardingRequest, chunk_size: int
) -> wire.WriteBoardingResponse:
    answer = None
    for chunk in request.chunks(chunk_size):
        answer = wire.WriteBoardingResponse.from_cbor(station.ok(wire.WRITE_BOARDING, chunk.to_cbor()))
        assert answer.off == chunk.off + len(chunk.data)
    assert answer is not None
    return answer


def station_digest(serial_number: str, keys: list[bytes | None], request: wire.WriteBoardingRequest) -> bytes:
    """What a station computes over what it wrote (slot order, None for a slot it left empty)."""
    key_hashes = [None if key is None else hashlib.sha256(key).digest() for key in keys]
    return wire.lock_digest(serial_number, key_hashes, request.hashes())


def lock_body(digest: bytes) -> bytes:
    return wire.LockRequest(digest).to_cbor()

"""The console under bad input and faults: broken frames and bodies, a noisy line, a cut cable, and the
console process killed at random points of its writes. Whatever happens, the console keeps serving (or
a new one starts cleanly), and the board holds the old state or the new one, never a mix."""

from __future__ import annotations

import base64
import random
import statistics
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from smp import header as smp_header

from board import protocol as wire
from board.interface import BoardingData, KeySlotState
from board.simboard import SimBoard
from tests.board_helpers import ca_bundle
from tests.console_helpers import (
    ConsoleProcess,
    SmpTestClient,
    boarding,
    boarding_config,
    client_for,
    keystore_bytes,
    new_board,
    station_digest,
    trust_key,
)


def framed(message: bytes) -> bytes:
    return b"".join(wire.frame_lines(message))


def raw_request(op: wire.Op, group: int, command: int, body: bytes, *, length: int | None = None) -> bytes:
    header = smp_header.Header(
        op,
        smp_header.Version.V2,
        smp_header.Flag(0),
        len(body) if length is None else length,
        group,
        200,
        command,
    )
    return bytes(header) + body


def with_bad_crc(frame: bytes) -> bytes:
    """`frame` with one base64 character of its last line changed: still base64, wrong CRC."""
    data = bytearray(frame)
    position = len(data) - 3  # inside the last line's base64, before the newline
    data[position] = ord("B") if data[position] == ord("A") else ord("A")
    return bytes(data)


# --- bad input ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    name: str
    wire_bytes: Callable[[], bytes]
    answer: int | None  # the rc expected (generic or group), or None: dropped without an answer


def body_map(**fields: Any) -> bytes:
    return cbor2.dumps(fields)


BAD_INPUTS = [
    BadInput("garbage", lambda: b"\x00\xffgarbage\r\n" * 20, None),
    BadInput("a start line that is not base64", lambda: b"\x06\x09!!!!\n", None),
    BadInput("a start line too short for a frame", lambda: b"\x06\x09AAAA\n", None),
    BadInput("a line without end", lambda: b"\x06\x09" + b"QUFB" * 60, None),
    BadInput(
        "a frame cut after its first line",
        lambda: next(iter(wire.frame_lines(raw_request(wire.Op.WRITE, 64, 2, boarding().to_cbor())))),
        None,
    ),
    BadInput(
        "a write_key with a bad CRC",
        lambda: with_bad_crc(
            framed(raw_request(wire.Op.WRITE, 64, 1, wire.WriteKeyRequest.for_key(0, trust_key()).to_cbor()))
        ),
        None,
    ),
    BadInput(
        "a frame whose length field lies",
        lambda: b"\x06\x09" + base64.b64encode(struct.pack("!H", 40) + bytes(12) + b"\x00\x00") + b"\n",
        None,
    ),
    BadInput(
        "an oversized write_boarding",
        lambda: framed(
            raw_request(
                wire.Op.WRITE, 64, 2, wire.WriteBoardingRequest(boarding_config(), ca_bundle() * 20).to_cbor()
            )
        ),
        wire.GenericRc.EMSGSIZE,
    ),
    BadInput(
        "a truncated body",
        lambda: framed(
            raw_request(
                wire.Op.WRITE, 64, 1, wire.WriteKeyRequest.for_key(0, trust_key()).to_cbor(), length=300
            )
        ),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "an unknown group", lambda: framed(raw_request(wire.Op.WRITE, 77, 0, b"\xa0")), wire.GenericRc.ENOTSUP
    ),
    BadInput(
        "an unknown command",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 50, b"\xa0")),
        wire.GenericRc.ENOTSUP,
    ),
    BadInput(
        "a read of a write", lambda: framed(raw_request(wire.Op.READ, 64, 1, b"\xa0")), wire.GenericRc.ENOTSUP
    ),
    BadInput(
        "a body that is not CBOR",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 1, b"\xff\xfe")),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "a slot given as text",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 1, body_map(slot="0", key=trust_key()))),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "a key given as text",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 1, body_map(slot=0, key=trust_key().hex()))),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "a boarding configuration given as a map",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 2, body_map(config={"content": {}}, ca=ca_bundle()))),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "a lock digest given as a number",
        lambda: framed(raw_request(wire.Op.WRITE, 64, 3, body_map(digest=12345))),
        wire.GenericRc.EINVAL,
    ),
    BadInput(
        "an invalid key",
        lambda: framed(
            raw_request(wire.Op.WRITE, 64, 1, wire.WriteKeyRequest.for_key(0, b"\x30\x00").to_cbor())
        ),
        wire.ProvisioningRc.INVALID_KEY,
    ),
    BadInput(
        "invalid boarding data",
        lambda: framed(
            raw_request(
                wire.Op.WRITE,
                64,
                2,
                wire.WriteBoardingRequest(boarding_config(subject="x"), ca_bundle()).to_cbor(),
            )
        ),
        wire.ProvisioningRc.INVALID_BOARDING,
    ),
]


def answer_to(station: SmpTestClient, sequence: int, timeout: float) -> dict[str, Any] | None:
    try:
        return station.receive(sequence, timeout)[1]
    except TimeoutError:
        return None


def test_bad_input_is_answered_with_an_error_or_dropped_and_the_console_keeps_serving(tmp_path):
    board_dir = new_board(tmp_path / "board")
    before = keystore_bytes(board_dir)
    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
        for case in BAD_INPUTS:
            station.send_raw(case.wire_bytes())
            answer = answer_to(station, 200, timeout=0.5 if case.answer is None else 5.0)
            if case.answer is None:
                assert answer is None, case.name
            else:
                assert answer is not None, case.name
                error = wire.ErrorReply.from_map(answer, 64)
                assert error is not None and error.rc == case.answer, (case.name, answer)
            assert station.echo(f"after {case.name}") == f"after {case.name}", case.name
        assert console.running()
        assert console.stop() == 0
    assert keystore_bytes(board_dir) == before


# --- a noisy line ------------------------------------------------------------------------------------------


class RetryingStation:
    """What a station does on a noisy line: resend a request whose answer does not come."""

    def __init__(self, station: SmpTestClient, timeout: float = 0.4, attempts: int = 25) -> None:
        self.station = station
        self.timeout = timeout
        self.attempts = attempts
        self.sent = 0

    def ok(self, command: wire.Command, body: bytes) -> bytes:
        for _ in range(self.attempts):
            self.sent += 1
            answer = answer_to(self.station, self.station.send(command, body), self.timeout)
            if answer is not None:
                error = wire.ErrorReply.from_map(answer, command.group)
                assert error is None, error.describe()
                return cbor2.dumps(answer)
        raise AssertionError(f"{command.name}: no answer in {self.attempts} attempts")

    def upload(self, request: wire.WriteBoardingRequest, chunk_size: int) -> wire.WriteBoardingResponse:
        chunks = {chunk.off: chunk for chunk in request.chunks(chunk_size)}
        offset = 0
        while True:
            answer = wire.WriteBoardingResponse.from_cbor(
                self.ok(wire.WRITE_BOARDING, chunks[offset].to_cbor())
            )
            if answer.hashes is not None:
                return answer
            assert answer.off is not None
            offset = answer.off if answer.off in chunks else 0


def test_a_board_is_provisioned_over_a_line_that_corrupts_and_loses_bytes(tmp_path):
    board_dir = new_board(tmp_path / "board")
    noise = ("--corrupt-rate", "0.001", "--drop-rate", "0.0003", "--seed", "17")
    data = boarding()
    keys = [trust_key(0), trust_key(1), None]
    with ConsoleProcess(board_dir, *noise) as console, client_for(console.port) as station:
        line = RetryingStation(station)
        for slot, key in enumerate(keys):
            if key is not None:
                answer = wire.WriteKeyResponse.from_cbor(
                    line.ok(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(slot, key).to_cbor())
                )
                assert answer.key_hash == wire.WriteKeyRequest.for_key(slot, key).key_hash
        assert line.upload(data, 128).hashes == data.hashes()
        info = wire.InfoResponse.from_cbor(line.ok(wire.INFO, wire.EmptyRequest().to_cbor()))
        digest = station_digest("GW-0001", keys, data)
        assert info.digest == digest
        line.ok(wire.LOCK, wire.LockRequest(digest).to_cbor())
        requests = 2 + len(data.chunks(128)) + 2
        assert line.sent > requests, "the line was supposed to lose some requests or answers"
        assert console.stop() == 0
    board = SimBoard.open(board_dir)
    assert board.is_locked()
    assert [slot.public_key_der for slot in board.key_slots()] == keys
    assert board.boarding_data() == BoardingData(data.config, data.ca, data.network)


# --- a cut cable --------------------------------------------------------------------------------------------


def test_a_cut_line_stops_answering_mid_upload_and_the_board_keeps_its_old_state(tmp_path):
    board_dir = new_board(tmp_path / "board")
    data = boarding()
    chunks = data.chunks(128)
    with ConsoleProcess(board_dir, "--cut-after", "1500") as console, client_for(console.port) as station:
        answered = 0
        for chunk in chunks:
            if answer_to(station, station.send(wire.WRITE_BOARDING, chunk.to_cbor()), 1.0) is None:
                break
            answered += 1
        assert 0 < answered < len(chunks) - 1
        assert answer_to(station, station.send(wire.INFO, b"\xa0"), 1.0) is None  # dead for good
        assert console.running()  # the console lives on behind the dead line
        assert console.stop() == 0
    assert SimBoard.open(board_dir).boarding_data() is None
    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:  # the cable replaced
        for chunk in chunks:
            answer = wire.WriteBoardingResponse.from_cbor(station.ok(wire.WRITE_BOARDING, chunk.to_cbor()))
        assert answer.hashes == data.hashes()
        assert console.stop() == 0


# --- SIGKILL at random points of the writes --------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the board holds, read from its directory by a fresh `SimBoard`."""

    keys: tuple[bytes | None, ...]
    boarding: BoardingData | None
    locked: bool

    @classmethod
    def of(cls, board_dir: Path) -> Snapshot:
        board = SimBoard.open(board_dir)
        slots = board.key_slots()
        assert all((slot.state is KeySlotState.EMPTY) == (slot.public_key_der is None) for slot in slots)
        return cls(tuple(slot.public_key_der for slot in slots), board.boarding_data(), board.is_locked())

    def agrees_with(self, info: wire.InfoResponse) -> bool:
        key_hashes = tuple(
            None if key is None else wire.WriteKeyRequest.for_key(0, key).key_hash for key in self.keys
        )
        boarding_hashes = (
            None
            if self.boarding is None
            else wire.BoardingHashes.of(self.boarding.config, self.boarding.ca_bundle, self.boarding.network)
        )
        return (
            info.key_hashes() == key_hashes
            and (info.boarding.hashes if info.boarding else None) == boarding_hashes
            and info.locked == self.locked
        )


@dataclass(frozen=True)
class Write:
    name: str
    command: wire.Command
    body: bytes
    after: Snapshot  # the board's state once this write has committed


def next_write(rng: random.Random, state: Snapshot, serial_number: str, key_base: int) -> Write:
    """A write that changes `state`: a key into an empty slot, other boarding data, or the lock."""
    choices = ["boarding"]
    empty = [index for index, key in enumerate(state.keys) if key is None]
    if empty:
        choices.append("key")
    if state.boarding is not None and len(empty) < len(state.keys):
        choices.append("lock")
    name = rng.choices(choices, weights=[3 if c != "lock" else 1 for c in choices])[0]
    if name == "key":
        slot = rng.choice(empty)
        key = trust_key(key_base + slot)
        keys = tuple(key if index == slot else old for index, old in enumerate(state.keys))
        body = wire.WriteKeyRequest.for_key(slot, key).to_cbor()
        return Write("write_key", wire.WRITE_KEY, body, replace(state, keys=keys))
    if name == "boarding":
        client_id = "agent-B" if state.boarding and b'"agent-A"' in state.boarding.config else "agent-A"
        request = boarding(client_id, network=rng.choice([None, b'{"proxy": "http://p:3128"}']))
        data = BoardingData(request.config, request.ca, request.network)
        return Write("write_boarding", wire.WRITE_BOARDING, request.to_cbor(), replace(state, boarding=data))
    assert state.boarding is not None
    request = wire.WriteBoardingRequest(
        state.boarding.config, state.boarding.ca_bundle, state.boarding.network
    )
    digest = station_digest(serial_number, list(state.keys), request)
    return Write("lock", wire.LOCK, wire.LockRequest(digest).to_cbor(), replace(state, locked=True))


def answer_times(tmp_path: Path) -> dict[str, float]:
    """How long each kind of write takes from request to answer here, so kills land before, during
    and after the commit."""
    board_dir = new_board(tmp_path / "calibration", "GW-CAL")
    rng = random.Random(1)
    times: dict[str, list[float]] = {}
    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
        station.info()
        state = Snapshot.of(board_dir)
        while not state.locked:
            write = next_write(rng, state, "GW-CAL", 100)
            started = time.monotonic()
            station.ok(write.command, write.body)
            times.setdefault(write.name, []).append(time.monotonic() - started)
            state = write.after
        console.stop()
    return {name: statistics.median(values) for name, values in times.items()}


ITERATIONS = 40
KILL_MOMENTS = 8


def test_killing_the_console_at_spread_points_of_its_writes_leaves_the_old_state_or_the_new(tmp_path):
    windows = answer_times(tmp_path)
    rng = random.Random(20240611)
    outcomes: Counter[tuple[str, str]] = Counter()
    boards = 0
    mid_write = 0

    def fresh_board() -> tuple[Path, str]:
        nonlocal boards
        boards += 1
        serial_number = f"GW-{boards:04d}"
        return new_board(tmp_path / serial_number, serial_number), serial_number

    board_dir, serial_number = fresh_board()
    for iteration in range(ITERATIONS):
        before = Snapshot.of(board_dir)
        if before.locked:
            board_dir, serial_number = fresh_board()
            before = Snapshot.of(board_dir)
        listing = {path.name for path in board_dir.iterdir()}
        with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
            # a console started over whatever the last kill left answers, and tells the truth
            assert before.agrees_with(station.info())
            write = next_write(rng, before, serial_number, boards * 10)
            station.send(write.command, write.body)
            # fault injection, not waiting for a condition: the kills are spread evenly over the write's
            # time, from its sending to half as long again after its usual answer
            window = windows.get(write.name, max(windows.values()))
            console.driver.join(1.5 * window * (iteration % KILL_MOMENTS) / (KILL_MOMENTS - 1))
            console.kill()
        # a file left beside the store means the kill landed inside an atomic write (for the record)
        leftovers = {path.name for path in board_dir.iterdir() if path.name.startswith(".")} - listing
        mid_write += bool(leftovers)
        after = Snapshot.of(board_dir)
        assert after in (before, write.after), f"{write.name} left a mix: {after}"
        outcomes[write.name, "new" if after == write.after else "old"] += 1

    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
        assert Snapshot.of(board_dir).agrees_with(station.info())
        assert console.stop() == 0
    kinds = {outcome for _, outcome in outcomes}
    assert kinds == {"old", "new"}, f"every kill landed on one side of the commit: {outcomes}, {mid_write=}"


@pytest.mark.parametrize("chunk_size", [64])
def test_a_console_killed_mid_upload_loses_only_its_staging(tmp_path, chunk_size):
    board_dir = new_board(tmp_path / "board")
    data = boarding()
    chunks = data.chunks(chunk_size)
    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
        for chunk in chunks[:3]:
            station.ok(wire.WRITE_BOARDING, chunk.to_cbor())
        console.kill()
    assert Snapshot.of(board_dir).boarding is None
    with ConsoleProcess(board_dir) as console, client_for(console.port) as station:
        resumed = wire.WriteBoardingResponse.from_cbor(station.ok(wire.WRITE_BOARDING, chunks[3].to_cbor()))
        assert resumed == wire.WriteBoardingResponse(None, off=0)  # start again
        for chunk in chunks:
            answer = wire.WriteBoardingResponse.from_cbor(station.ok(wire.WRITE_BOARDING, chunk.to_cbor()))
        assert answer.hashes == data.hashes()
        assert console.stop() == 0

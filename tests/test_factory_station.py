"""The station sequence against simulated boards served by `mers-board sim serve` on real pseudo-terminals:
the happy path, re-runs, refusals before anything is written, a noisy line, cut cables at each write,
and several boards at once."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from board import protocol as wire
from board.interface import BoardingData
from board.simboard import SimBoard
from factory.boarding_source import BatchSource, Boarding, BoardingSource, canonical_json
from factory.errors import (
    BoardingTooLargeError,
    IatError,
    LineError,
    LockedOverOtherDataError,
    PortGoneError,
    SerialAlreadyProvisionedError,
    SerialInProgressError,
    StoppedError,
    VerificationError,
)
from factory.records import Attempt, Outcome, Records
from factory.station import DEFAULT_SERIAL_CLAIM_TIMEOUT_S, Event, StationConfig
from tests.board_helpers import ca_bundle
from tests.console_helpers import (
    ConsoleProcess,
    boarding_config,
    console_in_thread,
    keystore_bytes,
    trust_key,
)
from tests.factory_helpers import (
    DAY,
    StationFiles,
    age_claims,
    assert_consistent,
    board_state,
    boarding_document,
    expected_digest,
    make_board,
    served_boards,
    station,
    station_files,
    write_batch,
)


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    opened = Records.open(str(tmp_path / "records.db"), create=True)
    yield opened
    opened.close()


def test_a_board_is_provisioned_and_locked_over_the_station_digest(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files", key_count=2)
    document = boarding_document("GW-1")
    source = BatchSource.load(write_batch(tmp_path / "batch.jsonl", {"GW-1": document}))
    events: list[Event] = []
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        result = station(files, source, records, events).provision(console.port)
    assert result.error is None and result.outcome is Outcome.PROVISIONED
    locked, key_hashes, config = board_state(tmp_path / "GW-1")
    assert locked and config == canonical_json(document)
    assert key_hashes[:2] == tuple(key.key_hash for key in files.public_keys)
    steps = "open params echo info boarding write_key write_boarding verify lock confirm done"
    assert [event.step for event in events] == steps.split()
    [row] = list(records.rows("GW-1"))
    assert (
        row["outcome"] == "provisioned"
        and row["lock_digest"] == expected_digest("GW-1", files, document).hex()
    )
    claims = jwt.decode(document["content"]["iat"], options={"verify_signature": False})
    assert (row["iat_jti"], row["iat_expires"]) == (claims["jti"], claims["exp"])
    assert document["content"]["iat"] not in str(row)  # the token itself is never recorded
    assert row["port"] == console.port


def test_a_rerun_reports_already_provisioned_and_changes_nothing(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        assert station(files, source, records).provision(console.port).outcome is Outcome.PROVISIONED
        before = keystore_bytes(tmp_path / "GW-1")
        events: list[Event] = []
        again = station(files, source, records, events).provision(console.port)
    assert again.outcome is Outcome.ALREADY_PROVISIONED and again.error is None
    assert keystore_bytes(tmp_path / "GW-1") == before
    assert not {"write_key", "write_boarding", "lock", "boarding"} & {event.step for event in events}
    assert [row["outcome"] for row in records.rows("GW-1")] == ["provisioned", "already_provisioned"]


def test_an_iat_expiring_within_the_margin_is_refused_before_anything_is_written(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    document = boarding_document("GW-1", expires=time.time() + 3600)
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": document}))
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        before = keystore_bytes(tmp_path / "GW-1")
        result = station(files, source, records).provision(console.port)
        assert isinstance(result.error, IatError)
        assert keystore_bytes(tmp_path / "GW-1") == before
        # a smaller margin accepts the same IAT
        assert station(files, source, records, iat_margin=600).provision(console.port).error is None
    assert [row["outcome"] for row in records.rows("GW-1")] == ["failed", "provisioned"]


def ca_making_an_upload_of(size: int, ca: bytes) -> bytes:
    """`ca` repeated and padded so that with an empty boarding configuration the upload is `size` bytes."""
    overhead = wire.WriteBoardingRequest(b"", bytes(size)).upload_size() - size  # CBOR's map and headers
    body = ca * ((size - overhead) // len(ca))
    return body + b"\n" * (size - overhead - len(body))


def test_boarding_data_too_large_for_a_board_is_refused_before_any_board_is_touched(tmp_path: Path) -> None:
    key = station_files(tmp_path / "files").public_keys
    with pytest.raises(BoardingTooLargeError) as caught:
        StationConfig(keys=key, device_ca=ca_bundle() * (300_000 // len(ca_bundle())))
    assert (caught.value.field, caught.value.limit) == ("device-ca", wire.MAX_BOARDING_SIZE)
    assert f"at most {wire.MAX_BOARDING_SIZE}" in str(caught.value)
    with pytest.raises(BoardingTooLargeError) as caught:
        StationConfig(
            keys=key, device_ca=ca_bundle(), network=b'{"proxy": "%s"}' % (b"p" * wire.MAX_NETWORK_SIZE)
        )
    assert (caught.value.field, caught.value.limit) == ("network", wire.MAX_NETWORK_SIZE)
    fits = ca_making_an_upload_of(wire.MAX_BOARDING_SIZE, ca_bundle())
    assert StationConfig(keys=key, device_ca=fits).device_ca == fits


def test_a_boarding_configuration_that_overflows_the_upload_is_refused_before_its_iat_is_claimed(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    files.device_ca.write_bytes(ca_making_an_upload_of(wire.MAX_BOARDING_SIZE, files.ca_bytes))
    document = boarding_document("GW-1")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": document}))
    events: list[Event] = []
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        before = keystore_bytes(tmp_path / "GW-1")
        result = station(files, source, records, events).provision(console.port)
        assert isinstance(result.error, BoardingTooLargeError) and result.outcome is Outcome.FAILED
        assert keystore_bytes(tmp_path / "GW-1") == before
    assert ("boarding", "failed") in [(event.step, event.status) for event in events]
    assert not {"write_key", "write_boarding"} & {event.step for event in events}
    assert (
        records.iat_owner(jwt.decode(document["content"]["iat"], options={"verify_signature": False})["jti"])
        is None
    )


def test_an_iat_already_claimed_for_another_serial_is_never_burned(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    shared = "the-same-jti"
    documents = {
        "GW-1": boarding_document("GW-1", jti=shared),
        "GW-2": boarding_document("GW-2", jti=shared),
    }
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", documents))
    with (
        ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as one,
        ConsoleProcess(make_board(tmp_path / "GW-2", "GW-2")) as two,
    ):
        assert station(files, source, records).provision(one.port).error is None
        before = keystore_bytes(tmp_path / "GW-2")
        refused = station(files, source, records).provision(two.port)
    assert isinstance(refused.error, IatError) and "GW-1" in str(refused.error)
    assert keystore_bytes(tmp_path / "GW-2") == before


def test_a_board_locked_over_other_data_is_refused(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    board = SimBoard.open(board_dir)
    board.write_key(0, trust_key(7))
    board.write_boarding_data(BoardingData(boarding_config("agent-GW-1"), ca_bundle(), None))
    board.lock(lambda slots, boarding: None)
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    with ConsoleProcess(board_dir) as console:
        result = station(files, source, records).provision(console.port)
    assert isinstance(result.error, LockedOverOtherDataError)


def test_lock_is_never_sent_when_the_read_back_differs(tmp_path: Path, records: Records) -> None:
    """A key the station did not write sits in slot 2: the digest read back differs, so no lock."""
    files = station_files(tmp_path / "files")
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    SimBoard.open(board_dir).write_key(2, trust_key(9))
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    events: list[Event] = []
    with ConsoleProcess(board_dir) as console:
        result = station(files, source, records, events).provision(console.port)
    assert isinstance(result.error, VerificationError)
    assert "lock" not in {event.step for event in events}
    assert SimBoard.open(board_dir).is_locked() is False


def test_a_board_holding_a_station_key_revoked_is_never_locked(tmp_path: Path, records: Records) -> None:
    """The lock digest covers the keys' hashes, not their state: the station checks the state itself."""
    files = station_files(tmp_path / "files", key_count=2)
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    board = SimBoard.open(board_dir)
    board.write_key(0, files.public_keys[0].der)
    board.revoke_key(0)
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    with ConsoleProcess(board_dir) as console:
        result = station(files, source, records).provision(console.port)
    assert isinstance(result.error, VerificationError) and "revoked" in str(result.error)
    assert SimBoard.open(board_dir).is_locked() is False


def test_an_unlocked_board_with_the_serial_of_a_provisioned_one_is_refused(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    with (
        ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as first,
        ConsoleProcess(make_board(tmp_path / "b", "GW-1")) as duplicate,
    ):
        assert station(files, source, records).provision(first.port).error is None
        result = station(files, source, records).provision(duplicate.port)
    assert isinstance(result.error, SerialAlreadyProvisionedError)
    assert SimBoard.open(tmp_path / "b").boarding_data() is None


def unwritten(board_dir: Path) -> bool:
    locked, key_hashes, config = board_state(board_dir)
    return not locked and set(key_hashes) == {None} and config is None


class HeldHub:
    """A boarding source that holds every `fresh` until the test releases it: the attempt asking for a
    configuration stalls there, holding its serial number's claim."""

    def __init__(self, source: BoardingSource) -> None:
        self.source = source
        self.reached, self.release = threading.Event(), threading.Event()

    def current(self, serial_number: str) -> Boarding | None:
        return self.source.current(serial_number)

    def fresh(self, serial_number: str, not_before: float) -> Boarding:
        self.reached.set()
        self.release.wait(60)
        return self.source.fresh(serial_number, not_before)


def test_two_boards_with_one_serial_at_once_are_never_both_provisioned(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    held = HeldHub(BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")})))
    with (
        ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as first,
        ConsoleProcess(make_board(tmp_path / "b", "GW-1")) as duplicate,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        both = station(files, held, records)
        other_ended = threading.Event()
        both.on_event = lambda event: other_ended.set() if event.step == "done" else None
        running = pool.submit(both.provision_all, [first.port, duplicate.port])
        assert held.reached.wait(60)  # one attempt holds the serial and waits for its hub...
        assert other_ended.wait(60)  # ...while the other one is refused, recorded and done
        held.release.set()
        results = running.result(60)
        [won] = [result for result in results if result.error is None]
        [refused] = [result for result in results if result.error is not None]
        assert isinstance(refused.error, SerialInProgressError), refused.error
        assert won.port in str(refused.error)  # the operator learns where the other board is
        board_dirs = {first.port: tmp_path / "a", duplicate.port: tmp_path / "b"}
        assert board_state(board_dirs[won.port])[0]
        assert unwritten(board_dirs[refused.port])  # no key, no IAT, no lock
        # the claim ended with the first attempt: the duplicate is now refused as a provisioned serial
        again = station(files, held, records).provision(refused.port)
    assert isinstance(again.error, SerialAlreadyProvisionedError)
    assert unwritten(board_dirs[refused.port])
    assert sorted(row["outcome"] for row in records.rows("GW-1")) == ["failed", "failed", "provisioned"]


def test_a_stalled_attempt_whose_claim_was_taken_over_writes_nothing(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    held = HeldHub(batch)
    with (
        ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as stalled_port,
        ConsoleProcess(make_board(tmp_path / "b", "GW-1")) as later_port,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        stalled = pool.submit(station(files, held, records).provision, stalled_port.port)
        assert held.reached.wait(60)  # the stalled attempt holds the claim, waiting for its hub
        age_claims(records, DEFAULT_SERIAL_CLAIM_TIMEOUT_S + 1)  # ...past its timeout without a check-in
        assert station(files, batch, records).provision(later_port.port).error is None
        held.release.set()
        refused = stalled.result(60)
    assert isinstance(refused.error, SerialInProgressError) and "taken over" in str(refused.error)
    assert unwritten(tmp_path / "a")
    assert board_state(tmp_path / "b")[0]


@pytest.mark.parametrize(
    ("raised", "recorded"),
    [
        (KeyboardInterrupt(), "[stopped] interrupted during boarding"),  # the operator's Ctrl-C
        (RuntimeError("a defect"), "[unexpected] boarding: RuntimeError: a defect"),  # what no check foresaw
    ],
    ids=["Ctrl-C", "a defect"],
)
def test_an_attempt_ended_by_what_no_step_catches_is_recorded_and_lets_its_serial_go(
    tmp_path: Path, records: Records, raised: BaseException, recorded: str
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))

    class Raising(BatchSource):
        def fresh(self, serial_number: str, not_before: float) -> Boarding:
            raise raised  # while the hub is asked

    with ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as console:
        with pytest.raises(type(raised)):
            station(files, Raising(batch.entries), records).provision(console.port)
        assert station(files, batch, records).provision(console.port).error is None  # at once
    ended, provisioned = records.rows("GW-1")
    assert (ended["outcome"], ended["error"]) == ("failed", recorded)
    assert provisioned["outcome"] == "provisioned"


def test_a_stop_request_ends_the_attempt_before_its_next_step_recorded_and_released(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    held = HeldHub(batch)
    events: list[Event] = []
    stopping = station(files, held, records, events)
    with ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as console:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(stopping.provision, console.port)
            assert held.reached.wait(60)  # the hub is being asked when the stop comes
            stopping.stop.set()
            held.release.set()
            result = attempt.result(60)
        assert isinstance(result.error, StoppedError) and "before write_key" in str(result.error)
        assert unwritten(tmp_path / "a")
        assert [(event.step, event.status) for event in events][-3:] == [
            ("boarding", "ok"),
            ("write_key", "failed"),
            ("done", "failed"),
        ]
        [row] = records.rows("GW-1")
        assert row["outcome"] == "failed" and str(row["error"]).startswith("[stopped]")
        assert station(files, batch, records).provision(console.port).error is None  # released at once


@pytest.mark.parametrize(
    ("stop_after", "outcome"), [("verify", Outcome.FAILED), ("lock", Outcome.PROVISIONED)]
)
def test_a_stop_request_is_honoured_before_lock_and_never_after(
    tmp_path: Path, records: Records, stop_after: str, outcome: Outcome
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    stopping = station(files, batch, records)

    def stop_after_step(event: Event) -> None:
        if (event.step, event.status) == (stop_after, "ok"):
            stopping.stop.set()

    stopping.on_event = stop_after_step
    with ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as console:
        result = stopping.provision(console.port)
    assert result.outcome is outcome
    locked, _, config = board_state(tmp_path / "a")
    assert locked is (outcome is Outcome.PROVISIONED) and config is not None
    assert [row["outcome"] for row in records.rows("GW-1")] == [outcome.value]


def test_the_station_is_sealing_from_lock_until_the_attempt_is_recorded(
    tmp_path: Path, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    watched = station(files, batch, records)
    sealing: dict[str, bool] = {}

    def note(event: Event) -> None:
        sealing.setdefault(event.step, watched.sealing)

    append, provisioned = records.append, records.mark_provisioned

    def noting_append(attempt: Attempt) -> int:
        sealing["record"] = watched.sealing
        return append(attempt)

    def noting_mark(*args: Any) -> None:
        sealing["mark_provisioned"] = watched.sealing
        provisioned(*args)

    watched.on_event = note
    monkeypatch.setattr(records, "append", noting_append)
    monkeypatch.setattr(records, "mark_provisioned", noting_mark)
    with ConsoleProcess(make_board(tmp_path / "a", "GW-1")) as console:
        assert watched.provision(console.port).outcome is Outcome.PROVISIONED
    on = [step for step, sealed in sealing.items() if sealed]
    assert on == ["lock", "mark_provisioned", "confirm", "record"] and not sealing["done"]
    assert not watched.sealing


def test_a_noisy_line_at_a_byte_error_rate_of_1e_3_still_completes(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    serials = [f"GW-{index}" for index in range(3)]
    documents = {serial: boarding_document(serial) for serial in serials}
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", documents))
    for seed, serial in enumerate(serials):
        board_dir = make_board(tmp_path / serial, serial)
        noisy = ("--corrupt-rate", "1e-3", "--drop-rate", "2e-4", "--seed", str(seed))
        with ConsoleProcess(board_dir, *noisy) as console:
            result = station(files, source, records).provision(console.port)
        assert result.error is None, result.error
        assert board_state(board_dir)[0]
        assert board_state(board_dir)[2] == canonical_json(documents[serial])


def test_a_line_that_echoes_every_request_back_still_provisions_the_board(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    document = boarding_document("GW-1")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": document}))
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    with console_in_thread(board_dir, echo=True) as port:
        result = station(files, source, records).provision(port)
    assert result.error is None and result.outcome is Outcome.PROVISIONED, result.error
    assert board_state(board_dir)[0] and board_state(board_dir)[2] == canonical_json(document)


def step_boundaries(tmp_path: Path, files: StationFiles, records: Records) -> dict[str, int]:
    """Bytes crossed (both ways) when each step ended, measured on a clean line with another board."""
    source = BatchSource.load(write_batch(tmp_path / "probe.jsonl", {"GW-P": boarding_document("GW-P")}))
    events: list[Event] = []
    with ConsoleProcess(make_board(tmp_path / "probe", "GW-P")) as console:
        assert station(files, source, records, events).provision(console.port).error is None
    return {event.step: event.wire_bytes for event in events}


@pytest.mark.parametrize(
    ("where", "fraction"),
    [("write_key", 0.5), ("write_boarding", 0.3), ("write_boarding", 0.95), ("lock", 0.2), ("lock", 0.8)],
)
def test_a_cable_cut_leaves_the_board_unlocked_or_sealed_and_a_rerun_completes(
    tmp_path: Path, records: Records, where: str, fraction: float
) -> None:
    files = station_files(tmp_path / "files")
    bounds = step_boundaries(tmp_path, files, records)
    before_step = {"write_key": "boarding", "write_boarding": "write_key", "lock": "verify"}[where]
    start, end = bounds[before_step], bounds[where]
    cut = start + int((end - start) * fraction)
    # the probe board used GW-P's data; this board gets its own
    document = boarding_document("GW-1")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": document}))
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    with ConsoleProcess(board_dir, "--cut-after", str(cut)) as console:
        result = station(files, source, records, retries=2).provision(console.port)
    assert isinstance(result.error, LineError | PortGoneError), result.error
    assert result.outcome is Outcome.FAILED
    assert_consistent(board_dir, files, canonical_json(document))
    with ConsoleProcess(board_dir) as console:
        again = station(files, source, records).provision(console.port)
    assert again.error is None
    assert again.outcome in (Outcome.PROVISIONED, Outcome.ALREADY_PROVISIONED)
    assert assert_consistent(board_dir, files, canonical_json(document))
    outcomes = [row["outcome"] for row in records.rows("GW-1")]
    assert outcomes[0] == "failed" and outcomes[-1] == again.outcome.value
    records.verify()


def test_several_ports_run_concurrently_one_board_each(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    serials = [f"GW-{index}" for index in range(4)]
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {s: boarding_document(s) for s in serials}))
    events: list[Event] = []
    with served_boards(tmp_path, serials, "--baud", "115200") as consoles:
        started = time.monotonic()
        results = station(files, source, records, events).provision_all([c.port for c in consoles])
        elapsed = time.monotonic() - started
    assert [result.serial for result in results] == serials
    assert all(result.error is None for result in results)
    assert {event.port for event in events} == {c.port for c in consoles}
    # at a paced 115200 baud the boards overlap: together well under four boards one after another
    assert elapsed < 0.75 * sum(result.seconds for result in results)
    assert records.verify().rows == 4


def test_a_console_that_dies_mid_session_is_a_port_failure_and_recorded(
    tmp_path: Path, records: Records
) -> None:
    files = station_files(tmp_path / "files")
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": boarding_document("GW-1")}))
    board_dir = make_board(tmp_path / "GW-1", "GW-1")
    with ConsoleProcess(board_dir) as console:
        killed: list[bool] = []

        def kill_at_write_key(event: Event) -> None:
            if event.step == "boarding" and not killed:
                console.kill()
                killed.append(True)

        stationed = station(files, source, records, retries=1)
        stationed.on_event = kill_at_write_key
        result = stationed.provision(console.port)
    assert isinstance(result.error, PortGoneError | LineError)
    [row] = list(records.rows("GW-1"))
    assert row["outcome"] == "failed" and row["error"]
    assert not SimBoard.open(board_dir).is_locked()


def test_the_iat_margin_is_measured_in_days_by_default(tmp_path: Path, records: Records) -> None:
    files = station_files(tmp_path / "files")
    document = boarding_document("GW-1", expires=time.time() + 2 * DAY)
    source = BatchSource.load(write_batch(tmp_path / "b.jsonl", {"GW-1": document}))
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        assert station(files, source, records).provision(console.port).error is None

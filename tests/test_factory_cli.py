"""`mers-factory` (run in-process, `run_cli`; real processes for signals): provisioning from a batch file and
from the real hub over TLS, batch export, the records commands, and every bad input as one line, a documented
exit code, the port released and the failed attempt recorded."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import serial

from factory.boarding_source import BatchSource
from factory.cli import _stop_between_steps
from factory.errors import ExitCode
from factory.records import Records
from tests.conftest import BIN_DIR
from tests.console_helpers import ConsoleProcess, keystore_bytes, read_line
from tests.factory_helpers import (
    DAY,
    batch_for,
    board_state,
    boarding_document,
    factory,
    factory_with_file_size_limit,
    json_events,
    make_board,
    provision_args,
    recording_server,
    served_boards,
    station,
    station_files,
    write_batch,
)
from tests.hub_helpers import AGENTS, RunningHub


def port_is_free(path: str) -> bool:
    """The station released the port: an exclusive open succeeds."""
    connection = serial.Serial(path, 115200, exclusive=True, timeout=0)
    connection.close()
    return True


def rows(records: Path, serial: str | None = None) -> list[dict[str, object]]:
    store = Records.open(str(records))
    try:
        return list(store.rows(serial))
    finally:
        store.close()


def hub_args(hub: RunningHub, tmp_path: Path) -> list[str | Path]:
    token = tmp_path / "admin-token"
    token.write_text(hub.admin_token + "\n")
    return ["--hub", hub.url, "--hub-token-file", token, "--hub-ca", hub.ca]


# --- from a batch file -----------------------------------------------------------------------------------


def test_provision_from_a_batch_prints_json_events_and_records_an_intact_chain(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1", "GW-2")
    records = tmp_path / "records.db"
    with served_boards(tmp_path, ["GW-1", "GW-2"]) as consoles:
        ports = [console.port for console in consoles]
        result = factory(
            *provision_args(files, records, *ports),
            "--boarding-batch",
            batch,
            "--device-ca",
            files.device_ca,
            "--json",
        )
        assert result.returncode == 0, result.stderr
        events = json_events(result.stdout)
        for port, serial in zip(ports, ["GW-1", "GW-2"], strict=True):
            steps = [event for event in events if event["port"] == port]
            assert steps[-1] == {"port": port, "serial": serial, "step": "done", "status": "provisioned"}
            assert {"write_key", "write_boarding", "lock"} <= {event["step"] for event in steps}
            assert port_is_free(port)
    verified = factory("records", "verify", "--records", records)
    assert verified.returncode == 0 and "2 rows" in verified.stdout
    exported = factory("records", "export", "--json", "--records", records)
    assert [json.loads(line)["outcome"] for line in exported.stdout.splitlines()] == ["provisioned"] * 2
    as_csv = factory("records", "export", "--csv", "--records", records)
    assert as_csv.stdout.splitlines()[0].startswith("seq,serial_number,agent_id,key_hashes")
    shown = factory("records", "show", "GW-2", "--records", records)
    assert shown.returncode == 0 and "provisioned" in shown.stdout and "GW-1" not in shown.stdout


def records_of_runs(tmp_path: Path, runs: int) -> Path:
    """A records file holding `runs` attempts: one board provisioned, then re-run."""
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    records = tmp_path / "records.db"
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        for _ in range(runs):
            args = provision_args(files, records, console.port)
            assert factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca).returncode == 0
    return records


def test_records_verify_reports_the_first_altered_row(tmp_path: Path) -> None:
    records = records_of_runs(tmp_path, 3)
    import sqlite3

    with sqlite3.connect(records) as db:
        db.execute("DROP TRIGGER attempts_no_update")
        db.execute("UPDATE attempts SET outcome = 'provisioned' WHERE seq = 2")
    result = factory("records", "verify", "--records", records)
    assert result.returncode == ExitCode.RECORDS
    assert "row 2" in result.error_line


def test_records_verify_prints_an_anchor_that_later_catches_removed_rows(tmp_path: Path) -> None:
    records = records_of_runs(tmp_path, 2)
    verified = factory("records", "verify", "--records", records)
    assert verified.returncode == 0, verified.stderr
    anchor = verified.stdout.split("anchor ")[-1].strip()
    assert anchor.startswith("2:")
    again = factory("records", "verify", "--records", records, "--anchor", anchor)
    assert again.returncode == 0 and "1 anchor(s) hold" in again.stdout
    bad = factory("records", "verify", "--records", records, "--anchor", "2:not-a-hash")
    assert bad.returncode == ExitCode.USAGE and "ROWS:HEAD" in bad.error_line
    import sqlite3

    with sqlite3.connect(records) as db:
        db.execute("DROP TRIGGER attempts_no_delete")
        db.execute("DELETE FROM attempts WHERE seq = 2")
    assert factory("records", "verify", "--records", records).returncode == 0  # the chain alone cannot tell
    caught = factory("records", "verify", "--records", records, "--anchor", anchor)
    assert caught.returncode == ExitCode.RECORDS
    assert "removed from its end" in caught.error_line


def test_records_verify_of_an_empty_chain_prints_no_anchor(tmp_path: Path) -> None:
    """An anchor names a row that must still be there. An empty chain has none: ``0:`` and 64 zeros would
    hold for every chain, emptied ones included, so `--anchor` refuses it, and verify must not offer it."""
    records = tmp_path / "r.db"
    Records.open(str(records), create=True).close()
    verified = factory("records", "verify", "--records", records)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == "chain intact: 0 rows; no anchor: the chain has no row to anchor yet\n"
    vacuous = factory("records", "verify", "--records", records, "--anchor", f"0:{'0' * 64}")
    assert vacuous.returncode == ExitCode.USAGE and "ROWS:HEAD" in vacuous.error_line


def test_the_records_refuse_updates_and_deletes(tmp_path: Path) -> None:
    import sqlite3

    store = Records.open(str(tmp_path / "r.db"), create=True)
    store.close()
    with sqlite3.connect(tmp_path / "r.db") as db:
        for statement in ("UPDATE attempts SET error = 'x'", "DELETE FROM attempts"):
            db.execute("INSERT INTO iat_claims VALUES ('j', 's', 't')")  # a write that is allowed
            try:
                db.execute(
                    "INSERT INTO attempts VALUES (1,'s',NULL,'',NULL,NULL,NULL,NULL,NULL,NULL,"
                    "'st','p','a','b','failed','', '0', 'h')"
                )
                db.execute(statement)
            except sqlite3.DatabaseError as error:
                assert "append-only" in str(error)
            else:
                raise AssertionError(f"{statement} was allowed")
            db.rollback()


@pytest.mark.parametrize(
    "command", [("records", "verify"), ("records", "export", "--json"), ("records", "show", "GW-1")]
)
def test_a_records_command_refuses_a_records_file_that_does_not_exist(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A mistyped path is not an intact, empty record set, and leaves no file behind."""
    result = factory(*command, "--records", "typo.db", cwd=tmp_path)
    assert result.returncode == ExitCode.RECORDS
    missing = tmp_path.resolve() / "typo.db"
    assert (
        result.error_line == f"mers-factory: error: [records] the records database {missing} does not exist"
    )
    assert result.stdout == "" and not missing.exists()


def test_provision_refuses_a_missing_records_file_unless_told_to_start_a_new_record_set(
    tmp_path: Path,
) -> None:
    """The default records file is relative: a station started in another directory must not check
    serial numbers and IATs against a blank database it has just made."""
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    records = elsewhere.resolve() / "factory-records.db"
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        args: list[str | Path] = ["provision", "--port", console.port, "--boarding-batch", batch]
        args += ["--device-ca", files.device_ca, *(arg for key in files.keys for arg in ("--key", key))]
        refused = factory(*args, cwd=elsewhere)
        assert refused.returncode == ExitCode.RECORDS
        assert str(records) in refused.error_line and "--new-records" in refused.error_line
        assert not records.exists() and port_is_free(console.port)
        assert board_state(tmp_path / "GW-1")[2] is None
        started = factory(*args, "--new-records", cwd=elsewhere)
        assert started.returncode == 0, started.stderr
        assert started.stderr == f"mers-factory: started a new record set at {records}\n"
        again = factory(*args, "--new-records", cwd=elsewhere)  # it exists now: used, not started anew
        assert again.returncode == 0 and again.stderr == "" and "already provisioned" in again.stdout
    assert [row["outcome"] for row in rows(records)] == ["provisioned", "already_provisioned"]


# --- bad input and faults: one line, an exit code, the port released, a record --------------------------


def test_a_wrong_key_file_is_a_usage_error_that_touches_no_board(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello\n")
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        args: list[str | Path] = [
            "provision",
            "--port",
            console.port,
            "--key",
            not_a_key,
            "--records",
            tmp_path / "r.db",
        ]
        result = factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca)
        assert result.returncode == ExitCode.USAGE
        assert "not-a-key.pem" in result.error_line
        assert port_is_free(console.port)
    assert board_state(tmp_path / "GW-1")[2] is None


def test_a_device_ca_too_large_for_a_board_is_a_usage_error_before_any_step(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    files.device_ca.write_bytes(files.ca_bytes * (300_000 // len(files.ca_bytes) + 1))
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        before = keystore_bytes(tmp_path / "GW-1")
        args = provision_args(files, tmp_path / "r.db", console.port)
        result = factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca, "--json")
        assert result.returncode == ExitCode.USAGE
        assert "[device-ca]" in result.error_line and "at most 262144" in result.error_line
        assert json_events(result.stdout) == []
        assert keystore_bytes(tmp_path / "GW-1") == before
        assert port_is_free(console.port)


def test_a_busy_port_is_refused_and_recorded(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        holder = serial.Serial(console.port, 115200, exclusive=True)
        try:
            args = provision_args(files, tmp_path / "r.db", console.port)
            result = factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca)
        finally:
            holder.close()
        assert result.returncode == ExitCode.PORT
        assert "in use" in result.error_line
    [row] = rows(tmp_path / "r.db")
    assert row["outcome"] == "failed" and "in use" in str(row["error"]) and row["port"] == console.port


def test_sigterm_stops_the_station_between_steps_with_the_attempt_recorded(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    records = tmp_path / "records.db"
    # at 9600 baud the rest of the sequence takes seconds; the board is paused while the signal lands
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1"), "--baud", "9600") as console:
        args = provision_args(files, records, console.port)
        args += ["--boarding-batch", batch, "--device-ca", files.device_ca, "--baud", "9600", "--json"]
        running = subprocess.Popen(
            [BIN_DIR / "mers-factory", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert running.stdout is not None and running.stderr is not None
        seen = b""
        while b'"step": "write_key", "status": "ok"' not in seen:
            line = running.stdout.readline()  # the station flushes each event; it ends within a minute
            assert line, running.communicate(timeout=60)[1].decode()
            seen += line
        console.signal(signal.SIGSTOP)  # no step can end while the board is silent...
        try:
            running.send_signal(signal.SIGTERM)
            stopping = read_line(running.stderr, time.monotonic() + 30)  # ...until the station took it
            assert stopping.startswith(b"mers-factory: stopping"), stopping
        finally:
            console.signal(signal.SIGCONT)
        rest, stderr = running.communicate(timeout=60)
        assert running.returncode == ExitCode.FAILED, stderr.decode()
        events = json_events((seen + rest).decode())
        stopped_before = events[-1]["detail"].removeprefix("[stopped] the station was stopped before ")
        assert events[-1]["step"] == "done" and stopped_before in {"write_boarding", "verify", "lock"}, events
        assert b"[stopped]" in stderr
        assert board_state(tmp_path / "GW-1")[0] is False and port_is_free(console.port)
        [row] = rows(records, "GW-1")
        assert row["outcome"] == "failed" and str(row["error"]).startswith("[stopped]")
        rerun = factory(*args[:-1])  # at once: the stopped attempt let its serial number go
        assert rerun.returncode == 0, rerun.stderr
    assert board_state(tmp_path / "GW-1")[0] is True


@pytest.mark.parametrize(("ports", "at_once"), [(1, True), (2, False)])
def test_a_second_ctrl_c_interrupts_one_board_at_once_but_never_while_it_is_locked(
    tmp_path: Path, ports: int, at_once: bool
) -> None:
    files = station_files(tmp_path / "files")
    batch = BatchSource.load(batch_for(tmp_path / "batch.jsonl", "GW-1"))
    store = Records.open(str(tmp_path / "records.db"), create=True)
    try:
        run = station(files, batch, store)
        with _stop_between_steps(run, ports):
            signal.raise_signal(signal.SIGINT)  # the first: stop between steps
            assert run.stop.is_set()
            run._count_sealing(+1)  # a board between its lock and its record
            signal.raise_signal(signal.SIGINT)  # not now
            run._count_sealing(-1)
            with pytest.raises(KeyboardInterrupt) if at_once else contextlib.nullcontext():
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        store.close()


def test_a_port_that_does_not_exist_is_a_port_error(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1")
    args = provision_args(files, tmp_path / "r.db", "/dev/nonexistent-tty")
    result = factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca)
    assert result.returncode == ExitCode.PORT and "does not exist" in result.error_line
    assert rows(tmp_path / "r.db")[0]["outcome"] == "failed"


def test_an_expired_iat_is_refused_with_the_board_untouched(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = batch_for(tmp_path / "batch.jsonl", "GW-1", expires=time.time() - DAY)
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        args = provision_args(files, tmp_path / "r.db", console.port)
        result = factory(*args, "--boarding-batch", batch, "--device-ca", files.device_ca)
        assert result.returncode == ExitCode.REFUSED and "[iat]" in result.error_line
        assert port_is_free(console.port)
    assert board_state(tmp_path / "GW-1")[2] is None
    [row] = rows(tmp_path / "r.db", "GW-1")
    assert row["outcome"] == "failed" and row["iat_jti"]


def test_a_malformed_batch_file_names_its_line(tmp_path: Path) -> None:
    files = station_files(tmp_path / "files")
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"serial": "GW-1", "boarding": {}}\n')
    result = factory(*provision_args(files, tmp_path / "r.db", "/dev/null"), "--boarding-batch", batch)
    assert result.returncode == ExitCode.USAGE and "line 1" in result.error_line


def test_a_bad_option_is_one_line_with_exit_2(tmp_path: Path) -> None:
    result = factory("provision", "--port", "/dev/null", "--iat-margin", "tomorrow")
    assert result.returncode == ExitCode.USAGE
    assert result.error_line.startswith("mers-factory: error:")


# --- from the hub ----------------------------------------------------------------------------------------


def test_provision_from_the_hub_creates_the_agent_and_a_rerun_consumes_no_iat(
    tmp_path: Path, hub: RunningHub
) -> None:
    files = station_files(tmp_path / "files")
    records = tmp_path / "r.db"
    with ConsoleProcess(make_board(tmp_path / "GW-7", "GW-7")) as console:
        args = [*provision_args(files, records, console.port), *hub_args(hub, tmp_path)]
        first = factory(*args, "--device-ca", files.device_ca)
        assert first.returncode == 0, first.stderr
        [agent] = hub.admin("GET", f"{AGENTS}/agents", params={"name": "GW-7"}).json()["content"]
        config = hub.admin("GET", f"{AGENTS}/agents/{agent['id']}/boarding/configuration").json()
        again = factory(*args, "--device-ca", files.device_ca)
        assert again.returncode == 0 and "already provisioned" in again.stdout
    assert hub.admin("GET", f"{AGENTS}/agents/{agent['id']}/boarding/configuration").json() == config
    stored = json.loads(board_state(tmp_path / "GW-7")[2] or b"{}")
    assert stored["content"]["iat"] == config["content"]["iat"]
    for output in (first.stdout, first.stderr, again.stdout, records.read_bytes().decode("latin-1")):
        assert hub.admin_token not in output and config["content"]["iat"] not in output
    [provisioned, already] = rows(records, "GW-7")
    assert provisioned["agent_id"] == agent["id"] and already["outcome"] == "already_provisioned"
    jti = jwt.decode(config["content"]["iat"], options={"verify_signature": False})["jti"]
    assert provisioned["iat_jti"] == jti


def test_an_iat_expiring_within_the_margin_is_replaced_by_offboarding(
    tmp_path: Path, hub: RunningHub
) -> None:
    files = station_files(tmp_path / "files")
    agent = hub.admin(
        "POST", f"{AGENTS}/agents", json={"name": "GW-8", "securityProfile": "SHARED_SECRET"}
    ).json()
    hub.clock.advance(-6.5 * DAY)  # the IAT is minted 6.5 days ago: it expires in half a day
    old = hub.admin("GET", f"{AGENTS}/agents/{agent['id']}/boarding/configuration").json()["content"]["iat"]
    hub.clock.advance(6.5 * DAY)
    with ConsoleProcess(make_board(tmp_path / "GW-8", "GW-8")) as console:
        args = [*provision_args(files, tmp_path / "r.db", console.port), *hub_args(hub, tmp_path)]
        assert factory(*args).returncode == 0
    stored = json.loads(board_state(tmp_path / "GW-8")[2] or b"{}")["content"]["iat"]
    assert stored != old
    assert jwt.decode(stored, options={"verify_signature": False})["exp"] > time.time() + 6 * DAY


def test_batch_export_from_the_hub_then_provision_offline(tmp_path: Path, hub: RunningHub) -> None:
    files = station_files(tmp_path / "files")
    batch = tmp_path / "batch.jsonl"
    exported = factory("batch", "export", "GW-1", "GW-2", *hub_args(hub, tmp_path), "-o", batch)
    assert exported.returncode == 0, exported.stderr
    assert batch.stat().st_mode & 0o077 == 0
    lines = [json.loads(line) for line in batch.read_text().splitlines()]
    assert [line["serial"] for line in lines] == ["GW-1", "GW-2"]
    with ConsoleProcess(make_board(tmp_path / "GW-2", "GW-2")) as console:
        args = provision_args(files, tmp_path / "r.db", console.port)
        result = factory(*args, "--boarding-batch", batch, "--device-ca", hub.ca)
        assert result.returncode == 0, result.stderr
    [row] = rows(tmp_path / "r.db")
    assert row["agent_id"] == lines[1]["agentId"]


def test_a_batch_export_that_cannot_be_written_leaves_no_file_holding_iats(
    tmp_path: Path, hub: RunningHub
) -> None:
    output = tmp_path / "out" / "batch.jsonl"
    output.parent.mkdir()
    serials = [f"GW-{number}" for number in range(8)]  # a line is over 1 KiB: the batch is past the limit
    result = factory_with_file_size_limit(
        4096, "batch", "export", *serials, *hub_args(hub, tmp_path), "-o", output
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "cannot write the batch file" in result.error_line and "File too large" in result.error_line
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("serials_file", "arguments", "where"),
    [
        (b"GW-1\nGW-\xff2\n", [], "serials.txt line 2 is not UTF-8"),
        (b"\nGW-\x072\n", [], "serials.txt line 2: the serial number"),
        (b"GW-1\n" + b"G" * 129 + b"\n", [], "serials.txt line 2: the serial number"),
        (b"GW-1\n", ["GW-2", "G" * 129], "serial number argument 2: the serial number"),
    ],
)
def test_a_serial_number_no_board_could_carry_is_refused_by_its_place_before_any_hub_request(
    tmp_path: Path, serials_file: bytes, arguments: list[str], where: str
) -> None:
    listing = tmp_path / "serials.txt"
    listing.write_bytes(serials_file)
    token = tmp_path / "token"
    token.write_text("s3cret-admin-token\n")
    with recording_server(tmp_path / "server", tls=True) as server:
        hub: list[str | Path] = ["--hub", server.url, "--hub-token-file", token, "--hub-ca", server.ca]
        result = factory(
            "batch", "export", *arguments, "--serials-file", listing, *hub, "-o", tmp_path / "batch.jsonl"
        )
        assert result.returncode == ExitCode.USAGE and where in result.error_line
        assert server.seen == []


def test_an_unreachable_hub_is_a_hub_error_with_the_port_released(tmp_path: Path, hub: RunningHub) -> None:
    files = station_files(tmp_path / "files")
    token = tmp_path / "token"
    token.write_text(hub.admin_token)
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        args = provision_args(files, tmp_path / "r.db", console.port)
        result = factory(*args, "--hub", "https://127.0.0.1:1", "--hub-token-file", token, "--hub-ca", hub.ca)
        assert result.returncode == ExitCode.HUB and "unreachable" in result.error_line
        assert hub.admin_token not in result.stderr
        assert port_is_free(console.port)
    assert rows(tmp_path / "r.db", "GW-1")[0]["outcome"] == "failed"
    assert board_state(tmp_path / "GW-1")[2] is None


def test_a_hub_with_an_untrusted_certificate_is_refused(tmp_path: Path, hub: RunningHub) -> None:
    files = station_files(tmp_path / "files")
    token = tmp_path / "token"
    token.write_text(hub.admin_token)
    with ConsoleProcess(make_board(tmp_path / "GW-1", "GW-1")) as console:
        args = provision_args(files, tmp_path / "r.db", console.port)
        result = factory(
            *args,
            *("--hub", hub.url, "--hub-token-file", token, "--hub-ca", files.device_ca),
            env={"REQUESTS_CA_BUNDLE": str(hub.ca)},  # the environment must not override --hub-ca
        )
    assert result.returncode == ExitCode.HUB and "TLS" in result.error_line


@pytest.mark.parametrize("command", ["provision", "batch export"])
def test_a_hub_over_plain_http_is_a_usage_error_before_the_token_is_sent(
    tmp_path: Path, command: str
) -> None:
    files = station_files(tmp_path / "files")
    token = tmp_path / "token"
    token.write_text("s3cret-admin-token\n")
    with recording_server(tmp_path / "server", tls=False) as server:
        hub: list[str | Path] = ["--hub", server.url, "--hub-token-file", token, "--hub-ca", files.device_ca]
        if command == "provision":
            result = factory(*provision_args(files, tmp_path / "r.db", "/dev/null"), *hub)
        else:
            result = factory("batch", "export", "GW-1", *hub, "-o", tmp_path / "batch.jsonl")
        assert result.returncode == ExitCode.USAGE and "https://" in result.error_line
        assert server.seen == []
    assert "s3cret-admin-token" not in result.stderr
    assert not (tmp_path / "batch.jsonl").exists()


def test_two_stations_share_postgresql_records(tmp_path: Path, postgres_url: str) -> None:
    """Two station processes on one line, one database: both boards recorded in one intact chain, and a
    batch that gives both boards the same IAT burns it into one board only."""
    files = station_files(tmp_path / "files")
    shared = boarding_document("GW-1", jti="one-jti")
    other = boarding_document("GW-2", jti="one-jti")
    batch = write_batch(tmp_path / "batch.jsonl", {"GW-1": shared, "GW-2": other})
    with served_boards(tmp_path, ["GW-1", "GW-2"]) as consoles:
        processes = []
        for index, console in enumerate(consoles):
            args = [*provision_args(files, postgres_url, console.port), "--boarding-batch", batch]
            args += ["--device-ca", files.device_ca, "--station", f"s{index}"]
            command = [str(BIN_DIR / "mers-factory"), *map(str, args)]
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        codes = sorted(process.wait(120) for process in processes)
        for process in processes:
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            process.stderr.close()
    assert codes == [ExitCode.OK, ExitCode.REFUSED]
    assert sum(board_state(tmp_path / serial)[0] for serial in ("GW-1", "GW-2")) == 1
    assert factory("records", "verify", "--records", postgres_url).returncode == 0


def test_without_the_factory_extra_the_station_names_it() -> None:
    probe = (
        "import sys\n"
        "sys.modules['sqlalchemy'] = None  # as if the extra were not installed\n"
        "from factory.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "records", "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "mers-factory: error: the records need SQLAlchemy: pip install 'mers[factory]'"
    )

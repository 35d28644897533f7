"""The records: the hash chain, its verification, append-only rules, concurrent stations appending, the
IAT claims that keep one IAT out of two boards, and the serial claims that keep two boards with one serial
number from being written at once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest
import sqlalchemy as sa

from factory.errors import (
    ChainBrokenError,
    IatError,
    RecordsError,
    SerialAlreadyProvisionedError,
    SerialInProgressError,
)
from factory.records import (
    GENESIS,
    Attempt,
    ChainReport,
    Outcome,
    Records,
    SerialClaim,
    row_hash,
    timestamp,
)
from tests.factory_helpers import age_claims


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Records]:
    url = (
        str(tmp_path / "records.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    store = Records.open(url, create=True)
    yield store
    store.close()


def attempt(serial: str = "GW-1", outcome: Outcome = Outcome.PROVISIONED, **fields: object) -> Attempt:
    base = Attempt(
        serial_number=serial,
        agent_id="agent",
        key_hashes="ab" * 32,
        boarding_sha256="cd" * 32,
        ca_sha256="ef" * 32,
        network_sha256=None,
        lock_digest="01" * 32,
        iat_jti="jti-1",
        iat_expires=2_000_000_000,
        station="station-1",
        port="/dev/serial/by-path/pci-0:1",
        started_at=timestamp(1_800_000_000),
        ended_at=timestamp(1_800_000_001),
        outcome=outcome,
        error="",
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def tamper(store: Records, statement: str) -> None:
    """What someone with write access to the database could do, triggers and all."""
    with store.engine.begin() as connection:
        if store.engine.dialect.name == "sqlite":
            connection.exec_driver_sql("DROP TRIGGER attempts_no_update")
            connection.exec_driver_sql("DROP TRIGGER attempts_no_delete")
        else:
            connection.exec_driver_sql("DROP TRIGGER attempts_append_only ON attempts")
        connection.exec_driver_sql(statement)


def test_each_row_links_to_the_previous_and_the_chain_verifies(records: Records) -> None:
    for index in range(5):
        assert records.append(attempt(f"GW-{index}")) == index + 1
    rows = list(records.rows())
    assert rows[0]["prev_hash"] == GENESIS
    assert all(row["prev_hash"] == before["row_hash"] for before, row in itertools.pairwise(rows))
    assert all(row_hash(row) == row["row_hash"] for row in rows)
    report = records.verify()
    assert (report.rows, report.head) == (5, rows[-1]["row_hash"])


@pytest.mark.parametrize(("column", "value"), [("iat_expires", 10**19), ("agent_id", "\ud800")])
def test_a_value_the_database_or_the_hash_cannot_hold_is_a_records_error(
    records: Records, column: str, value: object
) -> None:
    with pytest.raises(RecordsError, match="cannot append a record"):
        records.append(attempt("GW-1", Outcome.PROVISIONED, **{column: value}))
    assert list(records.rows()) == []


def test_an_altered_row_is_the_first_broken_row_reported(records: Records) -> None:
    for index in range(4):
        records.append(attempt(f"GW-{index}"))
    tamper(records, "UPDATE attempts SET outcome = 'provisioned', error = '' WHERE seq = 3")
    assert records.verify().rows == 4  # the same values again: nothing changed
    tamper_value = "UPDATE attempts SET station = 'elsewhere' WHERE seq = 3"
    with records.engine.begin() as connection:
        connection.exec_driver_sql(tamper_value)
    with pytest.raises(ChainBrokenError) as broken:
        records.verify()
    assert broken.value.row_id == 3


def test_a_deleted_row_breaks_the_chain_at_its_place(records: Records) -> None:
    for index in range(4):
        records.append(attempt(f"GW-{index}"))
    tamper(records, "DELETE FROM attempts WHERE seq = 2")
    with pytest.raises(ChainBrokenError) as broken:
        records.verify()
    assert broken.value.row_id == 2


def test_rows_removed_from_the_end_are_caught_by_an_anchor_kept_elsewhere(records: Records) -> None:
    for index in range(3):
        records.append(attempt(f"GW-{index}"))
    anchor = records.verify()
    records.append(attempt("GW-3"))
    assert records.verify([anchor]).rows == 4  # rows appended since: the anchor still holds
    tamper(records, "DELETE FROM attempts WHERE seq >= 3")
    assert records.verify().rows == 2  # what is left still links
    with pytest.raises(ChainBrokenError, match="ends at row 2, but an anchor names row 3") as broken:
        records.verify([anchor])
    assert broken.value.row_id == 3


def test_an_anchor_whose_row_was_replaced_does_not_hold(records: Records) -> None:
    for index in range(3):
        records.append(attempt(f"GW-{index}"))
    anchor = records.verify()
    # the newest row removed and written again with other content: the chain links, the anchor does not
    tamper(records, "DELETE FROM attempts WHERE seq = 3")
    records.append(attempt("GW-forged"))
    assert records.verify().rows == 3
    with pytest.raises(ChainBrokenError, match="row 3 is not the row the anchor"):
        records.verify([anchor])
    with pytest.raises(ChainBrokenError):  # of two anchors for one row, the wrong one is caught
        records.verify([records.verify(), anchor])


@pytest.mark.parametrize("text", ["", "3", "0:" + "ab" * 32, "3:" + "AB" * 32, "3:abc", "x:" + "ab" * 32])
def test_an_anchor_is_rows_colon_head(text: str) -> None:
    with pytest.raises(ValueError, match="ROWS:HEAD"):
        ChainReport.parse(text)
    assert ChainReport.parse(str(ChainReport(3, "ab" * 32))) == ChainReport(3, "ab" * 32)


def test_updates_and_deletes_are_refused_by_the_database(records: Records) -> None:
    records.append(attempt())
    for statement in ("UPDATE attempts SET error = 'x'", "DELETE FROM attempts"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), records.engine.begin() as connection:
            connection.exec_driver_sql(statement)
    assert records.verify().rows == 1


OPEN_EACH_ON_GO: Final = """
import os, sys
from factory.records import Records
print("ready", flush=True)
for go, path in zip(sys.argv[1::2], sys.argv[2::2]):
    os.read(int(go), 1)  # the end of the pipe: the test closes it for every station at once
    store = Records.open(path, create=True)
    print("started" if store.created else "joined", flush=True)
    store.close()
"""


def test_stations_starting_together_on_a_new_sqlite_file_all_open_it_and_one_starts_it(
    tmp_path: Path,
) -> None:
    """Station processes started at once on a shared SQLite file that does not exist yet: each one opens
    the records (none fails on a table another created meanwhile), and exactly one started them. Five
    new files, one after the other, each released to all the stations at once."""
    paths = [tmp_path / f"records-{round_}.db" for round_ in range(5)]
    pipes = [os.pipe() for _ in paths]
    command = [sys.executable, "-c", OPEN_EACH_ON_GO]
    command += [str(arg) for (go, _), path in zip(pipes, paths, strict=True) for arg in (go, path)]
    gos = [go for go, _ in pipes]
    stations = [
        subprocess.Popen(command, pass_fds=gos, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    said: list[list[bytes]] = []
    try:
        for go in gos:
            os.close(go)
        for station in stations:
            assert station.stdout is not None and station.stdout.readline() == b"ready\n"
        for _, release in pipes:
            os.close(release)
            said.append(sorted(station.stdout.readline() for station in stations if station.stdout))
    finally:
        for _, release in pipes[len(said) :]:
            os.close(release)
        errors = [station.communicate(timeout=60)[1] for station in stations]
    assert [station.returncode for station in stations] == [0] * 4, errors
    assert said == [[b"joined\n"] * 3 + [b"started\n"]] * len(paths)
    store = Records.open(str(paths[-1]))
    try:
        store.append(attempt())
        assert store.verify().rows == 1
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM attempts")
    finally:
        store.close()


def test_stations_appending_at_once_keep_one_intact_chain(records: Records) -> None:
    """Eight stations, each with its own connection pool, append 10 rows each at the same moment."""
    url = records.engine.url.render_as_string(hide_password=False)
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def station(index: int) -> None:
        try:
            store = Records.open(url)
            try:
                barrier.wait(60)
                for row in range(10):
                    store.append(attempt(f"GW-{index}-{row}", station=f"station-{index}"))
            finally:
                store.close()
        except BaseException as error:
            barrier.abort()
            failures.append(error)

    threads = [threading.Thread(target=station, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert records.verify().rows == 80


def test_an_iat_is_claimed_for_one_serial_only(records: Records) -> None:
    records.claim_iat("jti-1", "GW-1")
    records.claim_iat("jti-1", "GW-1")  # the same board again (a re-run): fine
    with pytest.raises(IatError, match="GW-1"):
        records.claim_iat("jti-1", "GW-2")
    assert records.iat_owner("jti-1") == "GW-1"


def contend(records: Records, claims: list[Callable[[Records], None]], lost: type[Exception]) -> list[int]:
    """Each of `claims` on a connection of its own, all released together; the indices of those that did
    not fail with `lost`."""
    url = records.engine.url.render_as_string(hide_password=False)
    barrier = threading.Barrier(len(claims))
    winners: list[int] = []

    def run(index: int) -> None:
        store = Records.open(url)
        try:
            barrier.wait(60)
            claims[index](store)
            winners.append(index)
        except lost:
            pass
        finally:
            store.close()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(claims))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return winners


def test_concurrent_claims_of_one_iat_let_exactly_one_serial_win(records: Records) -> None:
    serials = [f"GW-{index}" for index in range(6)]

    def claim(serial: str) -> Callable[[Records], None]:
        return lambda store: store.claim_iat("contested", serial)

    winners = contend(records, [claim(serial) for serial in serials], IatError)
    assert len(winners) == 1 and records.iat_owner("contested") == serials[winners[0]]


def test_a_second_board_with_a_provisioned_serial_is_a_duplicate(records: Records) -> None:
    records.mark_provisioned("GW-1", "aa" * 32, "jti-1")
    records.mark_provisioned("GW-1", "aa" * 32, "jti-1")
    with pytest.raises(SerialAlreadyProvisionedError):
        records.mark_provisioned("GW-1", "bb" * 32, "jti-2")


# --- serial claims -----------------------------------------------------------------------------------


def serial_claim(token: str, station: str = "station-1", port: str = "/dev/ttyUSB0") -> SerialClaim:
    return SerialClaim("GW-1", token, station, port, timeout=300)


def test_a_serial_is_held_by_one_attempt_until_it_releases_it(records: Records) -> None:
    first = serial_claim("a" * 32)
    records.claim_serial(first)
    # another attempt, even one of a station with the same name on the same port path (a cloned image)
    for other in (serial_claim("b" * 32, "station-2", "/dev/ttyUSB1"), serial_claim("c" * 32)):
        with pytest.raises(SerialInProgressError, match=r"GW-1.*station-1 on /dev/ttyUSB0"):
            records.claim_serial(other)
    records.release_serial(first)
    records.claim_serial(serial_claim("b" * 32, "station-2"))


def test_a_claim_is_taken_over_only_once_it_expired_without_a_check_in(records: Records) -> None:
    stalled, other = serial_claim("a" * 32), serial_claim("b" * 32, "station-2")
    records.claim_serial(stalled)
    age_claims(records, 200)
    records.check_in(stalled)  # renewed: another 300 s from now
    age_claims(records, 200)
    with pytest.raises(SerialInProgressError, match="frees itself at"):
        records.claim_serial(other)  # 200 s after the check-in: still held
    age_claims(records, 101)
    records.claim_serial(other)
    with pytest.raises(SerialInProgressError, match="taken over"):
        records.check_in(stalled)  # the stalled attempt must write nothing more
    records.release_serial(stalled)  # ends its own claim only: the new holder keeps the serial
    records.check_in(other)
    with pytest.raises(SerialInProgressError, match="station-2"):
        records.claim_serial(serial_claim("c" * 32))


def test_concurrent_claims_of_one_serial_let_exactly_one_attempt_win(records: Records) -> None:
    claims = [serial_claim(str(index) * 32, port=f"/dev/ttyUSB{index}") for index in range(6)]

    def claim(attempt: SerialClaim) -> Callable[[Records], None]:
        return lambda store: store.claim_serial(attempt)

    winners = contend(records, [claim(attempt) for attempt in claims], SerialInProgressError)
    assert len(winners) == 1
    records.check_in(claims[winners[0]])


def test_a_claims_table_of_an_earlier_shape_is_made_anew_when_the_records_open(records: Records) -> None:
    with records.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE serial_claims")
        connection.exec_driver_sql(
            "CREATE TABLE serial_claims (serial_number VARCHAR(128) PRIMARY KEY, token VARCHAR(64) NOT NULL, "
            "station VARCHAR(255) NOT NULL, port VARCHAR(1024) NOT NULL, checked_in_at FLOAT NOT NULL)"
        )
    reopened = Records.open(records.engine.url.render_as_string(hide_password=False))
    try:
        reopened.claim_serial(serial_claim("a" * 32))
        reopened.check_in(serial_claim("a" * 32))
    finally:
        reopened.close()

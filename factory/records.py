"""The station's records: one row per provisioning attempt, append-only and hash-chained, plus the claims
that keep one IAT out of two boards.

Tables (SQLAlchemy Core; SQLite by default, PostgreSQL when several stations share a line):

- ``attempts``: the chain. Row ``seq`` N carries ``prev_hash`` = the ``row_hash`` of row N-1 (64 zeros for
  row 1) and ``row_hash`` = SHA-256 of the canonical JSON (sorted keys, no blanks) of every other column,
  ``prev_hash`` included. ``seq`` and ``prev_hash`` are both UNIQUE, so two stations appending at once
  cannot both extend the same row: the loser's insert fails and it retries on the new head. Triggers refuse
  UPDATE and DELETE; whoever bypasses them (or edits the file) is caught by `Records.verify`, which reports
  the first row whose hash or link does not hold.
- ``iat_claims``: ``jti`` PRIMARY KEY -> serial number, taken before the IAT is written to a board and never
  released (an answer lost on the line may hide a committed write): the database, not the station, makes
  sure an IAT goes to one serial number only.
- ``boards``: serial number PRIMARY KEY -> the lock digest, written when a board is locked and verified; an
  unlocked board presenting a serial number found here is a duplicate serial, refused.
- ``serial_claims``: serial number PRIMARY KEY -> the attempt writing a board with that serial right now
  (its token, station, port, last check-in and expiry), taken before the boarding configuration is
  fetched and released when the attempt ends. Two boards with one serial number on two ports (or two
  stations) at once would otherwise both pass the ``boards`` check, both receive the same IAT and both be
  locked: the second is refused before anything is written. An attempt checks in before each writing step;
  a claim left by a station that stopped expires once it has gone without a check-in for its timeout. Claim
  times come from the database's clock, so stations whose clocks differ still agree on expiry.

Records keep the IAT's ``jti`` and expiry, never the token.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from .errors import (
    ChainBrokenError,
    IatError,
    RecordsError,
    RecordsNotFoundError,
    SerialAlreadyProvisionedError,
    SerialInProgressError,
)

GENESIS: Final = "0" * 64
_SCHEMA_LOCK: Final = 0x6D657273  # "mers": the advisory lock key of the schema setup
APPEND_ATTEMPTS: Final = 200

metadata = sa.MetaData()

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("serial_number", sa.String(128), nullable=False, index=True),
    sa.Column("agent_id", sa.String(128)),
    sa.Column("key_hashes", sa.Text, nullable=False),
    sa.Column("boarding_sha256", sa.String(64)),
    sa.Column("ca_sha256", sa.String(64)),
    sa.Column("network_sha256", sa.String(64)),
    sa.Column("lock_digest", sa.String(64)),
    sa.Column("iat_jti", sa.String(256)),
    sa.Column("iat_expires", sa.BigInteger),
    sa.Column("station", sa.String(255), nullable=False),
    sa.Column("port", sa.String(1024), nullable=False),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("ended_at", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("row_hash", sa.String(64), nullable=False),
)

iat_claims = sa.Table(
    "iat_claims",
    metadata,
    sa.Column("jti", sa.String(256), primary_key=True),
    sa.Column("serial_number", sa.String(128), nullable=False),
    sa.Column("claimed_at", sa.String(32), nullable=False),
)

boards = sa.Table(
    "boards",
    metadata,
    sa.Column("serial_number", sa.String(128), primary_key=True),
    sa.Column("lock_digest", sa.String(64), nullable=False),
    sa.Column("iat_jti", sa.String(256)),
    sa.Column("provisioned_at", sa.String(32), nullable=False),
)

serial_claims = sa.Table(
    "serial_claims",
    metadata,
    sa.Column("serial_number", sa.String(128), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("station", sa.String(255), nullable=False),
    sa.Column("port", sa.String(1024), nullable=False),
    # seconds since the epoch by the database's clock (one clock for every station): compared, never hashed
    sa.Column("checked_in_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

_APPEND_ONLY_SQLITE: Final = [
    f"CREATE TRIGGER IF NOT EXISTS attempts_no_{verb.lower()} BEFORE {verb} ON attempts "
    "BEGIN SELECT RAISE(ABORT, 'the records are append-only'); END"
    for verb in ("UPDATE", "DELETE")
]
_APPEND_ONLY_POSTGRESQL: Final = [
    "CREATE OR REPLACE FUNCTION attempts_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the records are append-only'; END $$",
    "DROP TRIGGER IF EXISTS attempts_append_only ON attempts",
    "CREATE TRIGGER attempts_append_only BEFORE UPDATE OR DELETE ON attempts "
    "FOR EACH STATEMENT EXECUTE FUNCTION attempts_append_only()",
]


class Outcome(enum.StrEnum):
    PROVISIONED = "provisioned"
    ALREADY_PROVISIONED = "already_provisioned"
    FAILED = "failed"


@dataclass(frozen=True)
class Attempt:
    """One attempt as the station saw it; the chain columns are added by `Records.append`."""

    serial_number: str
    agent_id: str | None
    key_hashes: str  # comma-separated hex SHA-256 of the keys, in slot order
    boarding_sha256: str | None
    ca_sha256: str | None
    network_sha256: str | None
    lock_digest: str | None
    iat_jti: str | None
    iat_expires: int | None
    station: str
    port: str
    started_at: str
    ended_at: str
    outcome: Outcome
    error: str


@dataclass(frozen=True)
class SerialClaim:
    """An attempt's hold on a serial number: `token` is its own, so no other attempt (even one of the
    same station name, as cloned station images have) can pass for it; `timeout` is how long the claim
    stands without a check-in before another attempt may take it over."""

    serial_number: str
    token: str
    station: str
    port: str
    timeout: float


def timestamp(seconds: float | None = None) -> str:
    """UTC, ISO 8601 with microseconds: text, so it hashes the same on every database."""
    moment = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of every column of `row` but ``row_hash``."""
    content = {key: value for key, value in row.items() if key != "row_hash"}
    data = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """The chain as a verify saw it: its length and the hash of its last row. Written `ROWS:HEAD`, it is
    an anchor: kept outside the database, it lets a later verify prove that no row was removed since."""

    rows: int
    head: str

    def __str__(self) -> str:
        return f"{self.rows}:{self.head}"

    @property
    def anchor(self) -> str | None:
        """`ROWS:HEAD` as `parse` reads it back; None for an empty chain. An anchor names a row that must
        still be there: ``0:`` and the genesis hash would hold for every chain, one emptied since too, so
        `parse` refuses it rather than let it pass for a tamper check."""
        return str(self) if self.rows else None

    @classmethod
    def parse(cls, text: str) -> ChainReport:
        rows, _, head = text.strip().partition(":")
        if not (
            rows.isascii()
            and rows.isdigit()
            and int(rows) > 0
            and len(head) == 64
            and all(c in "0123456789abcdef" for c in head)
        ):
            raise ValueError(
                f"an anchor is ROWS:HEAD as `records verify` prints it (e.g. 12:{'ab' * 32}), not {text!r}"
            )
        return cls(int(rows), head)


def database_url(text: str) -> str:
    """A database URL; a plain path means a SQLite file."""
    return text if "://" in text else f"sqlite:///{Path(text).absolute()}"


def sqlite_file(text: str) -> Path | None:
    """The absolute path of the SQLite file that `text` (a URL or a plain path) names; None for another
    database, an in-memory one, or a ``file:`` URI (whose own ``mode`` says whether it may be created)."""
    url = sa.engine.make_url(database_url(text))
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database).absolute()


class Records:
    """The records database. Safe to share between threads. Each method is atomic: one transaction, or
    (`append`, the claims) a first one and, when another station got there first, another one that
    reads what it did.

    `created` says that opening them set their tables up: a new, empty record set."""

    def __init__(self, engine: Engine, *, created: bool = False) -> None:
        self.engine = engine
        self.created = created

    @classmethod
    def open(cls, url: str, *, create: bool = False) -> Records:
        """The records at `url` (a URL, or a SQLite file's path), their tables set up if they lack them.

        A SQLite file that does not exist is a `RecordsNotFoundError` unless `create`: SQLite would make
        an empty one, and a station run from another directory, or given a mistyped path, would then
        check serial numbers and IATs against nothing, and a verify would call a missing record set
        intact. Any other database must exist anyway (`create` changes nothing there)."""
        try:
            path = sqlite_file(url)
            if path is not None and not create and not path.exists():
                raise RecordsNotFoundError(path)
            url = database_url(url)
            options: dict[str, Any] = {}
            if url.startswith("sqlite"):
                options["connect_args"] = {"timeout": 30}
            engine = sa.create_engine(url, **options)
            with engine.begin() as connection:
                created = _create_schema(connection)
        except (SQLAlchemyError, ImportError, ValueError) as error:
            raise RecordsError(f"cannot open the records database: {_reason(error)}") from None
        return cls(engine, created=created)

    def close(self) -> None:
        self.engine.dispose()

    # --- the chain

    def append(self, attempt: Attempt) -> int:
        """Append `attempt` at the head of the chain; returns its ``seq``."""
        values = {**asdict(attempt), "outcome": attempt.outcome.value}
        for round_ in range(APPEND_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    head = connection.execute(
                        sa.select(attempts.c.seq, attempts.c.row_hash)
                        .order_by(attempts.c.seq.desc())
                        .limit(1)
                    ).first()
                    seq, prev = (1, GENESIS) if head is None else (head.seq + 1, head.row_hash)
                    row = {**values, "seq": seq, "prev_hash": prev}
                    connection.execute(sa.insert(attempts).values(**row, row_hash=row_hash(row)))
                return seq
            except (IntegrityError, OperationalError) as error:
                if isinstance(error, OperationalError) and "locked" not in str(error):
                    raise RecordsError(f"cannot append a record: {_reason(error)}") from None
                time.sleep(
                    0.001 * (round_ % 20)
                )  # another station extended the chain first: try the new head
            except SQLAlchemyError as error:
                raise RecordsError(f"cannot append a record: {_reason(error)}") from None
            except (ValueError, OverflowError) as error:  # a value the database or the hash cannot hold
                raise RecordsError(f"cannot append a record: {error}") from None
        raise RecordsError("cannot append a record: the chain head kept moving")

    def rows(self, serial_number: str | None = None) -> Iterator[dict[str, Any]]:
        query = sa.select(attempts).order_by(attempts.c.seq)
        if serial_number is not None:
            query = query.where(attempts.c.serial_number == serial_number)
        try:
            with self.engine.connect() as connection:
                for row in connection.execute(query):
                    yield dict(row._mapping)
        except SQLAlchemyError as error:
            raise RecordsError(f"cannot read the records: {_reason(error)}") from None

    def verify(self, anchors: Sequence[ChainReport] = ()) -> ChainReport:
        """Walk the chain from row 1; `ChainBrokenError` names the first row that does not hold.

        The chain alone cannot show that its newest rows were deleted: what is left still links. Each of
        `anchors` (a report printed by an earlier verify and kept elsewhere) must still hold: its row is
        there, with the hash it had then."""
        expected: dict[int, set[str]] = {}
        for anchor in anchors:
            expected.setdefault(anchor.rows, set()).add(anchor.head)
        previous, expected_seq = GENESIS, 1
        for row in self.rows():
            seq = row["seq"]
            if seq != expected_seq:
                raise ChainBrokenError(f"row {expected_seq} is missing (next is {seq})", expected_seq)
            if row["prev_hash"] != previous:
                raise ChainBrokenError(f"row {seq} does not link to row {seq - 1}", seq)
            if row_hash(row) != row["row_hash"]:
                raise ChainBrokenError(f"row {seq} was altered: its hash does not match", seq)
            for head in expected.get(seq, ()):
                if head != row["row_hash"]:
                    raise ChainBrokenError(f"row {seq} is not the row the anchor {seq}:{head} names", seq)
            previous, expected_seq = row["row_hash"], seq + 1
        rows = expected_seq - 1
        if expected and max(expected) > rows:
            missing = min(seq for seq in expected if seq > rows)
            raise ChainBrokenError(
                f"the chain ends at row {rows}, but an anchor names row {missing}: "
                "rows were removed from its end",
                rows + 1,
            )
        return ChainReport(rows, previous)

    # --- claims

    def claim_iat(self, jti: str, serial_number: str) -> None:
        """Claim IAT `jti` for `serial_number` (again: fine); another serial's claim is an `IatError`."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    sa.insert(iat_claims).values(jti=jti, serial_number=serial_number, claimed_at=timestamp())
                )
            return
        except IntegrityError:
            pass
        except SQLAlchemyError as error:
            raise RecordsError(f"cannot claim the IAT: {_reason(error)}") from None
        owner = self.iat_owner(jti)
        if owner != serial_number:
            raise IatError(f"the IAT (jti {jti}) is already claimed for {owner}; it is never burned twice")

    def iat_owner(self, jti: str) -> str | None:
        return self._text(sa.select(iat_claims.c.serial_number).where(iat_claims.c.jti == jti))

    def provisioned_digest(self, serial_number: str) -> str | None:
        return self._text(sa.select(boards.c.lock_digest).where(boards.c.serial_number == serial_number))

    def mark_provisioned(self, serial_number: str, lock_digest: str, jti: str | None) -> None:
        """Remember a locked, verified board; the same digest again is fine, another one a duplicate."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    sa.insert(boards).values(
                        serial_number=serial_number,
                        lock_digest=lock_digest,
                        iat_jti=jti,
                        provisioned_at=timestamp(),
                    )
                )
            return
        except IntegrityError:
            pass
        except SQLAlchemyError as error:
            raise RecordsError(f"cannot record the board: {_reason(error)}") from None
        if self.provisioned_digest(serial_number) != lock_digest:
            raise SerialAlreadyProvisionedError(f"another board with serial {serial_number} was provisioned")

    def claim_serial(self, claim: SerialClaim) -> None:
        """Take `claim`'s serial number for its attempt; `SerialInProgressError` while another attempt
        holds it and its claim has not expired (an expired one is taken over)."""
        for _ in range(APPEND_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    now = _database_time(connection)
                    connection.execute(sa.insert(serial_claims).values(**_claim_values(claim, now)))
                return
            except IntegrityError:
                pass
            except SQLAlchemyError as error:
                raise RecordsError(f"cannot claim the serial number: {_reason(error)}") from None
            with self._claims_transaction("claim the serial number") as connection:
                now = _database_time(connection)
                held = connection.execute(
                    sa.select(serial_claims).where(serial_claims.c.serial_number == claim.serial_number)
                ).first()
                if held is None:
                    continue  # released meanwhile: try again
                if held.expires_at > now:
                    raise SerialInProgressError(
                        f"a board with serial {claim.serial_number} is being provisioned by station "
                        f"{held.station} on {held.port} (last check-in {timestamp(held.checked_in_at)}; if "
                        f"that station stopped, its claim frees itself at {timestamp(held.expires_at)}): "
                        "two boards with one serial number?"
                    )
                taken = connection.execute(
                    sa.update(serial_claims)
                    .where(
                        serial_claims.c.serial_number == claim.serial_number,
                        serial_claims.c.token == held.token,
                        serial_claims.c.expires_at == held.expires_at,
                    )
                    .values(**_claim_values(claim, now))
                )
            if taken.rowcount == 1:
                return
        raise RecordsError(f"cannot claim serial {claim.serial_number}: other attempts keep taking it")

    def check_in(self, claim: SerialClaim) -> None:
        """Renew `claim` before a writing step; `SerialInProgressError` if another attempt took it over
        meanwhile (this one stalled past its timeout): the caller must then write nothing more."""
        with self._claims_transaction("renew the serial number's claim") as connection:
            now = _database_time(connection)
            renewed = connection.execute(
                sa.update(serial_claims)
                .where(
                    serial_claims.c.serial_number == claim.serial_number,
                    serial_claims.c.token == claim.token,
                )
                .values(checked_in_at=now, expires_at=now + claim.timeout)
            )
        if renewed.rowcount != 1:
            raise SerialInProgressError(
                f"this attempt's claim on serial {claim.serial_number} was taken over by another board's "
                "attempt while it stalled; nothing more is written"
            )

    def release_serial(self, claim: SerialClaim) -> None:
        """End `claim` (only ours: a claim taken over meanwhile stays with its new holder)."""
        with self._claims_transaction("release the serial number") as connection:
            connection.execute(
                sa.delete(serial_claims).where(
                    serial_claims.c.serial_number == claim.serial_number,
                    serial_claims.c.token == claim.token,
                )
            )

    @contextlib.contextmanager
    def _claims_transaction(self, doing: str) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as error:
            raise RecordsError(f"cannot {doing}: {_reason(error)}") from None

    def _text(self, query: sa.Select[Any]) -> str | None:
        try:
            with self.engine.connect() as connection:
                value = connection.execute(query).scalar()
                return None if value is None else str(value)
        except SQLAlchemyError as error:
            raise RecordsError(f"cannot read the records: {_reason(error)}") from None


def _create_schema(connection: Connection) -> bool:
    """Tables and append-only triggers, once; True if this call created the chain's table (a new record
    set). Stations starting together on new records would each find a table missing and create it, and
    all but the first would fail ("table attempts already exists"; on PostgreSQL "tuple concurrently
    updated"), so the setup is serialised: on PostgreSQL by a transaction-scoped advisory lock, on SQLite
    by ``BEGIN IMMEDIATE``, which takes the file's write lock before the first look at the schema (the
    others wait for it, within the busy timeout). SQLite's DDL is transactional, so the whole setup, the
    triggers and a remade claims table included, is also seen by others all at once or not at all. Retrying
    on "already exists" instead would still let a station see tables without their triggers, and race
    again on the next table."""
    dialect = connection.engine.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
    elif dialect == "sqlite":
        # the driver itself begins a transaction only before a data change, never before DDL: begin here
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    existing = sa.inspect(connection)
    created = not existing.has_table(attempts.name)
    if existing.has_table(serial_claims.name):
        columns = {column["name"] for column in existing.get_columns(serial_claims.name)}
        if columns != {column.name for column in serial_claims.columns}:
            # an earlier shape of the table: it only ever holds claims of attempts under way, so it is
            # made anew (an attempt under way when the station was upgraded has to be run again)
            serial_claims.drop(connection)
    metadata.create_all(connection)
    statements = {"sqlite": _APPEND_ONLY_SQLITE, "postgresql": _APPEND_ONLY_POSTGRESQL}.get(dialect, [])
    for statement in statements:
        connection.exec_driver_sql(statement)
    return created


def _claim_values(claim: SerialClaim, now: float) -> dict[str, Any]:
    return {
        "serial_number": claim.serial_number,
        "token": claim.token,
        "station": claim.station,
        "port": claim.port,
        "checked_in_at": now,
        "expires_at": now + claim.timeout,
    }


def _database_time(connection: Connection) -> float:
    """Seconds since the epoch by the database's clock: stations sharing a database judge each other's
    claims by one clock, however far their own ones drift (SQLite's file is local: the host's clock)."""
    if connection.engine.dialect.name == "postgresql":
        query = "SELECT extract(epoch from clock_timestamp())"
    else:
        query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    return float(connection.exec_driver_sql(query).scalar_one())


def _reason(error: Exception) -> str:
    """The driver's first line, without the SQL and parameters SQLAlchemy appends (or a URL's password)."""
    original = getattr(error, "orig", None)
    text = str(original if original is not None else error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__

"""Engines and sessions: SQLite (the default, one file in the hub directory) or PostgreSQL.

SQLite gets WAL (readers never block the writer), a busy timeout (writers queue rather than fail under
the load of many agents registering at once) and enforced foreign keys; its file is 0600, since it holds
agents' shared secrets."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import HubSetupError, InsufficientStorageError
from .models import Agent, Base


def open_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for `url`, with the SQLite settings above; a bad URL or an unreachable server is a
    `HubSetupError` naming the database (never its password). Without `create`, a SQLite file that does
    not exist is refused rather than created (a mistyped path must not leave an empty database behind)."""
    try:
        # a failed statement's error text quotes its parameters unless hidden, and the server logs that
        # error: a renewal's new client secret or an IAT would land in the log
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    except (ArgumentError, ImportError, ValueError) as exc:  # ValueError: a port that is not a number
        raise HubSetupError(f"unusable database URL: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
        database = engine.url.database
        if database and database != ":memory:" and not os.path.exists(database):
            if not create:
                engine.dispose()
                raise HubSetupError(f"the hub's database {database} does not exist: is database_url right?")
            try:
                fd = os.open(database, os.O_CREAT | os.O_WRONLY, 0o600)
            except OSError as exc:
                engine.dispose()
                raise HubSetupError(f"cannot create the hub's database {database}: {exc.strerror}") from exc
            os.close(fd)
    return engine


def _configure_sqlite(connection: Any, _record: object) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# the key of the advisory lock under which hub servers sharing a PostgreSQL database create tables
_SCHEMA_LOCK = 0x6D657273_6875  # "mershu"


def create_schema(engine: Engine, *, existing: bool = False) -> None:
    """Create the tables the hub lacks: all of them at `mers-hub init`; with `existing` (every start),
    only the ones a newer version added, in a database that holds a hub already, so a hub made by an
    older version keeps working while a mistyped `database_url` is refused rather than set up as a blank
    hub. Servers starting together on one PostgreSQL database would race on its catalog, so there it runs
    under an advisory lock."""
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            if existing and not inspect(connection).has_table(Agent.__tablename__):
                raise HubSetupError(
                    f"{where} holds no hub (it has no {Agent.__tablename__} table): is database_url in "
                    "hub.toml right?"
                )
            Base.metadata.create_all(connection)
    except SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        raise HubSetupError(f"cannot create the hub's tables in {where}: {reason}") from exc


class Database:
    """The hub's session factory; `transaction()` commits on success and rolls back on any error."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end, or rolls back. A database whose disk is full is an
        `InsufficientStorageError` (507: retry once space is freed), as a full blob directory is, not a
        500 with a traceback."""
        try:
            with self._sessions.begin() as session:
                yield session
        except DBAPIError as exc:
            if _disk_full(exc):
                raise InsufficientStorageError(
                    "the hub's database has no room left: nothing was changed"
                ) from exc
            raise

    def dispose(self) -> None:
        self.engine.dispose()


#: PostgreSQL's SQLSTATE for "could not extend file: No space left on device"
_PG_DISK_FULL = "53100"


def _disk_full(error: DBAPIError) -> bool:
    """Whether the driver's error is the database's disk being full (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full); other errors stay what they are."""
    cause = error.orig
    return (
        getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or getattr(cause, "sqlstate", None) == _PG_DISK_FULL
    )

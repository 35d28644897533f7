"""The hub's storage: both databases it supports hold the same tables, and a hub directory's files keep
agents' secrets to their owner."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import pytest
import sqlalchemy

from hub.database import Database, create_schema, open_engine
from hub.errors import InsufficientStorageError
from hub.models import Agent, Base
from tests.conftest import small_filesystem
from tests.hub_helpers import RunningHub


def _tables(url: str) -> set[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_sqlite_hub_creates_every_table_in_a_file_only_its_owner_reads(hub: RunningHub) -> None:
    database = hub.root / "hub.db"
    assert _tables(f"sqlite:///{database}") == set(Base.metadata.tables)
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


def test_a_postgresql_hub_creates_every_table_and_serves(postgres_hub: RunningHub) -> None:
    url = postgres_hub.state.settings.database_url
    assert _tables(url) == set(Base.metadata.tables)
    assert not (postgres_hub.root / "hub.db").exists()
    response = postgres_hub.admin("GET", "/openapi.json")
    assert response.status_code == 200


def test_a_database_whose_disk_is_full_is_insufficient_storage_not_a_crash(tmp_path: Path) -> None:
    """SQLite on a filesystem with no room left: the write is an `InsufficientStorageError` (507 to a
    client, as a full blob directory is; it was a 500 with a traceback), and nothing of it is kept."""
    with small_filesystem(tmp_path / "small", 1 << 20) as small:
        engine = open_engine(f"sqlite:///{small / 'hub.db'}")
        create_schema(engine)
        database = Database(engine)
        with (small / "filler").open("wb") as filler, contextlib.suppress(OSError):
            while True:  # until ENOSPC
                filler.write(bytes(64 << 10))
                filler.flush()
        with pytest.raises(InsufficientStorageError, match="no room left"), database.transaction() as session:
            for index in range(200):
                session.add(
                    Agent(
                        id=f"{index:032x}",
                        name=f"gw-{index}",
                        security_profile="SHARED_SECRET",
                        description="x" * 4000,
                        created_at=1.0,
                        updated_at=1.0,
                        status_updated_at=1.0,
                    )
                )
        (small / "filler").unlink()
        with database.transaction() as session:
            assert session.scalar(sqlalchemy.select(sqlalchemy.func.count()).select_from(Agent)) == 0
        engine.dispose()

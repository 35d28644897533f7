"""The hub's storage: both databases it supports hold the same tables, and a hub directory's files keep
agents' secrets to their owner."""

from __future__ import annotations

import stat

import sqlalchemy

from hub.models import Base
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

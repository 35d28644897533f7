"""Agents and their data source configurations: the operator's side of agent management.

Each operation is a small function over a SQLAlchemy `Session` (the caller owns the transaction). An
update or delete is one conditional statement on the eTag the client named, so the `If-Match` check and
the write cannot race. Boarding (IATs, status, offboarding) lives in `boarding`.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .datasources import EMPTY_DOCUMENT
from .errors import ConflictError, LimitReachedError, NotFoundError, PreconditionFailedError
from .etags import EtagCondition, check_etag
from .models import Agent, BoardingStatus, DataSourceConfiguration, SecurityProfile
from .timefmt import iso

MAX_PAGE_SIZE = 500


def agent_json(agent: Agent) -> dict[str, str]:
    """An agent as the platform shows it."""
    return {
        "id": agent.id,
        "name": agent.name,
        "securityProfile": agent.security_profile,
        "description": agent.description,
        "eTag": str(agent.etag),
        "createdAt": iso(agent.created_at),
        "updatedAt": iso(agent.updated_at),
    }


@dataclass(frozen=True)
class AgentPage:
    """One page of agents, in the platform's (Spring Data) page shape."""

    agents: list[Agent]
    page: int
    size: int
    total: int

    def to_json(self) -> dict[str, Any]:
        pages = math.ceil(self.total / self.size)
        return {
            "content": [agent_json(agent) for agent in self.agents],
            "number": self.page,
            "size": self.size,
            "totalElements": self.total,
            "totalPages": pages,
            "first": self.page == 0,
            "last": self.page >= pages - 1,
            "numberOfElements": len(self.agents),
        }


def rowcount(result: object) -> int:
    """Rows matched by an UPDATE or DELETE: how a conditional statement tells whether it won."""
    return cast("CursorResult[Any]", result).rowcount


def get_agent(session: Session, agent_id: str) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFoundError(f"no agent {agent_id!r}")
    return agent


def create_agent(
    session: Session, *, name: str, profile: SecurityProfile, description: str, now: float, max_agents: int
) -> Agent:
    """A new agent with an empty data source configuration; 409 on a taken name or a full tenant."""
    _take_creation_turn(session)
    _check_name_free(session, name)
    if _count(session) >= max_agents:
        raise LimitReachedError(f"the hub already has its maximum of {max_agents} agents")
    agent = Agent(
        id=uuid.uuid4().hex,
        name=name,
        security_profile=profile.value,
        description=description,
        etag=1,
        created_at=now,
        updated_at=now,
        boarding_status=BoardingStatus.NOT_ONBOARDED.value,
        status_updated_at=now,
    )
    session.add(agent)
    session.add(DataSourceConfiguration(agent_id=agent.id, etag=1, document=json.dumps(EMPTY_DOCUMENT)))
    _flush_unique_name(session, name)
    # counted again after the insert: on SQLite the insert holds the write lock, so two concurrent
    # creations cannot both see room for one more (PostgreSQL took its turn above)
    if _count(session) > max_agents:
        raise LimitReachedError(f"the hub already has its maximum of {max_agents} agents")
    return agent


def list_agents(session: Session, *, page: int, size: int, name: str | None) -> AgentPage:
    query = select(Agent)
    counted = select(func.count()).select_from(Agent)
    if name is not None:
        query = query.where(Agent.name == name)
        counted = counted.where(Agent.name == name)
    total = session.scalar(counted) or 0
    rows = session.scalars(query.order_by(Agent.created_at, Agent.id).offset(page * size).limit(size))
    return AgentPage(list(rows), page, size, total)


def update_agent(
    session: Session,
    agent_id: str,
    *,
    if_match: EtagCondition,
    name: str,
    profile: SecurityProfile,
    description: str,
    now: float,
) -> Agent:
    """Rename, redescribe or re-profile an agent. Changing the profile of an onboarded agent is 409: its
    registered credentials are of the old kind (offboard it first)."""
    agent = get_agent(session, agent_id)
    expected_etag = if_match.check(agent.etag)
    profile_changes = profile.value != agent.security_profile
    if profile_changes and agent.boarding_status == BoardingStatus.ONBOARDED:
        raise ConflictError("the agent is onboarded: offboard it before changing its security profile")
    if name != agent.name:
        _check_name_free(session, name, renamed=agent_id)
    conditions = [Agent.id == agent_id, Agent.etag == expected_etag]
    if profile_changes:
        # a registration completing meanwhile must not end up with credentials of the old profile
        conditions.append(Agent.boarding_status != BoardingStatus.ONBOARDED.value)
    statement = (
        update(Agent)
        .where(*conditions)
        .values(
            name=name,
            security_profile=profile.value,
            description=description,
            etag=Agent.etag + 1,
            updated_at=now,
        )
    )
    try:
        result = session.execute(statement)
    except IntegrityError as exc:  # the unique index has the last word when two take one name at once
        raise ConflictError(f"an agent named {name!r} already exists") from exc
    if rowcount(result) != 1:
        session.refresh(agent)
        check_etag(expected_etag, agent.etag)
        raise ConflictError("the agent was onboarded meanwhile: offboard it before changing its profile")
    session.refresh(agent)
    return agent


def delete_agent(session: Session, agent_id: str, *, if_match: EtagCondition) -> None:
    """Remove the agent, its data source configuration and its credentials (its access tokens die with
    it: they are honoured only for an existing, onboarded agent)."""
    agent = get_agent(session, agent_id)
    expected_etag = if_match.check(agent.etag)
    session.execute(delete(DataSourceConfiguration).where(DataSourceConfiguration.agent_id == agent_id))
    result = session.execute(delete(Agent).where(Agent.id == agent_id, Agent.etag == expected_etag))
    if rowcount(result) != 1:
        raise PreconditionFailedError(f"agent {agent_id!r} changed meanwhile: read it again")


@dataclass(frozen=True)
class StoredConfiguration:
    document: dict[str, Any]
    etag: int

    def to_json(self) -> dict[str, Any]:
        return {**self.document, "eTag": str(self.etag)}


def data_source_configuration(session: Session, agent_id: str) -> StoredConfiguration:
    get_agent(session, agent_id)
    row = session.get(DataSourceConfiguration, agent_id)
    if row is None:
        return StoredConfiguration(dict(EMPTY_DOCUMENT), 1)
    return StoredConfiguration(json.loads(row.document), row.etag)


def replace_data_source_configuration(
    session: Session, agent_id: str, document: dict[str, Any], *, if_match: EtagCondition
) -> StoredConfiguration:
    """Store a validated document (see `datasources`) if `if_match` names the current version."""
    current = data_source_configuration(session, agent_id)
    expected_etag = if_match.check(current.etag)
    text = json.dumps(document)
    if session.get(DataSourceConfiguration, agent_id) is None:
        session.add(DataSourceConfiguration(agent_id=agent_id, etag=2, document=text))
        session.flush()
        return StoredConfiguration(document, 2)
    result = session.execute(
        update(DataSourceConfiguration)
        .where(DataSourceConfiguration.agent_id == agent_id, DataSourceConfiguration.etag == expected_etag)
        .values(document=text, etag=DataSourceConfiguration.etag + 1)
    )
    if rowcount(result) != 1:
        raise PreconditionFailedError("the configuration changed meanwhile: read it again")
    return StoredConfiguration(document, expected_etag + 1)


#: a PostgreSQL advisory lock key of our own ("mersagnt"), held by an agent creation until it commits
_CREATION_LOCK_KEY = 0x6D657273_61676E74


def _take_creation_turn(session: Session) -> None:
    """On PostgreSQL, creations take turns until their transaction ends: at READ COMMITTED two of them
    would each count the agents without the other's uncommitted row and both pass `max_agents` (seen
    with 16 at once). Behind the lock, each statement's snapshot holds every creation committed before.
    SQLite needs nothing: its writers are serialised by the database lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATION_LOCK_KEY})


def _count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Agent)) or 0


def _check_name_free(session: Session, name: str, *, renamed: str | None = None) -> None:
    """An agent's name is its device's serial number, as the factory names it: two names that differ only
    in case would be two agents for one board, and a task for the one the board is not onboarded as
    would never reach it. (`renamed`: the agent being renamed, which may change the case of its own.)"""
    taken = session.scalars(
        select(Agent.name).where(func.lower(Agent.name) == name.lower(), Agent.id != (renamed or ""))
    ).first()
    if taken == name:
        raise ConflictError(f"an agent named {name!r} already exists")
    if taken is not None:
        raise ConflictError(
            f"an agent named {taken!r} already exists, and names that differ only in case would name one "
            f"device twice: use {taken!r} (an agent is named after its board's serial number)"
        )


def _flush_unique_name(session: Session, name: str) -> None:
    """The unique index has the last word when two requests take the same name at once."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"an agent named {name!r} already exists") from exc

"""Boarding: an agent's boarding configuration (with its IAT), its boarding status, and offboarding.

- The IAT is minted on the first request for the configuration, by one conditional UPDATE, so two
  concurrent first requests (two factory stations) are handed the same IAT rather than one that the other
  silently invalidated. Later requests return that same IAT, used or expired, as the platform does; only
  offboarding makes a new one.
- Offboarding revokes everything the agent holds in one UPDATE: credentials, RATs (current and previous),
  and, through `credential_generation`, every access token issued so far; the old IAT stops working
  because a fresh one replaces it.
- Status: NOT_ONBOARDED, then ONBOARDING once the configuration was handed out (or while a registration
  is in progress), then ONBOARDED once registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from .agents import get_agent
from .models import Agent, BoardingStatus
from .state import HubState
from .timefmt import iso
from .tokens import IssuedToken, TokenKind


@dataclass(frozen=True)
class BoardingConfiguration:
    base_url: str
    iat: str
    profile: str
    client_id: str
    tenant: str
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "content": {
                "baseUrl": self.base_url,
                "iat": self.iat,
                "clientCredentialProfile": [self.profile],
                "clientId": self.client_id,
                "tenant": self.tenant,
            },
            "expiration": iso(self.expires_at),
        }


@dataclass(frozen=True)
class BoardingState:
    status: BoardingStatus
    updated_at: float

    def to_json(self) -> dict[str, str]:
        return {"status": self.status.value, "updatedAt": iso(self.updated_at)}


def mint_iat(state: HubState, agent_id: str) -> IssuedToken:
    """An Initial Access Token for `agent_id`: RS256 by the hub, audience IAT only, `sub` the client id."""
    return state.issuer.mint(
        TokenKind.IAT, agent_id, state.settings.iat_lifetime, {"ten": state.settings.tenant}
    )


def _iat_values(issued: IssuedToken) -> dict[str, Any]:
    return {
        "iat": issued.token,
        "iat_jti": issued.jti,
        "iat_expires_at": issued.expires_at,
        "iat_used": False,
        "registering_since": None,
    }


def boarding_configuration(session: Session, state: HubState, agent_id: str) -> BoardingConfiguration:
    """The configuration a gateway is given at the factory; handing it out makes the agent ONBOARDING."""
    agent = get_agent(session, agent_id)
    if agent.iat is None:
        session.execute(
            update(Agent)
            .where(Agent.id == agent_id, Agent.iat.is_(None))
            .values(**_iat_values(mint_iat(state, agent_id)))
        )
    if agent.boarding_status == BoardingStatus.NOT_ONBOARDED:
        session.execute(
            update(Agent)
            .where(Agent.id == agent_id, Agent.boarding_status == BoardingStatus.NOT_ONBOARDED.value)
            .values(boarding_status=BoardingStatus.ONBOARDING.value, status_updated_at=state.clock())
        )
    session.refresh(agent)  # our IAT, or the one of a concurrent request that won
    assert agent.iat is not None and agent.iat_expires_at is not None
    return BoardingConfiguration(
        state.base_url,
        agent.iat,
        agent.security_profile,
        agent.id,
        state.settings.tenant,
        agent.iat_expires_at,
    )


def boarding_state(session: Session, state: HubState, agent_id: str) -> BoardingState:
    agent = get_agent(session, agent_id)
    status = BoardingStatus(agent.boarding_status)
    registering = agent.registering_since is not None and (
        agent.registering_since > state.clock() - state.settings.registration_timeout
    )
    if status == BoardingStatus.NOT_ONBOARDED and registering:
        status = BoardingStatus.ONBOARDING
    return BoardingState(status, agent.status_updated_at)


def offboard(session: Session, state: HubState, agent_id: str) -> BoardingState:
    """Revoke the agent's credentials, RATs and access tokens, and replace its IAT with a fresh one."""
    get_agent(session, agent_id)
    now = state.clock()
    session.execute(
        update(Agent)
        .where(Agent.id == agent_id)
        .values(
            **_iat_values(mint_iat(state, agent_id)),
            **revoked_credentials(),
            credential_generation=Agent.credential_generation + 1,
            boarding_status=BoardingStatus.NOT_ONBOARDED.value,
            status_updated_at=now,
        )
    )
    return BoardingState(BoardingStatus.NOT_ONBOARDED, now)


def revoked_credentials() -> dict[str, Any]:
    """The column values of an agent that holds no credentials and no RAT."""
    return {
        "client_secret": None,
        "public_jwk": None,
        "credentials_expire_at": None,
        "rat_jti": None,
        "previous_client_secret": None,
        "previous_public_jwk": None,
        "previous_rat_jti": None,
        "previous_expire_at": None,
    }

"""Who is calling: the operator (the admin token from `mers-hub init`) or an onboarded agent (an access
token from the token endpoint). Secrets are compared in constant time; an access token dies with the
credential generation it was issued for, so offboarding revokes what was handed out before (a renewal
does not: tokens live out their short lifetime)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .errors import ForbiddenError, UnauthorizedError
from .models import Agent, BoardingStatus
from .state import HubState, hub_state
from .tokens import TokenKind


@dataclass(frozen=True)
class Caller:
    """The admin, or the agent `agent_id`."""

    agent_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.agent_id is None

    def check_may_act_for(self, agent_id: str) -> None:
        """An agent acts only for itself; the admin for anyone."""
        if self.agent_id is not None and self.agent_id != agent_id:
            raise ForbiddenError("an agent may only act for itself")


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("a bearer token is required", code="unauthorized")
    return token.strip()


def is_admin_token(token: str, state: HubState) -> bool:
    presented = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    return hmac.compare_digest(presented, state.admin_token_hash)


def require_admin(request: Request, state: Annotated[HubState, Depends(hub_state)]) -> Caller:
    if not is_admin_token(bearer_token(request), state):
        raise UnauthorizedError("the admin token is required", code="unauthorized")
    return Caller()


def agent_from_access_token(token: str, state: HubState) -> Caller:
    claims = state.issuer.verify(token, TokenKind.ACCESS)
    with state.database.transaction() as session:
        agent = session.get(Agent, claims["sub"])
        valid = (
            agent is not None
            and agent.boarding_status == BoardingStatus.ONBOARDED
            and claims.get("cgen") == agent.credential_generation
        )
    if not valid:
        raise UnauthorizedError("the access token was revoked", code="invalid_token")
    return Caller(agent_id=claims["sub"])


def require_caller(request: Request, state: Annotated[HubState, Depends(hub_state)]) -> Caller:
    """The admin or an agent."""
    token = bearer_token(request)
    if is_admin_token(token, state):
        return Caller()
    return agent_from_access_token(token, state)


AdminCaller = Annotated[Caller, Depends(require_admin)]
AnyCaller = Annotated[Caller, Depends(require_caller)]
State = Annotated[HubState, Depends(hub_state)]

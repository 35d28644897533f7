"""Registration and renewal: an agent trades its IAT, then its RAT, for credentials (docs/design.md §6).

Registration, in three steps so that a refused request changes nothing and two racing ones cannot both
win:

1. check the IAT (signature, audience, expiry: `TokenIssuer.verify`), that it is the agent's current one
   and unused (`authenticate_iat`), and only then the body (the JWK for RSA_3072), so a caller without a
   valid IAT learns nothing of what a body must be;
2. claim the registration with one conditional UPDATE of `registering_since`: a second registration while
   the first is in progress gets 429, and a claim older than `registration_timeout` (a crashed client) is
   taken over;
3. complete with one conditional UPDATE that marks the IAT used, so it works once.

Renewal keeps the previous credential set and RAT beside the new ones until the new ones are first used:
a gateway whose renewal answer was lost still holds the previous set and renews again with it; once the
new RAT or credentials are used, the previous ones die (a stolen old RAT is then worthless).

A RAT outlives the credentials it came with (`RAT_LIFETIME`): a gateway that was offline past their
expiry recovers by renewing; the RAT dies when its successor is used, or on offboarding. It too is
checked in full (`authenticate_rat`) before the body is.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from .agents import rowcount
from .boarding import revoked_credentials
from .errors import ConflictError, InvalidRequestError, TooManyRequestsError, UnauthorizedError
from .home import DAY
from .jwks import AgentPublicKey, Jwks, agent_public_key
from .models import Agent, BoardingStatus, SecurityProfile
from .state import HubState
from .tokens import TokenKind

REGISTER_PATH = "/api/agentmanagement/v3/register"
RAT_LIFETIME = 365 * DAY
GRANT_TYPES = ["client_credentials"]
AUTH_METHODS = {
    SecurityProfile.SHARED_SECRET: "client_secret_jwt",
    SecurityProfile.RSA_3072: "private_key_jwt",
}


class RegistrationRequest(BaseModel):
    """`{}` for SHARED_SECRET, `{"jwks": {"keys": [JWK]}}` for RSA_3072; other members are ignored,
    since real clients add their own (client_name...)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    jwks: Jwks | None = None


class RenewalRequest(RegistrationRequest):
    client_id: str = Field(min_length=1, max_length=64)


@dataclass(frozen=True)
class Registration:
    """What a registration or renewal hands the agent; shown once, never stored in clear except the
    shared secret (which the hub needs to verify HS256 assertions)."""

    client_id: str
    profile: SecurityProfile
    client_secret: str | None = field(repr=False)
    public_key: AgentPublicKey | None
    expires_at: float
    registration_access_token: str = field(repr=False)
    rat_jti: str
    registration_client_uri: str

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"client_id": self.client_id}
        if self.client_secret is not None:
            body["client_secret"] = self.client_secret
        if self.public_key is not None:
            body["jwks"] = self.public_key.to_jwks()
        body.update(
            {
                "client_secret_expires_at": int(self.expires_at),
                "registration_access_token": self.registration_access_token,
                "registration_client_uri": self.registration_client_uri,
                "grant_types": GRANT_TYPES,
                "token_endpoint_auth_method": AUTH_METHODS[self.profile],
            }
        )
        return body

    def column_values(self) -> dict[str, Any]:
        """The agent's columns for this set as its current one."""
        return {
            "client_secret": self.client_secret,
            "public_jwk": self.public_key.to_stored() if self.public_key else None,
            "credentials_expire_at": self.expires_at,
            "rat_jti": self.rat_jti,
        }


@dataclass(frozen=True)
class Registrant:
    """The agent an IAT was found valid for: its current, unused IAT."""

    client_id: str
    iat_jti: str
    profile: SecurityProfile


def authenticate_iat(state: HubState, iat: str) -> Registrant:
    """The agent this IAT may onboard; 401 `token_validation_failed` for a bad, expired, used or
    superseded IAT. Called before the body is read."""
    claims = state.issuer.verify(iat, TokenKind.IAT)
    client_id: str = claims["sub"]
    jti: str = claims["jti"]
    with state.database.transaction() as session:
        agent = _agent_for_iat(session, client_id, jti)
        return Registrant(client_id, jti, SecurityProfile(agent.security_profile))


def register(state: HubState, registrant: Registrant, request: RegistrationRequest) -> Registration:
    """Onboard the agent `authenticate_iat` found; 400 for a body that does not fit the profile, 429 while
    another registration runs, 401 if the IAT got used or superseded meanwhile."""
    client_id, jti, profile = registrant.client_id, registrant.iat_jti, registrant.profile
    public_key = _public_key_for(profile, request.jwks)
    claimed_at = _claim_registration(state, client_id, jti)
    try:
        registration = _new_credentials(state, client_id, profile, public_key)
        completed = _complete_registration(state, jti, claimed_at, registration)
    except BaseException:
        _release_claim(state, client_id, claimed_at)
        raise
    if not completed:
        _release_claim(state, client_id, claimed_at)
        raise UnauthorizedError(
            "the registration was superseded (the agent was offboarded or changed meanwhile)",
            code="token_validation_failed",
        )
    return registration


@dataclass(frozen=True)
class Renewer:
    """The agent a RAT was found valid for, and which of its RATs that is."""

    client_id: str
    rat_jti: str
    profile: SecurityProfile
    #: the current RAT, else the previous one (whose renewal answer was lost)
    is_current: bool
    #: the agent's current RAT when checked: a renewal with the previous one replaces only that set
    current_rat_jti: str | None


def authenticate_rat(state: HubState, client_id: str, rat: str) -> Renewer:
    """The agent whose current (or previous, still unsuperseded) RAT this is; 401 for any other RAT.
    Called before the body is read."""
    claims = state.issuer.verify(rat, TokenKind.RAT)
    if not _same(claims["sub"], client_id):
        raise UnauthorizedError("this RAT is not for this client", code="token_validation_failed")
    jti: str = claims["jti"]
    with state.database.transaction() as session:
        agent = session.get(Agent, client_id)
        is_current = agent is not None and _same(jti, agent.rat_jti)
        is_previous = agent is not None and _same(jti, agent.previous_rat_jti)
        if agent is None or not (is_current or is_previous):
            raise UnauthorizedError(
                "the RAT was superseded (its successor was used) or revoked (offboarding)",
                code="token_validation_failed",
            )
        return Renewer(client_id, jti, SecurityProfile(agent.security_profile), is_current, agent.rat_jti)


def renew(state: HubState, renewer: Renewer, request: RenewalRequest) -> Registration:
    """A full new credential set for the agent `authenticate_rat` found; 400 for a body naming another
    client or not fitting the profile, 409 if a concurrent renewal with the same RAT won the race.

    409, not 401: the RAT was valid when checked, and the usual concurrent renewal is the agent's own
    earlier try of this request, which its transport gave up on while the hub was still working on it.
    That try made this RAT the previous one, still accepted: a 401 would tell a healthy agent its RAT is
    dead and it must be onboarded again."""
    client_id, jti, current_rat_jti = renewer.client_id, renewer.rat_jti, renewer.current_rat_jti
    if request.client_id != client_id:
        raise InvalidRequestError("client_id in the body must be the client of the registration URI")
    public_key = _public_key_for(renewer.profile, request.jwks)
    registration = _new_credentials(state, client_id, renewer.profile, public_key)
    with state.database.transaction() as session:
        if renewer.is_current:
            # the set in use becomes the previous one, until the new one is first used
            statement = (
                update(Agent)
                .where(Agent.id == client_id, Agent.rat_jti == jti)
                .values(
                    previous_client_secret=Agent.client_secret,
                    previous_public_jwk=Agent.public_jwk,
                    previous_rat_jti=Agent.rat_jti,
                    previous_expire_at=Agent.credentials_expire_at,
                    **registration.column_values(),
                )
            )
        else:
            # the previous RAT again: its answer was lost, so the set it produced is replaced unseen; only
            # that set, as read above: a concurrent renewal with the same RAT may have replaced it since,
            # and its caller holds the answer (overwriting it would leave that caller with a dead set)
            statement = (
                update(Agent)
                .where(
                    Agent.id == client_id,
                    Agent.previous_rat_jti == jti,
                    Agent.rat_jti == current_rat_jti,
                )
                .values(**registration.column_values())
            )
        if rowcount(session.execute(statement)) != 1:
            raise ConflictError(
                "the RAT was used by a concurrent renewal; use what that renewal returned, or, if it was "
                "this agent's own earlier try whose answer never arrived, renew again with the same RAT"
            )
    return registration


def _agent_for_iat(session: Session, client_id: str, jti: str) -> Agent:
    agent = session.get(Agent, client_id)
    if agent is None or not _same(jti, agent.iat_jti):
        raise UnauthorizedError(
            "the IAT is not this agent's current one (offboarded or deleted since)",
            code="token_validation_failed",
        )
    if agent.iat_used:
        raise UnauthorizedError(
            "the IAT was already used; offboard the agent for a new one", code="token_validation_failed"
        )
    return agent


def _public_key_for(profile: SecurityProfile, jwks: Jwks | None) -> AgentPublicKey | None:
    if profile == SecurityProfile.SHARED_SECRET:
        if jwks is not None:
            raise InvalidRequestError("a SHARED_SECRET agent registers with {}, not with a key")
        return None
    if jwks is None:
        raise InvalidRequestError("an RSA_3072 agent registers its public key: {'jwks': {'keys': [JWK]}}")
    return agent_public_key(jwks)


def _claim_registration(state: HubState, client_id: str, jti: str) -> float:
    """Mark the registration in progress; 429 when another one is, 401 when the IAT got used meanwhile."""
    now = state.clock()
    with state.database.transaction() as session:
        stale = now - state.settings.registration_timeout
        result = session.execute(
            update(Agent)
            .where(
                Agent.id == client_id,
                Agent.iat_jti == jti,
                Agent.iat_used.is_(False),
                or_(Agent.registering_since.is_(None), Agent.registering_since <= stale),
            )
            .values(registering_since=now)
        )
        if rowcount(result) == 1:
            return now
        _agent_for_iat(session, client_id, jti)
    raise TooManyRequestsError("a registration of this agent is in progress; retry in a moment")


def _complete_registration(state: HubState, jti: str, claimed_at: float, registration: Registration) -> bool:
    """Store the credentials and use up the IAT, if our claim still stands and nothing changed."""
    with state.database.transaction() as session:
        result = session.execute(
            update(Agent)
            .where(
                Agent.id == registration.client_id,
                Agent.iat_jti == jti,
                Agent.iat_used.is_(False),
                Agent.registering_since == claimed_at,
                Agent.security_profile == registration.profile.value,
            )
            .values(
                {
                    **revoked_credentials(),  # a re-registration after offboarding starts clean
                    **registration.column_values(),
                    "iat_used": True,
                    "registering_since": None,
                    "boarding_status": BoardingStatus.ONBOARDED.value,
                    "status_updated_at": state.clock(),
                }
            )
        )
        return rowcount(result) == 1


def _release_claim(state: HubState, client_id: str, claimed_at: float) -> None:
    """Give up a claim that did not complete, so a retry is not refused for `registration_timeout`."""
    with state.database.transaction() as session:
        session.execute(
            update(Agent)
            .where(Agent.id == client_id, Agent.registering_since == claimed_at)
            .values(registering_since=None)
        )


def _new_credentials(
    state: HubState, client_id: str, profile: SecurityProfile, public_key: AgentPublicKey | None
) -> Registration:
    rat = state.issuer.mint(TokenKind.RAT, client_id, RAT_LIFETIME)
    secret = secrets.token_urlsafe(48) if profile == SecurityProfile.SHARED_SECRET else None
    return Registration(
        client_id=client_id,
        profile=profile,
        client_secret=secret,
        public_key=public_key,
        expires_at=float(int(state.clock() + state.settings.credential_lifetime)),
        registration_access_token=rat.token,
        rat_jti=rat.jti,
        registration_client_uri=f"{state.base_url}{REGISTER_PATH}/{client_id}",
    )


def _same(presented: str, stored: str | None) -> bool:
    """Constant-time comparison of token identifiers (a timing side channel must not reveal them)."""
    return stored is not None and hmac.compare_digest(presented.encode(), stored.encode())

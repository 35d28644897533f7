"""The token endpoint's logic: which of the agent's credentials signed the assertion, whether they may
still be used, and the access token in return. Also the public key that verifies access tokens.

An access token carries `cgen`, the agent's credential generation, so offboarding (which bumps it)
revokes every access token already handed out. The first assertion signed with a renewed set retires the
previous set and RAT (see `onboarding`).

Each assertion's `jti` is spent in the same transaction that grants the token: the same assertion again
(replayed from a capture, or re-sent by a client whose answer was lost) is `invalid_grant`, and changes
nothing. Spent `jti`s are kept only while their assertion could still be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .assertions import (
    AssertionPolicy,
    ClientKey,
    VerifiedAssertion,
    claimed_client,
    invalid_client,
    invalid_grant,
    verify_assertion,
)
from .jwks import AgentPublicKey
from .models import Agent, BoardingStatus, SecurityProfile, SpentAssertion
from .oauth_form import TokenRequest
from .state import HubState
from .tokens import AGENT_SCOPES, HubKey, IssuedToken, TokenKind


@dataclass(frozen=True)
class CredentialSet:
    """One of an agent's credential sets as the token endpoint sees it."""

    key: ClientKey
    expires_at: float
    is_current: bool


@dataclass(frozen=True)
class AccessTokenGrant:
    issued: IssuedToken
    lifetime: float

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.issued.token,
            "token_type": "Bearer",
            "expires_in": int(self.lifetime),
            "jti": self.issued.jti,
            "scope": " ".join(AGENT_SCOPES),
        }


def grant_access_token(state: HubState, request: TokenRequest) -> AccessTokenGrant:
    """An access token for the agent whose valid credentials signed `request`'s assertion, or
    `invalid_client` / `invalid_grant` / `invalid_request` saying why not."""
    client_id = claimed_client(request.client_assertion)
    settings = state.settings
    policy = AssertionPolicy(settings.tenant, settings.assertion_leeway, settings.max_assertion_lifetime)
    now = state.clock()
    with state.database.transaction() as session:
        agent = session.get(Agent, client_id)
        if agent is None or agent.boarding_status != BoardingStatus.ONBOARDED:
            raise invalid_client("unknown client, or an agent that is not onboarded")
        sets = credential_sets(agent)
        keys = [credential.key for credential in sets]
        verified = verify_assertion(request.client_assertion, client_id, keys, policy, now)
        chosen = sets[verified.key_index]
        if chosen.expires_at <= now:
            raise invalid_client("the client's credentials have expired; renew them with the RAT")
        if chosen.is_current and agent.previous_rat_jti is not None and not _same_as_previous(agent):
            # the new set is in use: the client has it, so the previous set and RAT can go
            session.execute(
                update(Agent)
                .where(Agent.id == client_id, Agent.rat_jti == agent.rat_jti)
                .values(
                    previous_client_secret=None,
                    previous_public_jwk=None,
                    previous_rat_jti=None,
                    previous_expire_at=None,
                )
            )
        generation = agent.credential_generation
        _spend(session, client_id, verified, now)
    claims = {"ten": settings.tenant, "scope": list(AGENT_SCOPES), "cgen": generation}
    issued = state.issuer.mint(TokenKind.ACCESS, client_id, settings.access_token_lifetime, claims)
    return AccessTokenGrant(issued, settings.access_token_lifetime)


def _spend(session: Session, client_id: str, verified: VerifiedAssertion, now: float) -> None:
    """Remember `verified`'s `jti` (and forget those no longer acceptable anyway); `invalid_grant` when
    it was spent before, which rolls the whole grant back."""
    session.execute(delete(SpentAssertion).where(SpentAssertion.acceptable_until < now))
    session.add(
        SpentAssertion(client_id=client_id, jti=verified.jti, acceptable_until=verified.acceptable_until)
    )
    try:
        session.flush()
    except IntegrityError:
        raise invalid_grant(
            "this assertion was already used: sign a new one, with a new jti, for each token request"
        ) from None


def credential_sets(agent: Agent) -> list[CredentialSet]:
    """The current set, then the previous one while it is kept (only until the current one is used)."""
    sets: list[CredentialSet] = []
    for secret, jwk, expires_at, is_current in (
        (agent.client_secret, agent.public_jwk, agent.credentials_expire_at, True),
        (agent.previous_client_secret, agent.previous_public_jwk, agent.previous_expire_at, False),
    ):
        if expires_at is None:
            continue
        if agent.security_profile == SecurityProfile.SHARED_SECRET and secret is not None:
            sets.append(CredentialSet(ClientKey.shared_secret(secret), expires_at, is_current))
        elif agent.security_profile == SecurityProfile.RSA_3072 and jwk is not None:
            key = AgentPublicKey.from_stored(jwk).key
            sets.append(CredentialSet(ClientKey.rsa_key(key), expires_at, is_current))
    if not sets:
        raise invalid_client("the client holds no credentials (offboarded?)")
    return sets


def _same_as_previous(agent: Agent) -> bool:
    """An RSA agent may renew with the same key: an assertion then cannot tell the sets apart, so it is
    not proof that the new set arrived, and the previous RAT must stay usable."""
    if agent.public_jwk is None or agent.previous_public_jwk is None:
        return False
    return AgentPublicKey.from_stored(agent.public_jwk).same_key(
        AgentPublicKey.from_stored(agent.previous_public_jwk)
    )


def token_key(key: HubKey) -> dict[str, Any]:
    """The key that verifies access tokens, in the platform's `token_key` shape."""
    jwk = key.public_jwk()
    return {
        "kid": key.kid,
        "alg": "SHA256withRSA",
        "value": key.public_pem_one_line(),
        "kty": jwk["kty"],
        "use": "sig",
        "n": jwk["n"],
        "e": jwk["e"],
    }

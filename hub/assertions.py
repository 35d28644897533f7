"""Client assertions (RFC 7523): the self-signed JWT an agent authenticates with at the token endpoint.

Pure functions over the assertion, the agent's credentials and the hub's clock; the token endpoint
(`oauth`) does the I/O. What each check stops:

- the algorithms are fixed per credential (HS256 for a shared secret, RS256/RS384 for an RSA key), never
  taken from the token: `alg: none`, and an HMAC keyed with the agent's *public* key (algorithm
  confusion), are refused before any signature is computed;
- the signature is checked before a claim is believed, so an unauthenticated caller learns nothing about
  what else is wrong;
- `iss` = `sub` = the client, `aud` contains "southgate": an assertion made for another client or another
  service cannot be replayed here;
- `exp`, `nbf`, `iat` against the hub's clock with a bounded leeway, and a bounded lifetime: a stolen or
  logged assertion is useful only briefly;
- a `jti` is required, and the token endpoint spends it (`oauth`): one assertion buys one token
  (RFC 7523 section 3, item 7).

Real clients differ (RS384 or RS256, `aud` as a string or an array, base64url with `=` padding); all of
that is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import InvalidRequestError, UnauthorizedError

AUDIENCE = "southgate"
SHARED_SECRET_ALGORITHMS = ("HS256",)
RSA_ALGORITHMS = ("RS256", "RS384")
MAX_CLIENT_ID_LENGTH = 64
MAX_JTI_LENGTH = 255
#: how long the assertions mers devices sign are valid (`mers.tokens.ASSERTION_LIFETIME`: `mers` may not
#: import the hub nor the hub `mers`, so the value is stated in both and a test ties them). A hub whose
#: `max_assertion_lifetime` is shorter would refuse every device's token request.
DEVICE_ASSERTION_LIFETIME = 300
_LARGEST_TIME = 2**53

#: signature only; every claim is checked below, against the hub's clock rather than the system's
_SIGNATURE_ONLY: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


def invalid_client(message: str) -> UnauthorizedError:
    """The client could not be authenticated (unknown, wrong signature, revoked or expired credentials)."""
    return UnauthorizedError(message, code="invalid_client")


def invalid_grant(message: str) -> InvalidRequestError:
    """The assertion is authentic but its claims do not allow a token (expired, wrong audience...)."""
    return InvalidRequestError(message, code="invalid_grant")


@dataclass(frozen=True)
class ClientKey:
    """One credential an agent may sign assertions with, and the only algorithms it may use."""

    algorithms: tuple[str, ...]
    key: bytes | rsa.RSAPublicKey = field(repr=False)  # bytes: the agent's shared secret

    @classmethod
    def shared_secret(cls, secret: str) -> ClientKey:
        return cls(SHARED_SECRET_ALGORITHMS, secret.encode("utf-8"))

    @classmethod
    def rsa_key(cls, key: rsa.RSAPublicKey) -> ClientKey:
        return cls(RSA_ALGORITHMS, key)


@dataclass(frozen=True)
class AssertionPolicy:
    tenant: str
    leeway: float
    max_lifetime: float


def claimed_client(assertion: str) -> str:
    """The client id an assertion claims to come from (its `sub`, else `iss`), read without verifying
    anything: it only selects whose credentials to verify the assertion with."""
    try:
        jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise InvalidRequestError(f"client_assertion is not a JWT: {exc}") from exc
    client = claims.get("sub", claims.get("iss"))
    if not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_ID_LENGTH or not client.isprintable():
        raise invalid_client("the assertion names no client (sub)")
    return client


@dataclass(frozen=True)
class VerifiedAssertion:
    """A valid assertion: which of the client's credentials signed it, its `jti`, and until when the hub
    would accept it (its `exp` plus the leeway), which is how long its `jti` must be remembered."""

    key_index: int
    jti: str
    acceptable_until: float


def verify_assertion(
    assertion: str, client_id: str, keys: Sequence[ClientKey], policy: AssertionPolicy, now: float
) -> VerifiedAssertion:
    """The valid assertion of `client_id` and the credential in `keys` that signed it; otherwise
    `invalid_client` (no credential verifies it) or `invalid_grant` (its claims are wrong)."""
    try:
        algorithm = jwt.get_unverified_header(assertion).get("alg")
    except jwt.PyJWTError as exc:
        raise InvalidRequestError(f"client_assertion is not a JWT: {exc}") from exc
    candidates = [index for index, key in enumerate(keys) if algorithm in key.algorithms]
    if not candidates:
        allowed = sorted({name for key in keys for name in key.algorithms})
        raise invalid_client(f"algorithm {algorithm!r} is not allowed for this client; use one of {allowed}")
    for index in candidates:
        key = keys[index]
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion, key.key, algorithms=list(key.algorithms), options=_SIGNATURE_ONLY
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise InvalidRequestError(f"client_assertion is malformed: {exc}") from exc
        check_claims(claims, client_id, policy, now)
        return VerifiedAssertion(index, claims["jti"], _time_claim(claims, "exp") + policy.leeway)
    raise invalid_client("the assertion's signature does not verify with the client's credentials")


def check_claims(claims: dict[str, Any], client_id: str, policy: AssertionPolicy, now: float) -> None:
    """The claims of an authentic assertion, checked against RFC 7523 section 3 and the hub's clock."""
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise invalid_grant("the assertion's iss and sub must both be the client id")
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or AUDIENCE not in audiences:
        raise invalid_grant(f"the assertion's aud must contain {AUDIENCE!r}")
    tenant = claims.get("ten", policy.tenant)
    if tenant != policy.tenant:
        raise invalid_grant("the assertion names another tenant")
    expires = _time_claim(claims, "exp")
    issued = _time_claim(claims, "iat")
    not_before = _time_claim(claims, "nbf") if "nbf" in claims else issued
    if now > expires + policy.leeway:
        raise invalid_grant("the assertion has expired (exp); check the agent's clock")
    if issued > now + policy.leeway or not_before > now + policy.leeway:
        raise invalid_grant("the assertion is not valid yet (iat/nbf); check the agent's clock")
    if expires - min(issued, not_before) > policy.max_lifetime:
        raise invalid_grant(f"the assertion may be valid for at most {policy.max_lifetime:.0f} s")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH or not jti.isprintable():
        raise invalid_grant(
            f"the assertion needs a jti: a unique printable string of at most {MAX_JTI_LENGTH} characters"
        )


def _time_claim(claims: dict[str, Any], name: str) -> float:
    """A NumericDate; a huge integer or an infinity is refused (it would overflow, or never expire)."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_grant(f"the assertion needs a numeric {name}")
    if (isinstance(value, int) and abs(value) > _LARGEST_TIME) or not math.isfinite(value):
        raise invalid_grant(f"the assertion's {name} is out of range")
    return float(value)

"""The hub's own JWTs: Initial Access Tokens, Registration Access Tokens and access tokens.

All three are RS256, signed by the hub's RSA key, and each kind has its own audience, so one can never be
presented as another (an IAT as an access token, say). Only RS256 is accepted on the way back in, so a
token with `alg: none` or an HMAC keyed with the public key is refused before its claims are read.
Expiry is checked against the hub's clock (injectable, so tests can age tokens without sleeping).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwt.algorithms import RSAAlgorithm

from .errors import HubSetupError, UnauthorizedError

Clock = Callable[[], float]

#: the scope access tokens carry: what an agent may do on this hub
AGENT_SCOPES = ("mdsp:core:Agent.Default", "mdsp:core:FirmwareDeployment.Agent")


class TokenKind(enum.StrEnum):
    IAT = "iat"
    RAT = "rat"
    ACCESS = "access"

    @property
    def audience(self) -> str:
        return f"urn:mers:hub:{self.value}"


@functools.lru_cache(maxsize=8)
def _load_private_key(data: bytes) -> PrivateKeyTypes:
    """Load and check a PEM private key. Checking an RSA-3072 key (its primes included) takes about 0.1 s;
    the same bytes are the same immutable key, so a process serving several hubs one after another (the
    test suite) checks each key once. Errors are not cached: they are raised again on every call."""
    return serialization.load_pem_private_key(data, password=None)


@dataclass(frozen=True)
class HubKey:
    """The RSA key pair that signs every token the hub issues."""

    private: rsa.RSAPrivateKey

    @classmethod
    def from_pem(cls, data: bytes, *, source: str) -> HubKey:
        try:
            key = _load_private_key(data)
        except (ValueError, TypeError) as exc:
            raise HubSetupError(f"{source} is not an unencrypted PEM private key") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise HubSetupError(f"{source} is not an RSA key")
        return cls(key)

    @property
    def public(self) -> rsa.RSAPublicKey:
        return self.private.public_key()

    @property
    def kid(self) -> str:
        der = self.public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()[:16]

    def public_pem_one_line(self) -> str:
        """The PEM with its line breaks removed, as the platform's `token_key.value` has it."""
        pem = self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        return pem.replace("\n", "")

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    jti: str
    issued_at: float
    expires_at: float


class TokenIssuer:
    """Mints and checks the hub's tokens; `issuer` is the hub's base URL."""

    def __init__(self, key: HubKey, issuer: str, clock: Clock) -> None:
        self.key = key
        self.issuer = issuer
        self.clock = clock

    def mint(
        self, kind: TokenKind, subject: str, lifetime: float, claims: dict[str, Any] | None = None
    ) -> IssuedToken:
        now = self.clock()
        jti = secrets.token_hex(16)
        payload = {
            **(claims or {}),
            "iss": self.issuer,
            "sub": subject,
            "aud": kind.audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": jti,
        }
        token = jwt.encode(payload, self.key.private, algorithm="RS256", headers={"kid": self.key.kid})
        return IssuedToken(token, jti, now, float(int(now + lifetime)))

    def verify(self, token: str, kind: TokenKind) -> dict[str, Any]:
        """The claims of a valid, unexpired token of `kind`, or `UnauthorizedError`
        (`token_validation_failed`, the platform's code) saying why."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key.public,
                algorithms=["RS256"],
                audience=kind.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "iat", "jti", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise UnauthorizedError(
                f"invalid {kind.value.upper()}: {exc}", code="token_validation_failed"
            ) from exc
        if not isinstance(claims["exp"], int | float) or claims["exp"] <= self.clock():
            raise UnauthorizedError(f"the {kind.value.upper()} has expired", code="token_validation_failed")
        if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
            raise UnauthorizedError(f"malformed {kind.value.upper()}", code="token_validation_failed")
        return claims

"""The public key an RSA_3072 agent registers, as a JWK set of exactly one RSA key.

The key is checked before anything is stored: RSA, a 3072-bit modulus (a weaker key would let a forger
sign assertions; the profile is named for the size), and a sane public exponent. Real clients differ in
encoding: one sends `n` with a leading zero byte (a two's-complement integer), another pads base64url
with `=`; both are accepted, and the key is stored in one canonical form.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequestError

MODULUS_BITS = 3072
#: base64url with optional padding; anything else is refused rather than silently skipped
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


class Jwk(BaseModel):
    """One key as sent; unknown members (`alg`, `use`, `x5c`...) are ignored, as JWK readers do."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kty: Annotated[str, Field(max_length=16)]
    kid: Annotated[str | None, Field(max_length=128)] = None
    n: Annotated[str, Field(min_length=1, max_length=1024)]
    e: Annotated[str, Field(min_length=1, max_length=16)]


class Jwks(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    keys: Annotated[list[Jwk], Field(min_length=1, max_length=1)]


@dataclass(frozen=True)
class AgentPublicKey:
    """A validated RSA-3072 public key and its `kid`."""

    key: rsa.RSAPublicKey
    kid: str | None

    def to_jwk(self) -> dict[str, str]:
        numbers = self.key.public_numbers()
        jwk = {"kty": "RSA", "n": _encode_int(numbers.n), "e": _encode_int(numbers.e)}
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [self.to_jwk()]}

    def to_stored(self) -> str:
        return json.dumps(self.to_jwk(), sort_keys=True)

    @classmethod
    def from_stored(cls, text: str) -> AgentPublicKey:
        """A key the hub stored itself (already validated when it was registered)."""
        jwk: dict[str, Any] = json.loads(text)
        return agent_public_key(Jwks(keys=[Jwk.model_validate(jwk)]))

    def same_key(self, other: AgentPublicKey) -> bool:
        return self.key.public_numbers() == other.key.public_numbers()


def agent_public_key(jwks: Jwks) -> AgentPublicKey:
    """The agent's key from its JWK set, or `InvalidRequestError` naming what is wrong with it."""
    jwk = jwks.keys[0]
    if jwk.kty != "RSA":
        raise InvalidRequestError(f"the RSA_3072 profile needs an RSA key, not kty {jwk.kty!r}")
    modulus = _decode_int(jwk.n, "n")
    exponent = _decode_int(jwk.e, "e")
    if modulus.bit_length() != MODULUS_BITS:
        raise InvalidRequestError(
            f"the RSA_3072 profile needs a {MODULUS_BITS}-bit modulus, not {modulus.bit_length()} bits"
        )
    # an even or tiny exponent is no RSA key; a huge one is a denial-of-service on every verification
    if exponent < 3 or exponent % 2 == 0 or exponent.bit_length() > 32:
        raise InvalidRequestError("the key's public exponent e is not a usable RSA exponent")
    try:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise InvalidRequestError(f"the key is not a valid RSA public key: {exc}") from exc
    return AgentPublicKey(key, jwk.kid)


def _decode_int(text: str, member: str) -> int:
    """A big-endian unsigned integer from base64url, padded or not; leading zero bytes are harmless."""
    if not _BASE64URL.match(text):
        raise InvalidRequestError(f"the key's {member} is not base64url")
    unpadded = text.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except ValueError as exc:
        raise InvalidRequestError(f"the key's {member} is not base64url") from exc
    return int.from_bytes(raw, "big")


def _encode_int(value: int) -> str:
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

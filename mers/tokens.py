"""Client assertions and access tokens (docs/design.md §6, RFC 7523).

The device authenticates at the token endpoint with a short self-signed JWT: HS256 keyed with the raw
client secret (SHARED_SECRET), or RS256 with its own RSA-3072 key (RSA_3072). Its times are hub time
(see `mers.clock`): the hub refuses an assertion dated more than a minute off. The access token is cached
(`access-token.json`, 0600) with its expiry and issue in hub time and the id of the credential set it
came from, and replaced `margin` seconds before it expires (at most half its lifetime: `mers.client`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from board.interface import StateStore

from .errors import HubProtocolError

TOKEN_PATH = "/api/agentmanagement/v3/oauth/token"  # noqa: S105 - a path
TOKEN_KEY_PATH = "/api/agentmanagement/v3/oauth/token_key"  # noqa: S105 - a path
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AUDIENCE = "southgate"
SCHEMAS = ["urn:siemens:mindsphere:v1"]
#: seconds: long enough for a slow uplink, short enough that a leaked one expires. The hub refuses a
#: `max_assertion_lifetime` below it (`hub.assertions.DEVICE_ASSERTION_LIFETIME`, tied by a test)
ASSERTION_LIFETIME = 300
TOKEN_FILE = "access-token.json"  # noqa: S105 - a file name
#: RFC 6750 `b64token`, what `Authorization: Bearer` carries: printable ASCII without spaces
B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def sendable(token: object) -> bool:
    """Whether `token` is a bearer token the device can send. Anything else must not be stored: outside
    latin-1 it fails in http.client with an untyped traceback, and with CR/LF, a space or a control
    character requests refuses the header on every try, quoting its value (the token) in the error."""
    return isinstance(token, str) and B64TOKEN.fullmatch(token) is not None


def client_assertion(client_id: str, tenant: str, key: str | rsa.RSAPrivateKey, now: float) -> str:
    """The assertion the token endpoint takes, dated `now` (hub time)."""
    issued = int(now)
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": [AUDIENCE],
        "iat": issued,
        "nbf": issued,
        "exp": issued + ASSERTION_LIFETIME,
        "jti": uuid.uuid4().hex,
        "schemas": SCHEMAS,
        "ten": tenant,
    }
    if isinstance(key, str):
        return jwt.encode(claims, key.encode("utf-8"), algorithm="HS256")
    return jwt.encode(claims, key, algorithm="RS256")


def token_form(assertion: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }


@dataclass(frozen=True)
class AccessToken:
    token: str = field(repr=False)
    expires_at: float  # hub time
    set_id: str  # the credential set that obtained it
    issued_at: float | None = None  # hub time; None in a cache written before it was kept

    @property
    def lifetime(self) -> float | None:
        return None if self.issued_at is None else self.expires_at - self.issued_at

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "expiresAt": self.expires_at,
            "setId": self.set_id,
            "issuedAt": self.issued_at,
        }


def parse_token_answer(document: dict[str, Any], now: float, set_id: str) -> AccessToken:
    token, expires_in = document.get("access_token"), document.get("expires_in")
    if not isinstance(token, str) or not token or isinstance(expires_in, bool):
        raise HubProtocolError("the token endpoint's answer has no access_token")
    if not sendable(token):
        raise HubProtocolError("the token endpoint's access_token is not a bearer token (RFC 6750 b64token)")
    if not isinstance(expires_in, int | float) or not 0 < expires_in <= 86400:
        raise HubProtocolError("the token endpoint's answer has no usable expires_in")
    return AccessToken(token, now + float(expires_in), set_id, now)


def load_token(state: StateStore) -> AccessToken | None:
    """The cached token, or None when there is none or it is unreadable (a cache: never worth failing)."""
    raw = state.read(TOKEN_FILE)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
        issued = document.get("issuedAt")
        token = AccessToken(
            str(document["token"]),
            float(document["expiresAt"]),
            str(document["setId"]),
            None if issued is None else float(issued),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return token if sendable(token.token) else None  # one cached before tokens were checked


def save_token(state: StateStore, token: AccessToken) -> None:
    state.write(TOKEN_FILE, json.dumps(token.to_json()).encode())

"""Registration and renewal on the wire (docs/design.md §6), and what each refusal means for the operator.

Pure request/answer handling over a `HubSession`; the decisions (when to register or renew, what to
persist first) are `mers.client`'s.
"""

from __future__ import annotations

import datetime
import hashlib
import urllib.parse
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .boarding import Boarding, CredentialProfile
from .credentials import CredentialSet
from .errors import (
    CorruptStateError,
    HubProtocolError,
    HubRefusedError,
    IatExpiredError,
    IatUsedError,
    ReonboardingRequiredError,
)
from .http import HubAnswer, HubSession
from .tokens import sendable

REGISTER_PATH = "/api/agentmanagement/v3/register"
#: the furthest ahead of hub time a credential set may expire: the hub gives 7 days, and a year covers any
#: configuration; beyond it the value is not seconds (milliseconds, say), and a set that never looks due
#: would never be renewed
MAX_CREDENTIAL_LIFETIME = 366 * 24 * 3600.0
REONBOARD_HINT = (
    "re-onboarding is needed: ask the operator for a new boarding configuration, then run "
    "`mers boarding import FILE` and `mers onboard`"
)


def public_jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """The agent's public key as the hub takes it, `kid` the SHA-256 of its DER (stable per key)."""
    public = key.public_key()
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"kty": jwk["kty"], "kid": hashlib.sha256(der).hexdigest()[:32], "n": jwk["n"], "e": jwk["e"]}


def register(
    session: HubSession,
    boarding: Boarding,
    key: rsa.RSAPrivateKey | None,
    *,
    now: Callable[[], float],
    sent_before: float | None = None,
) -> CredentialSet:
    """Trade the IAT for the first credential set. `now` is hub time (it dates the answer's expiry).
    `sent_before` is when an earlier registration of this device with this IAT went out without an
    answer it could store (it explains an "IAT used" refusal)."""
    body: dict[str, Any] = {}
    if boarding.profile is CredentialProfile.RSA_3072:
        assert key is not None, "an RSA_3072 agent registers its key"
        body = {"jwks": {"keys": [public_jwk(key)]}}
    answer = session.request("POST", REGISTER_PATH, bearer=boarding.iat, json=body)
    if answer.status != 201:
        if answer.status == 401 and (sent_before is not None or answer.repeated):
            lost = _lost_registration(answer, boarding.client_id, sent_before)
            if lost is not None:
                raise lost
        raise registration_refusal(answer)
    return parse_credential_set(answer.json(), boarding.client_id, boarding.profile, session.base_url, now())


def _lost_registration(answer: HubAnswer, client_id: str, sent_before: float | None) -> IatUsedError | None:
    """The hub's "IAT already used" after this device's own registration with it went out and its answer
    never arrived: that registration most likely used it, and only the operator can issue a new IAT.
    Any other refusal (an IAT superseded by offboarding, a bad signature) is reported as it is."""
    code, description = answer.error()
    if "already used" not in description.lower():
        return None
    if sent_before is None:
        when = "a moment ago, and the network lost an answer"
    else:
        moment = datetime.datetime.fromtimestamp(sent_before, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        when = f"at {moment}, and no answer to it was ever stored"
    return IatUsedError(
        f"the hub refused the IAT: {description}. This device sent a registration with it {when}: unless "
        "another board holds the same boarding configuration, that registration used it. The IAT works "
        f"once: ask the operator to offboard agent {client_id} (a new boarding configuration), then run "
        "`mers boarding import FILE` and `mers onboard`",
        status=401,
        code=code,
        own_registration=True,
    )


def renew(
    session: HubSession,
    client_id: str,
    profile: CredentialProfile,
    held: CredentialSet,
    key: rsa.RSAPrivateKey | None,
    *,
    now: Callable[[], float],
) -> CredentialSet:
    """Trade `held`'s RAT for a full new set (the same RSA key again: it stays on the device); `now` is
    hub time.

    A refusal (401, or the hub's 409 "used by a concurrent renewal") of a request the transport sent more
    than once may be the work of our own earlier try: the hub renewed with it, but its answer was lost
    (a read timeout on a loaded hub). That made `held`'s RAT the hub's previous one, which it still takes,
    so one more try with it gets a new set instead of a spurious "re-onboarding is needed". Nothing was
    stored meanwhile: the caller persists what this returns, `held` kept as the previous set."""
    if not sendable(held.rat):  # stored before answers were checked: never put into a header
        raise CorruptStateError(f"the stored RAT is not a bearer token (RFC 6750 b64token); {REONBOARD_HINT}")
    body: dict[str, Any] = {"client_id": client_id}
    if profile is CredentialProfile.RSA_3072:
        assert key is not None
        body["jwks"] = {"keys": [public_jwk(key)]}
    answer = session.request("PUT", held.registration_client_uri, bearer=held.rat, json=body)
    if answer.repeated and answer.status in (401, 409):
        answer = session.request("PUT", held.registration_client_uri, bearer=held.rat, json=body)
    if answer.status == 401:
        _, description = answer.error()
        raise ReonboardingRequiredError(
            f"the hub refused the RAT ({description or 'unauthorized'}); {REONBOARD_HINT}",
            status=401,
            code="token_validation_failed",
        )
    if answer.status != 200:
        raise refusal(answer, "renewal")
    return parse_credential_set(answer.json(), client_id, profile, session.base_url, now())


def parse_credential_set(
    document: dict[str, Any], client_id: str, profile: CredentialProfile, base_url: str, now: float
) -> CredentialSet:
    """Check a register/renew answer before anything is stored: a set without its RAT, for another client,
    or without the secret its profile needs would strand the device; a registration URI off the hub's
    origin (`base_url`) would have the next renewal send the RAT to whoever the answer named; an expiry
    that is not a finite time after `now` (hub time), within `MAX_CREDENTIAL_LIFETIME`, would never make
    the set look due for renewal (milliseconds, Infinity) or could not be shown as a date."""
    if document.get("client_id") != client_id:
        raise HubProtocolError("the hub's registration answer is for another client_id")
    rat, uri, expires = (
        document.get(key)
        for key in ("registration_access_token", "registration_client_uri", "client_secret_expires_at")
    )
    secret = document.get("client_secret")
    if not isinstance(rat, str) or not rat or not isinstance(uri, str) or not uri.startswith("https://"):
        raise HubProtocolError("the hub's registration answer lacks the RAT or an https registration URI")
    if not sendable(rat):
        raise HubProtocolError("the hub's registration answer holds a RAT that is not an RFC 6750 b64token")
    origin = _origin(uri)
    if origin is None or origin != _origin(base_url):
        raise HubProtocolError(
            "the hub's registration answer names a registration URI off the hub's own origin "
            f"{_display_origin(base_url)}: the RAT is only ever sent to the hub"
        )
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise HubProtocolError("the hub's registration answer lacks client_secret_expires_at")
    # compared, not converted: NaN fails both comparisons, and an int too large for a float compares exactly
    if not now < expires <= now + MAX_CREDENTIAL_LIFETIME:
        raise HubProtocolError(
            "the hub's registration answer has a client_secret_expires_at that is not a time (epoch "
            f"seconds) in the coming {MAX_CREDENTIAL_LIFETIME / 86400:.0f} days by the hub's clock"
        )
    if profile is CredentialProfile.SHARED_SECRET and not (isinstance(secret, str) and secret):
        raise HubProtocolError("the hub's registration answer lacks the client_secret")
    return CredentialSet(
        rat=rat,
        registration_client_uri=uri,
        expires_at=float(expires),
        client_secret=secret if profile is CredentialProfile.SHARED_SECRET else None,
    )


def _origin(url: str) -> tuple[str, str, int] | None:
    """Scheme, host and port as they decide where a request goes (host case and a default port do not);
    None for a URL with user info (requests would turn it into credentials of its own), a bad port or
    one urlsplit cannot read (an unclosed IPv6 bracket)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, port if port is not None else 443 if scheme == "https" else 80


def _display_origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def registration_refusal(answer: HubAnswer) -> HubRefusedError:
    code, description = answer.error()
    if answer.status == 401:
        text = description.lower()
        if "expired" in text:
            return IatExpiredError(
                "the boarding configuration's IAT has expired (it is valid 7 days): ask the operator for a "
                "new boarding configuration and import it with `mers boarding import FILE`",
                status=401,
                code=code,
            )
        return IatUsedError(
            f"the hub refused the IAT: {description or 'unauthorized'} (an IAT works once; after "
            "offboarding only the new boarding configuration is valid: `mers boarding import FILE`)",
            status=401,
            code=code,
        )
    if answer.status == 429:
        return HubRefusedError(
            "another registration of this agent is still in progress; try again in a minute",
            status=429,
            code=code,
        )
    return refusal(answer, "registration")


def refusal(answer: HubAnswer, during: str) -> HubRefusedError:
    code, description = answer.error()
    return HubRefusedError(
        f"the hub refused the {during}: {answer.status} {code or ''} {description}".strip(),
        status=answer.status,
        code=code,
    )

"""The credentials the device holds, persisted as one atomic state file.

`credentials.json` (0600, in the board's state directory) holds everything needed to act as the agent:
the client id, tenant, profile, the boarding data registered with (its CA, base URL and proxy stay in
force after a later import, until a new registration succeeds), and up to two credential sets:

- `current`: the newest set the hub handed out, written **before** it is first used;
- `previous`: the set it replaced, kept until the current one has been used successfully, so that a
  renewal whose answer was lost, or a crash between the answer and the write, recovers: the hub keeps the
  previous RAT usable until the new set is first used (hub/onboarding.py).

One file, one `os.replace`: a crash leaves the old pair or the new pair, never a RAT without its set.
The RSA_3072 private key lives beside it in `agent-key.pem` (0600), generated on the device once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from board.interface import BoardingData, StateStore

from .boarding import CredentialProfile, boarding_from_json, boarding_to_json
from .errors import CorruptStateError

CREDENTIALS_FILE = "credentials.json"
FORMAT = 1


@dataclass(frozen=True)
class CredentialSet:
    """One answer of the register or renew endpoint. `expires_at` is hub time (epoch seconds)."""

    rat: str = field(repr=False)
    registration_client_uri: str
    expires_at: float
    client_secret: str | None = field(default=None, repr=False)
    #: hub time the device received the set; None in files written before it was kept
    issued_at: float | None = None

    @property
    def lifetime(self) -> float | None:
        """How long the hub granted the set for (the renewal margin is clamped to it), when known."""
        return None if self.issued_at is None else self.expires_at - self.issued_at

    @property
    def id(self) -> str:
        """A short, non-secret name for the set (ties a cached access token to the set it came from)."""
        return hashlib.sha256(self.rat.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "rat": self.rat,
            "registrationClientUri": self.registration_client_uri,
            "expiresAt": self.expires_at,
            "clientSecret": self.client_secret,
            "issuedAt": self.issued_at,
        }

    @classmethod
    def from_json(cls, document: Any) -> CredentialSet:
        if not isinstance(document, dict):
            raise CorruptStateError(f"{CREDENTIALS_FILE}: a credential set is not an object")
        rat, uri, expires, secret = (
            document.get(key) for key in ("rat", "registrationClientUri", "expiresAt", "clientSecret")
        )
        if not (isinstance(rat, str) and isinstance(uri, str) and isinstance(expires, int | float)):
            raise CorruptStateError(f"{CREDENTIALS_FILE}: a credential set lacks rat, URI or expiry")
        if secret is not None and not isinstance(secret, str):
            raise CorruptStateError(f"{CREDENTIALS_FILE}: clientSecret is not a string")
        issued = document.get("issuedAt")
        if issued is not None and (isinstance(issued, bool) or not isinstance(issued, int | float)):
            raise CorruptStateError(f"{CREDENTIALS_FILE}: issuedAt is not a number")
        return cls(rat, uri, float(expires), secret, None if issued is None else float(issued))


@dataclass(frozen=True)
class StoredCredentials:
    client_id: str
    tenant: str
    profile: CredentialProfile
    base_url: str
    iat_id: str  # the IAT registered with: onboarding again with the same one is a no-op
    boarding: BoardingData = field(repr=False)  # its configuration holds the IAT
    current: CredentialSet
    previous: CredentialSet | None = None

    def renewed(self, new: CredentialSet, *, used_previous: bool) -> StoredCredentials:
        """After a renewal: the new set is current; the one whose RAT was used (or, when the previous RAT
        had to be used, that previous one) is kept as previous."""
        keep = self.previous if used_previous else self.current
        return replace(self, current=new, previous=keep)

    def confirmed(self) -> StoredCredentials:
        """The current set has been used: the hub has retired the previous one."""
        return replace(self, previous=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "clientId": self.client_id,
            "tenant": self.tenant,
            "profile": self.profile.value,
            "baseUrl": self.base_url,
            "iatId": self.iat_id,
            "boarding": boarding_to_json(self.boarding),
            "current": self.current.to_json(),
            "previous": None if self.previous is None else self.previous.to_json(),
        }

    @classmethod
    def from_json(cls, document: Any) -> StoredCredentials:
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise CorruptStateError(f"{CREDENTIALS_FILE} is not a format-{FORMAT} credentials file")
        texts = [document.get(key) for key in ("clientId", "tenant", "profile", "baseUrl", "iatId")]
        if not all(isinstance(text, str) for text in texts) or texts[2] not in CredentialProfile.__members__:
            raise CorruptStateError(f"{CREDENTIALS_FILE}: identity fields are missing or wrong")
        boarding = document.get("boarding")
        if not isinstance(boarding, dict):
            raise CorruptStateError(f"{CREDENTIALS_FILE}: boarding data is missing")
        previous = document.get("previous")
        return cls(
            client_id=str(texts[0]),
            tenant=str(texts[1]),
            profile=CredentialProfile(str(texts[2])),
            base_url=str(texts[3]),
            iat_id=str(texts[4]),
            boarding=boarding_from_json(boarding),
            current=CredentialSet.from_json(document.get("current")),
            previous=None if previous is None else CredentialSet.from_json(previous),
        )


def load_credentials(state: StateStore) -> StoredCredentials | None:
    raw = state.read(CREDENTIALS_FILE)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise CorruptStateError(f"{CREDENTIALS_FILE} is not JSON: {exc}") from exc
    return StoredCredentials.from_json(document)


def save_credentials(state: StateStore, credentials: StoredCredentials) -> None:
    """Atomic (temp file, fsync, rename, fsync dir) and 0600: see `board.storage`."""
    state.write(CREDENTIALS_FILE, json.dumps(credentials.to_json(), indent=1).encode())

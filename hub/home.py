"""The hub directory: where each file lives, and the settings in `hub.toml`.

`mers-hub init DIR` creates the directory (see `setup`); everything else reads it through `HubHome`, so
the scripting contract (`DIR/url`, `DIR/admin-token`, `DIR/ca.pem`) is spelled out in one place.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .assertions import DEVICE_ASSERTION_LIFETIME
from .errors import HubSetupError

DAY = 24 * 3600


@dataclass(frozen=True)
class HubSettings:
    """What an operator may tune in `hub.toml`; the defaults are the platform's."""

    #: SQLAlchemy URL; empty means the SQLite file `hub.db` in the hub directory
    database_url: str = ""
    #: the tenant named in boarding configurations and access tokens
    tenant: str = "mers"
    #: the base URL devices use (boarding `baseUrl`, signed URLs); empty means the URL `serve` listens on,
    #: or, listening on every address, init's first --hostname (see `hub.server.device_url`)
    public_url: str = ""
    #: the platform's technical limit of agents per tenant
    max_agents: int = 500
    iat_lifetime: float = 7 * DAY
    credential_lifetime: float = 7 * DAY
    access_token_lifetime: float = 1800
    signed_url_lifetime: float = 7 * DAY
    #: a registration older than this is taken as abandoned, so a crashed client can try again
    registration_timeout: float = 60
    #: clock difference tolerated on client assertions (`iat`, `nbf`, `exp`)
    assertion_leeway: float = 60
    #: the longest validity a client assertion may claim, so a stolen one is useful briefly; at least
    #: what mers devices sign (`DEVICE_ASSERTION_LIFETIME`), or every device token request is refused
    max_assertion_lifetime: float = 3600
    max_release_size: int = 8 << 30
    #: bodies of every other request (JSON, forms)
    max_request_size: int = 256 << 10

    @classmethod
    def from_toml(cls, text: str, *, source: str) -> HubSettings:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise HubSetupError(f"{source}: {exc}") from exc
        known = {item.name: item for item in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise HubSetupError(f"{source}: unknown setting {key!r}")
            values[key] = _checked(key, value, _SETTING_TYPES[known[key].type], source)
        return cls(**values)

    def to_toml(self) -> str:
        lines = ["# mers hub settings; see hub/home.py for what each one means"]
        for item in fields(self):
            value = getattr(self, item.name)
            lines.append(f"{item.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


#: a setting's annotation (a string: the module's annotations are postponed) to the type it must have
_SETTING_TYPES: dict[object, type] = {"str": str, "int": int, "float": float}

#: the longest of every duration setting (lifetimes, timeouts, leeways), in seconds: ten years. Beyond
#: some hundred years a signed URL's expiry no longer fits its 12 digits, nor a date its year, and every
#: task read would fail. The shortest is a second: tokens and URLs carry whole seconds, and a lifetime of
#: 0.5 would give devices `expires_in: 0` or a URL expired when issued
MAX_DURATION = 10 * 365 * DAY
#: the longest credential lifetime mers devices take (`mers.onboarding.MAX_CREDENTIAL_LIFETIME`, stated in
#: both packages, which may not import each other, and tied by a test): a device refuses a longer one, but
#: only after the hub has recorded the registration, which leaves it a used IAT and no credentials
DEVICE_MAX_CREDENTIAL_LIFETIME = 366 * DAY
#: shorter limits of their own: a device refuses an access token said to last more than a day, and
#: credentials said to last more than `DEVICE_MAX_CREDENTIAL_LIFETIME`
_LONGEST = {"access_token_lifetime": DAY, "credential_lifetime": DEVICE_MAX_CREDENTIAL_LIFETIME}
#: longer minimums of their own: the hub must accept the assertions devices sign
_SHORTEST = {"max_assertion_lifetime": DEVICE_ASSERTION_LIFETIME}


def _checked(key: str, value: object, expected: type, source: str) -> object:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool):
        raise HubSetupError(f"{source}: {key} must be a {expected.__name__}")
    if isinstance(value, int | float) and (not math.isfinite(value) or value <= 0):
        raise HubSetupError(f"{source}: {key} must be positive")
    if isinstance(value, float):  # every float setting is a duration in seconds
        shortest, longest = _SHORTEST.get(key, 1), _LONGEST.get(key, MAX_DURATION)
        if not shortest <= value <= longest:
            raise HubSetupError(f"{source}: {key} must be from {shortest} to {longest:.0f} seconds")
    return value


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@dataclass(frozen=True)
class HubHome:
    """The paths of one hub directory."""

    root: Path
    _settings: list[HubSettings] = field(default_factory=list, compare=False, repr=False)

    @property
    def settings_file(self) -> Path:
        return self.root / "hub.toml"

    @property
    def signing_key(self) -> Path:
        """RSA key that signs IATs, RATs and access tokens (0600)."""
        return self.root / "signing-key.pem"

    @property
    def url_secret(self) -> Path:
        """HMAC key of signed blob URLs (0600)."""
        return self.root / "url-secret"

    @property
    def admin_token(self) -> Path:
        """The admin token in clear, for the local CLI (0600); the hub itself keeps only its hash."""
        return self.root / "admin-token"

    @property
    def admin_token_hash(self) -> Path:
        return self.root / "admin-token.sha256"

    @property
    def ca_certificate(self) -> Path:
        """The CA devices trust for the hub: given to each board at the factory."""
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_certificate(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def url_file(self) -> Path:
        """Written by `serve` once it listens: the base URL, for scripts and the admin CLI."""
        return self.root / "url"

    @property
    def default_database(self) -> Path:
        return self.root / "hub.db"

    def settings(self) -> HubSettings:
        """The settings, read once (a hub restarts to change them)."""
        if not self._settings:
            try:
                text = self.settings_file.read_text(encoding="utf-8")
            except FileNotFoundError as exc:
                raise HubSetupError(
                    f"{self.root} is not a hub directory (no hub.toml); create one with: mers-hub init DIR"
                ) from exc
            except OSError as exc:
                raise HubSetupError(f"cannot read {self.settings_file}: {exc.strerror}") from exc
            self._settings.append(HubSettings.from_toml(text, source=str(self.settings_file)))
        return self._settings[0]

    def database_url(self) -> str:
        return self.settings().database_url or f"sqlite:///{self.default_database}"

    def read_secret(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise HubSetupError(f"cannot read {path}: {exc.strerror}") from exc

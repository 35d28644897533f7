"""Boarding data: what the device needs to register with its hub, where it comes from, how it is checked.

The factory writes it to the board (`Board.boarding_data()`); a gateway whose boarding data arrives later
on a USB stick (a new IAT after offboarding) imports it with `mers boarding import`. A board locked at the
factory refuses `write_boarding_data` (`BoardLockedError`), so an import on a locked board is kept in the
state directory (`boarding-import.json`) and takes precedence over the board's copy; on an unlocked board
it is written to the board itself.

Import file (`mers boarding import FILE`): either a bundle, one JSON object
`{"boardingConfiguration": {...the hub's boarding configuration...}, "ca": "<PEM>", "network": {...}?}`,
or the plain boarding configuration JSON (as the hub hands it out) with the CA given by `--ca PEM`.

Network configuration (optional, JSON object): `{"proxy": "http://host:3128", "username": "u",
"password": "p"}` (credentials may instead be in the URL); it applies to all hub traffic.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from board.errors import BoardError, BoardLockedError
from board.errors import BoardingDataError as BoardBoardingDataError
from board.interface import Board, BoardingData
from board.keystore import validate_boarding_data

from .errors import BoardingDataError, CorruptStateError, InputError, StorageError

IMPORT_FILE = "boarding-import.json"
#: the IAT of pending boarding data the hub refused for good (used or expired) while credentials were held
REFUSED_FILE = "boarding-refused.json"
MAX_IMPORT_FILE = 2 * 1024 * 1024
_NETWORK_KEYS = frozenset({"proxy", "username", "password"})
# schemes a proxy URL commonly has, safe to name in a message (only plain http is supported)
_PROXY_SCHEMES = frozenset({"http", "https", "socks4", "socks4a", "socks5", "socks5h"})


class CredentialProfile(enum.StrEnum):
    SHARED_SECRET = "SHARED_SECRET"  # noqa: S105 - a profile name; HS256 assertions with the secret the hub hands out
    RSA_3072 = "RSA_3072"  # RS256 assertions with the device's own key; the hub only sees the public JWK


class BoardingSource(enum.StrEnum):
    BOARD = "board"
    IMPORTED = "imported"


@dataclass(frozen=True)
class NetworkConfig:
    """An HTTP proxy that tunnels (CONNECT) all hub traffic; `proxy_url` carries the credentials."""

    proxy_url: str = field(repr=False)

    @property
    def display(self) -> str:
        """The proxy without its credentials, for status and messages: read as the transport (urllib3)
        reads it, so the host shown is the host connected to."""
        parts = parse_url(self.proxy_url)
        return f"{parts.scheme}://{parts.host or ''}{':' + str(parts.port) if parts.port else ''}"


@dataclass(frozen=True)
class Boarding:
    """Validated boarding data and the fields the client uses."""

    data: BoardingData = field(repr=False)  # its configuration holds the IAT
    source: BoardingSource
    client_id: str
    tenant: str
    base_url: str
    profile: CredentialProfile
    iat: str = field(repr=False)
    iat_id: str
    iat_expires_at: int | None
    network: NetworkConfig | None


def parse_boarding(data: BoardingData, source: BoardingSource) -> Boarding:
    """Check boarding data with the board's own validation (the same the factory console applies), plus
    what the client needs: an https base URL (TLS is always verified against the boarding CA) and a
    usable network configuration."""
    try:
        summary = validate_boarding_data(data)
    except BoardBoardingDataError as exc:
        raise BoardingDataError(f"boarding data [{exc.field}]: {exc}") from exc
    base_url = summary.base_url.rstrip("/")
    if urllib.parse.urlsplit(base_url).scheme != "https":
        raise BoardingDataError(
            f"boarding data: baseUrl {base_url!r} is not https; the hub is only reached over TLS"
        )
    content = json.loads(data.config)["content"]
    return Boarding(
        data=data,
        source=source,
        client_id=summary.client_id,
        tenant=summary.tenant,
        base_url=base_url,
        profile=CredentialProfile(summary.profiles[0]),
        iat=content["iat"],
        iat_id=summary.iat_id or summary.config_sha256.hex(),
        iat_expires_at=summary.iat_expires_at,
        network=None if data.network is None else parse_network(data.network),
    )


def parse_network(raw: bytes) -> NetworkConfig:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise BoardingDataError(f"network configuration is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BoardingDataError("network configuration is not a JSON object")
    unknown = sorted(set(document) - _NETWORK_KEYS)
    if unknown:
        raise BoardingDataError(f"network configuration: unknown key(s) {', '.join(unknown)}")
    proxy = document.get("proxy")
    if not isinstance(proxy, str):
        raise BoardingDataError("network configuration: proxy must be a URL string like http://host:3128")
    try:
        parts = urllib.parse.urlsplit(proxy)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
        transport = parse_url(proxy)  # what urllib3 will make of it: a blank in the host, a bad %-escape...
    except (ValueError, LocationParseError):
        # not quoted: a proxy URL may carry a password
        raise BoardingDataError(
            "network configuration: the proxy is not a valid http://host:port URL"
        ) from None
    if parts.scheme != "http" or not parts.hostname:
        # not quoted either: only a scheme named in _PROXY_SCHEMES is shown, as any other "scheme" may be
        # the start of `user:password@...` written without one
        shown = f" (not {parts.scheme}://)" if parts.scheme in _PROXY_SCHEMES - {"http"} else ""
        raise BoardingDataError(f"network configuration: the proxy must be an http://host:port URL{shown}")
    if any(char.isspace() or not char.isprintable() for char in parts.hostname):  # older urllib3 let it by
        raise BoardingDataError(
            "network configuration: the proxy's host holds a blank or a control character"
        )
    # A proxy URL is scheme://[user:password@]host[:port][/], nothing after. Where the two parsers part
    # (`http://host:3128\\@x`: urllib3 connects to host, urlsplit reads x) the rest is refused, so the
    # credentials folded in below, and the status line, can only be about the host connected to.
    if (
        parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or transport.path not in (None, "", "/")
        or transport.query
        or transport.fragment
        or transport.port != parts.port
    ):
        raise BoardingDataError(
            "network configuration: the proxy URL has more than http://host:port (a path, a query, "
            "a fragment or a backslash)"
        )
    username, password = document.get("username"), document.get("password")
    if username is None and password is None:
        return NetworkConfig(proxy)
    if not isinstance(username, str) or not isinstance(password, str) or parts.username:
        raise BoardingDataError("network configuration: give username and password as strings, once")
    credentials = f"{urllib.parse.quote(username, safe='')}:{urllib.parse.quote(password, safe='')}"
    netloc = f"{credentials}@{parts.netloc}"
    return NetworkConfig(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))


# --- where the boarding data lives ------------------------------------------------------------------


def current_boarding(board: Board) -> Boarding | None:
    """The boarding data to onboard with: an import kept in the state directory, else the board's."""
    imported = board.state.read(IMPORT_FILE)
    if imported is not None:
        return parse_boarding(
            boarding_from_json(_json_object(imported, IMPORT_FILE)), BoardingSource.IMPORTED
        )
    try:
        data = board.boarding_data()
    except BoardError as exc:
        raise StorageError(f"cannot read the board's boarding data: {exc}") from exc
    return None if data is None else parse_boarding(data, BoardingSource.BOARD)


def store_imported(board: Board, boarding: Boarding) -> BoardingSource:
    """Keep validated imported boarding data: on the board while it is unlocked, else in the state
    directory (a locked board refuses boarding writes for good). Returns where it went."""
    try:
        if not board.is_locked():
            board.write_boarding_data(boarding.data)
            board.state.delete(IMPORT_FILE)  # an older import would shadow what was just written
            board.state.delete(REFUSED_FILE)  # what the operator imports now is tried again
            return BoardingSource.BOARD
    except BoardLockedError:
        pass  # locked between the check and the write: keep it in the state directory
    except BoardError as exc:
        raise StorageError(f"cannot write boarding data to the board: {exc}") from exc
    board.state.write(IMPORT_FILE, json.dumps(boarding_to_json(boarding.data)).encode())
    board.state.delete(REFUSED_FILE)
    return BoardingSource.IMPORTED


def set_aside_refused(board: Board, iat_id: str) -> None:
    """Remember that the hub refused the IAT `iat_id` for good, so a gateway that still holds working
    credentials stops registering with it: each try only got the same refusal, and stopped the daemon."""
    board.state.write(REFUSED_FILE, json.dumps({"iat_id": iat_id}).encode())


def refused_iat(board: Board) -> str | None:
    """The IAT set aside by `set_aside_refused`, if any; an unreadable record counts as none (the worst
    that costs is one more refused registration)."""
    raw = board.state.read(REFUSED_FILE)
    try:
        iat_id = None if raw is None else json.loads(raw).get("iat_id")
    except (ValueError, AttributeError):
        return None
    return iat_id if isinstance(iat_id, str) else None


def read_import_file(
    path: Path, ca_path: Path | None = None, network_path: Path | None = None
) -> BoardingData:
    """Boarding data from a USB stick: the bundle form, or a plain configuration with `--ca`."""
    raw = _read(path, MAX_IMPORT_FILE)
    document = _json_object(raw, str(path))
    if "content" in document:
        if ca_path is None:
            raise InputError(f"{path} is a plain boarding configuration: give the hub's CA with --ca FILE")
        network_raw = None if network_path is None else _read(network_path, MAX_IMPORT_FILE)
        return BoardingData(raw, _read(ca_path, MAX_IMPORT_FILE), network_raw)
    if ca_path is not None or network_path is not None:
        raise InputError(f"{path} is a bundle that carries its CA and network: --ca/--network are not used")
    configuration, ca, network = (document.get(key) for key in ("boardingConfiguration", "ca", "network"))
    if not isinstance(configuration, dict) or not isinstance(ca, str):
        raise InputError(
            f"{path}: expected {{'boardingConfiguration': {{...}}, 'ca': '<PEM>', 'network'?: {{...}}}}"
        )
    if network is not None and not isinstance(network, dict):
        raise InputError(f"{path}: network must be a JSON object")
    return BoardingData(
        json.dumps(configuration).encode(),
        ca.encode(),
        None if network is None else json.dumps(network).encode(),
    )


def boarding_to_json(data: BoardingData) -> dict[str, Any]:
    return {
        "config": base64.b64encode(data.config).decode(),
        "ca": base64.b64encode(data.ca_bundle).decode(),
        "network": None if data.network is None else base64.b64encode(data.network).decode(),
    }


def boarding_from_json(document: dict[str, Any]) -> BoardingData:
    try:
        network = document["network"]
        return BoardingData(
            base64.b64decode(document["config"], validate=True),
            base64.b64decode(document["ca"], validate=True),
            None if network is None else base64.b64decode(network, validate=True),
        )
    except (KeyError, TypeError, binascii.Error) as exc:
        raise CorruptStateError(f"stored boarding data is damaged: {exc!r}") from exc


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InputError(f"{what} is not a JSON object")
    return document


def _read(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise InputError(f"{path} is larger than {limit} bytes")
    return data

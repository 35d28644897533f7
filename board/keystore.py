"""The emulated OTP: trust-anchor key slots, the provisioning lock, the security-counter floor and the
boarding data, kept together in one file written atomically.

The rules live in pure transition functions (`with_key`, `with_revoked`, `with_lock`, `with_floor`,
`with_boarding`) that take a `KeyStoreState` and return the next one or raise; `KeyStore` only reads the
file, applies one transition under a lock and writes the result. Because everything is one file, a crash
leaves the old state or the new one, and a lock can never see keys from one moment and boarding data
from another.

Boarding data is checked here before it is stored (`validate_boarding_data`): what a device needs to
onboard, so a bad record is refused at the factory rather than discovered on site.

A board gets its store once (`initialise`); afterwards a missing or damaged file is an error, never a
reset: a reset would unlock the board and un-revoke its keys. (On a real gateway this file is only as
tamper-proof as the filesystem it lives on: root can rewrite it. Real OTP, eFuses or a TPM NV index are
what would make it hardware-enforced; this module keeps their semantics so such a backend can replace it.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import math
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509

from signing import PublicKey, SigningError, Trust, class_uuid, public_key_from_bytes, vendor_uuid

from .errors import (
    BoardingDataError,
    BoardLockedError,
    CorruptStoreError,
    DuplicateKeyError,
    InvalidKeyError,
    KeyRevokedError,
    KeySlotEmptyError,
    KeySlotIndexError,
    LastKeyError,
    NotReadyToLockError,
    SecurityCounterRegressionError,
    StorageError,
    WriteOnceError,
)
from .interface import (
    KEY_SLOT_COUNT,
    MAX_CA_BUNDLE_SIZE,
    MAX_CONFIG_SIZE,
    MAX_NETWORK_SIZE,
    Board,
    BoardingData,
    KeySlot,
    KeySlotState,
    LockCheck,
)
from .storage import (
    SECRET_MODE,
    ensure_directory,
    read_if_present,
    remove_stale_temporaries,
    write_atomically,
)

_FORMAT = "mers-keystore"
_VERSION = 1
_COUNTER_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class KeyStoreState:
    key_slots: tuple[KeySlot, ...]
    locked: bool = False
    security_counter_floor: int = 0
    boarding: BoardingData | None = None

    @classmethod
    def empty(cls) -> KeyStoreState:
        return cls(tuple(KeySlot(index, KeySlotState.EMPTY, None, None) for index in range(KEY_SLOT_COUNT)))

    @property
    def usable_keys(self) -> tuple[KeySlot, ...]:
        return tuple(slot for slot in self.key_slots if slot.state is KeySlotState.WRITTEN)


# --- transitions (pure) ----------------------------------------------------------------------------


def with_key(state: KeyStoreState, index: int, public_key_der: bytes) -> KeyStoreState:
    """Write a trust anchor into an empty slot; the same key again changes nothing."""
    slot = _slot(state, index)
    if state.locked:
        raise BoardLockedError(f"the board is locked: key slot {index} cannot be written")
    key = canonical_public_key(public_key_der)
    if slot.state is KeySlotState.REVOKED:
        raise KeyRevokedError(f"key slot {index} is revoked; it can never be written again")
    if slot.state is KeySlotState.WRITTEN:
        if slot.public_key_der == key.der:
            return state
        raise WriteOnceError(
            f"key slot {index} already holds key {_short(slot.key_hash)}; trust anchors are write-once"
        )
    for other in state.key_slots:
        if other.public_key_der == key.der:
            # the same key in two slots would stay trusted through one after being revoked in the other
            raise DuplicateKeyError(f"key {_short(other.key_hash)} is already in key slot {other.index}")
    written = KeySlot(index, KeySlotState.WRITTEN, key.der, key.key_hash)
    return _with_slot(state, written)


def with_revoked(state: KeyStoreState, index: int) -> KeyStoreState:
    """Revoke a written key for good; revoking it again changes nothing.

    Allowed after the lock: revocation only ever removes trust, and a leaked release key must be
    revocable in the field. Refused for the last usable key of a locked board, which could then never
    accept another image and would be bricked for updates."""
    slot = _slot(state, index)
    if slot.state is KeySlotState.REVOKED:
        return state
    if slot.state is KeySlotState.EMPTY:
        raise KeySlotEmptyError(f"key slot {index} holds no key to revoke")
    if state.locked and len(state.usable_keys) == 1:
        raise LastKeyError(
            f"key slot {index} holds the last usable key of a locked board; revoking it would leave the "
            "board unable to accept any image"
        )
    return _with_slot(state, replace(slot, state=KeySlotState.REVOKED))


def with_lock(state: KeyStoreState, check: LockCheck | None = None) -> KeyStoreState:
    """End provisioning. A board locked without a usable key or boarding data could never verify an image
    or reach its hub, and nothing could be added any more. `check` sees what is being sealed."""
    if state.locked:
        return state
    if not state.usable_keys:
        raise NotReadyToLockError("cannot lock: no usable key is written")
    if state.boarding is None:
        raise NotReadyToLockError("cannot lock: no boarding data is written")
    if check is not None:
        check(state.key_slots, state.boarding)
    return replace(state, locked=True)


def with_floor(state: KeyStoreState, value: int) -> KeyStoreState:
    """Raise the security-counter floor; it never goes down, so an old image can never come back."""
    if not 0 <= value <= _COUNTER_MAX:
        raise SecurityCounterRegressionError(f"security counter {value} does not fit in 32 bits")
    if value < state.security_counter_floor:
        raise SecurityCounterRegressionError(
            f"security counter floor {state.security_counter_floor} cannot be lowered to {value}"
        )
    if value == state.security_counter_floor:
        return state
    return replace(state, security_counter_floor=value)


def with_boarding(state: KeyStoreState, data: BoardingData) -> KeyStoreState:
    """Store validated boarding data (replacing earlier data until the lock)."""
    if state.locked:
        raise BoardLockedError("the board is locked: boarding data cannot be written")
    validate_boarding_data(data)
    if data == state.boarding:
        return state
    return replace(state, boarding=data)


def canonical_public_key(data: bytes) -> PublicKey:
    """The trust anchor in `data`, which must be a supported public key in exactly the DER form MCUboot
    embeds and hashes (PKCS#1 for RSA, SubjectPublicKeyInfo otherwise). Another encoding of the same key
    (PEM, RSA as SubjectPublicKeyInfo) would get a key hash that no image's KEYHASH ever matches."""
    try:
        key = public_key_from_bytes(data, source="the key")
    except SigningError as exc:
        raise InvalidKeyError(str(exc)) from exc
    if key.der != data:
        raise InvalidKeyError(
            "the key is not in the DER form MCUboot embeds (PKCS#1 for RSA, SubjectPublicKeyInfo otherwise)"
        )
    return key


def _slot(state: KeyStoreState, index: int) -> KeySlot:
    if not 0 <= index < len(state.key_slots):
        raise KeySlotIndexError(f"there is no key slot {index} (slots are 0 to {len(state.key_slots) - 1})")
    return state.key_slots[index]


def _with_slot(state: KeyStoreState, slot: KeySlot) -> KeyStoreState:
    slots = list(state.key_slots)
    slots[slot.index] = slot
    return replace(state, key_slots=tuple(slots))


def _short(key_hash: bytes | None) -> str:
    return key_hash.hex()[:16] if key_hash else "?"


# --- boarding data ---------------------------------------------------------------------------------

#: bounds on what a station may put into the OTP file: enough for any real bundle, not a way to fill a disk;
#: part of the serial protocol's contract, so a station can refuse too large data before writing a key
CREDENTIAL_PROFILES = frozenset({"SHARED_SECRET", "RSA_3072"})


@dataclass(frozen=True)
class BoardingSummary:
    """What validation found in boarding data, as the console's `info` reports it."""

    client_id: str
    tenant: str
    base_url: str
    profiles: tuple[str, ...]
    iat_expires_at: int | None  # the IAT's `exp` (epoch seconds)
    iat_id: str | None  # the IAT's `jti`
    config_sha256: bytes
    ca_sha256: bytes
    network_sha256: bytes | None


def validate_boarding_data(data: BoardingData) -> BoardingSummary:
    """Check everything a device needs to onboard, so a bad record is refused at the factory instead of
    being found on site: the configuration's fields, that the IAT is a JWT issued for this `clientId`
    (its signature is the hub's to check), that the CA bundle holds certificates, that the network
    configuration is JSON."""
    content = _config_content(data.config)
    client_id = _text_field(content, "clientId")
    tenant = _text_field(content, "tenant")
    base_url = _text_field(content, "baseUrl")
    _check_base_url(base_url)
    profiles = _profiles(content.get("clientCredentialProfile"))
    claims = _iat_claims(_text_field(content, "iat"))
    if claims.get("sub") != client_id:
        raise BoardingDataError(
            f"the IAT was issued for {claims.get('sub')!r}, not for clientId {client_id!r}",
            field="config.content.iat",
        )
    expires = claims.get("exp")
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(expires)
    ):
        raise BoardingDataError("the IAT's exp claim is not a finite number", field="config.content.iat")
    jti = claims.get("jti")
    _check_ca_bundle(data.ca_bundle)
    if data.network is not None:
        _json_object(data.network, "network", MAX_NETWORK_SIZE)
    return BoardingSummary(
        client_id=client_id,
        tenant=tenant,
        base_url=base_url,
        profiles=profiles,
        iat_expires_at=None if expires is None else int(expires),
        iat_id=jti if isinstance(jti, str) else None,
        config_sha256=hashlib.sha256(data.config).digest(),
        ca_sha256=hashlib.sha256(data.ca_bundle).digest(),
        network_sha256=None if data.network is None else hashlib.sha256(data.network).digest(),
    )


def _config_content(config: bytes) -> dict[str, Any]:
    document = _json_object(config, "config", MAX_CONFIG_SIZE)
    content = document.get("content")
    if not isinstance(content, dict):
        raise BoardingDataError("the boarding configuration has no content object", field="config.content")
    return content


def _json_object(data: bytes, field: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise BoardingDataError(f"{field} is {len(data)} bytes; at most {limit} are accepted", field=field)
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BoardingDataError(f"{field} is not UTF-8 JSON: {exc}", field=field) from exc
    if not isinstance(document, dict):
        raise BoardingDataError(f"{field} is not a JSON object", field=field)
    return document


def _text_field(content: dict[str, Any], name: str) -> str:
    value = content.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BoardingDataError(
            f"content.{name} is missing or not a non-empty string", field=f"config.content.{name}"
        )
    return value


def _check_base_url(base_url: str) -> None:
    """An http(s) URL with a host. urlsplit raises ValueError on some malformed URLs (an unclosed IPv6
    bracket, ``https://[hub.example``): that is bad boarding data naming its field, not an internal error
    of the board."""
    field = "config.content.baseUrl"
    try:
        parsed = urllib.parse.urlsplit(base_url)
    except ValueError as exc:
        raise BoardingDataError(f"baseUrl {base_url!r} is not a URL: {exc}", field=field) from exc
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise BoardingDataError(f"baseUrl {base_url!r} is not an http(s) URL", field=field)


def _profiles(value: object) -> tuple[str, ...]:
    field = "config.content.clientCredentialProfile"
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise BoardingDataError("clientCredentialProfile is not a non-empty list of names", field=field)
    unknown = [item for item in value if item not in CREDENTIAL_PROFILES]
    if unknown:
        raise BoardingDataError(
            f"unknown client credential profile {', '.join(unknown)} (known: SHARED_SECRET, RSA_3072)",
            field=field,
        )
    return tuple(value)


def _iat_claims(token: str) -> dict[str, Any]:
    """The IAT's claims, read without checking its signature (the device has no key to check it with; the
    hub checks it at registration). Refuses anything that is not three base64url segments of JSON."""
    field = "config.content.iat"
    if token.count(".") != 2:
        raise BoardingDataError("the IAT is not a JWT (three base64url segments)", field=field)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise BoardingDataError(f"the IAT is not a readable JWT: {exc}", field=field) from exc
    return claims


def _check_ca_bundle(bundle: bytes) -> None:
    if len(bundle) > MAX_CA_BUNDLE_SIZE:
        raise BoardingDataError(
            f"the CA bundle is {len(bundle)} bytes; at most {MAX_CA_BUNDLE_SIZE} are accepted",
            field="ca_bundle",
        )
    try:
        certificates = x509.load_pem_x509_certificates(bundle)
    except ValueError as exc:
        raise BoardingDataError(f"the CA bundle is not PEM certificates: {exc}", field="ca_bundle") from exc
    if not certificates:
        raise BoardingDataError("the CA bundle holds no certificate", field="ca_bundle")


# --- the file --------------------------------------------------------------------------------------


class KeyStore:
    """The OTP file: read, or apply one transition under an exclusive lock and write it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def read(self) -> KeyStoreState:
        data = read_if_present(self.path)
        if data is None:
            # never "factory-fresh": deleting the file would then unlock the board and forget revocations
            raise CorruptStoreError(
                f"key store {self.path} is missing; a new board gets one once, with `mers-board init`",
                field="key_store",
            )
        return decode_state(data, source=str(self.path))

    def update(self, transition: Callable[[KeyStoreState], KeyStoreState]) -> KeyStoreState:
        """Apply `transition` to the current state; write only if it changed anything."""
        with self._exclusive():
            current = self.read()
            new = transition(current)
            if new != current:
                write_atomically(self.path, encode_state(new), mode=SECRET_MODE)
            return new

    def exists(self) -> bool:
        return self.path.exists()

    def initialise(self) -> None:
        """Write a factory-fresh store, unless one exists: done once, when a board is made (`sim create`,
        or `mers-board init` on a gateway's first boot), never to recover from a missing file."""
        with self._exclusive():
            if read_if_present(self.path) is None:
                write_atomically(self.path, encode_state(KeyStoreState.empty()), mode=SECRET_MODE)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise read-modify-write between processes (the console and the installer)."""
        ensure_directory(self.path.parent)
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SECRET_MODE)
        except OSError as exc:
            raise StorageError(f"cannot open lock file {self._lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a writer killed between its temporary file and the rename left that file behind; under the
            # lock no other writer can be mid-write, so what is there now is debris
            remove_stale_temporaries(self.path)
            yield
        finally:
            os.close(fd)


def encode_state(state: KeyStoreState) -> bytes:
    body = _state_body(state)
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps({**body, "sha256": digest}, indent=1, sort_keys=True).encode() + b"\n"


def decode_state(data: bytes, *, source: str) -> KeyStoreState:
    """Parse the file, refusing anything we did not write (the self-hash catches damage and hand edits)."""
    try:
        document = json.loads(data)
        claimed = document.pop("sha256")
        if hashlib.sha256(_canonical(document)).hexdigest() != claimed:
            raise CorruptStoreError(f"{source}: its self-hash does not match: damaged or edited by hand")
        if document["format"] != _FORMAT or document["version"] != _VERSION:
            raise CorruptStoreError(f"{source} is not a version {_VERSION} {_FORMAT} file")
        state = _state_from_body(document)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError) as exc:
        raise CorruptStoreError(f"{source} is not a key store file: {exc}") from exc
    return state


def _state_body(state: KeyStoreState) -> dict[str, Any]:
    boarding = state.boarding
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "locked": state.locked,
        "security_counter_floor": state.security_counter_floor,
        "key_slots": [
            {"state": slot.state.value, "key": _b64(slot.public_key_der)} for slot in state.key_slots
        ],
        "boarding": None
        if boarding is None
        else {
            "config": _b64(boarding.config),
            "ca_bundle": _b64(boarding.ca_bundle),
            "network": _b64(boarding.network),
        },
    }


def _state_from_body(body: dict[str, Any]) -> KeyStoreState:
    if len(body["key_slots"]) != KEY_SLOT_COUNT:
        raise ValueError(f"it does not hold {KEY_SLOT_COUNT} key slots")
    slots = []
    for index, entry in enumerate(body["key_slots"]):
        slot_state = KeySlotState(entry["state"])
        der = _unb64(entry["key"])
        if (der is None) != (slot_state is KeySlotState.EMPTY):
            raise ValueError(f"key slot {index} is {slot_state.value} but {'has' if der else 'has no'} key")
        slots.append(KeySlot(index, slot_state, der, hashlib.sha256(der).digest() if der else None))
    boarding = body["boarding"]
    floor = body["security_counter_floor"]
    if not isinstance(floor, int) or not 0 <= floor <= _COUNTER_MAX or not isinstance(body["locked"], bool):
        raise ValueError("bad lock flag or security counter floor")
    return KeyStoreState(
        key_slots=tuple(slots),
        locked=body["locked"],
        security_counter_floor=floor,
        boarding=None
        if boarding is None
        else BoardingData(
            config=_require(_unb64(boarding["config"])),
            ca_bundle=_require(_unb64(boarding["ca_bundle"])),
            network=_unb64(boarding["network"]),
        ),
    )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _require(data: bytes | None) -> bytes:
    if data is None:
        raise ValueError("a required boarding field is missing")
    return data


# --- what an image verifier trusts on this board ---------------------------------------------------


def trust_for(board: Board, slot_size: int | None = None) -> Trust:
    """The `signing.verify.Trust` of `board`: its written and revoked keys (revoked ones are named so a
    verifier reports them as revoked, not unknown), its security-counter floor, its vendor and class."""
    slots = [slot for slot in board.key_slots() if slot.public_key_der is not None]
    keys = tuple(
        public_key_from_bytes(slot.public_key_der or b"", source=f"key slot {slot.index}") for slot in slots
    )
    identity = board.identity
    return Trust(
        keys=keys,
        revoked=frozenset(
            slot.key_hash for slot in slots if slot.state is KeySlotState.REVOKED and slot.key_hash
        ),
        min_security_counter=board.security_counter_floor(),
        vendor_uuid=vendor_uuid(identity.vendor),
        class_uuid=class_uuid(identity.vendor, identity.image_class),
        slot_size=slot_size,
    )

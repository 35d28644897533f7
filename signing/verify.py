"""Strict verification: the one safe call a device or a release pipeline makes before trusting an image.

Beyond what imgtool checks: a trusted key is required (no hash-only "verification"), KEYHASH must name the
key that really signed (imgtool ignores it), revoked keys, the security-counter floor (downgrades), the
board's vendor and class (an image for other hardware), and the slot size are all enforced, and every
length is checked before use. The payload is hashed in fixed-size chunks: memory does not grow with it.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import (
    BadSignatureError,
    ClassMismatchError,
    HashMismatchError,
    KeyHashMismatchError,
    NoSignatureError,
    RevokedKeyError,
    SecurityCounterError,
    SignatureTypeError,
    SlotTooSmallError,
    UnknownKeyError,
    VendorMismatchError,
)
from .files import PrefixHasher, file_size, open_input
from .image_format import ImageVersion
from .keys import PublicKey
from .layout import FileSource, read_layout
from .manifest import Manifest, SignatureEntry, read_manifest


@dataclass(frozen=True)
class Trust:
    """What the verifying side believes: its trust anchors and the constraints of its hardware."""

    keys: tuple[PublicKey, ...]
    revoked: frozenset[bytes] = frozenset()  # key hashes
    min_security_counter: int = 0
    vendor_uuid: uuid.UUID | None = None
    class_uuid: uuid.UUID | None = None
    slot_size: int | None = None


@dataclass(frozen=True)
class VerifiedImage:
    """An image that passed every check; only this type should ever reach a slot."""

    version: ImageVersion
    security_counter: int
    img_size: int
    hdr_size: int
    digest: bytes
    signed_by: tuple[bytes, ...]  # key hashes of the trusted keys whose signatures verified
    vendor_uuid: uuid.UUID | None
    class_uuid: uuid.UUID | None
    custom_tlvs: tuple[tuple[int, bytes], ...] = field(default=())


def verify_image(path: Path, trust: Trust) -> VerifiedImage:
    """Verify the image file at `path` against `trust`, or raise the `SigningError` naming what failed."""
    with open_input(path, "image") as handle, PrefixHasher(handle) as hasher:
        return verify_open_image(handle, hasher, trust)


def verify_open_image(handle: BinaryIO, hasher: PrefixHasher, trust: Trust) -> VerifiedImage:
    """`verify_image` for a file already open and being hashed (the CLI starts hashing first, so that
    loading this module and the keys costs no time). A stream of bytes goes through
    `signing.stream.ImageVerifier` instead; both end in `judge_digest`."""
    layout = read_layout(FileSource(handle.fileno(), file_size(handle)))
    manifest = read_manifest(layout)
    signers = check_manifest(manifest, trust)
    return judge_digest(manifest, hasher.digest(layout.signed_length), signers)


def check_manifest(manifest: Manifest, trust: Trust) -> tuple[bytes, ...]:
    """Every check that needs no payload byte, so a device rejects early: hardware, downgrade, size, and
    the signatures over the digest the image claims. Returns the key hashes whose signatures verify."""
    _check_hardware(manifest, trust)
    counter = manifest.security_counter or 0
    if counter < trust.min_security_counter:
        raise SecurityCounterError(
            f"security counter {counter} is below the device's floor {trust.min_security_counter}"
        )
    if trust.slot_size is not None and manifest.img_size > trust.slot_size:
        raise SlotTooSmallError(
            f"payload of {manifest.img_size} bytes does not fit the {trust.slot_size}-byte slot"
        )
    return _trusted_signers(manifest, trust)


def require_digest(computed: bytes, claimed: bytes) -> None:
    """The signed range hashed to `computed` must be what the image claims (and its signatures cover)."""
    if not hmac.compare_digest(computed, claimed):
        raise HashMismatchError(
            f"image hash {computed.hex()} differs from the signed SHA256 {claimed.hex()}: "
            "the header, payload or protected TLVs were changed"
        )


def judge_digest(manifest: Manifest, computed: bytes, signers: tuple[bytes, ...]) -> VerifiedImage:
    """The last step, once the signed range has been hashed and `check_manifest` found `signers`."""
    require_digest(computed, manifest.digest)
    return VerifiedImage(
        version=manifest.version,
        security_counter=manifest.security_counter or 0,
        img_size=manifest.img_size,
        hdr_size=manifest.hdr_size,
        digest=manifest.digest,
        signed_by=signers,
        vendor_uuid=manifest.vendor_uuid,
        class_uuid=manifest.class_uuid,
        custom_tlvs=manifest.custom_tlvs,
    )


def _check_hardware(manifest: Manifest, trust: Trust) -> None:
    if trust.vendor_uuid is not None and manifest.vendor_uuid != trust.vendor_uuid:
        found = manifest.vendor_uuid or "none"
        raise VendorMismatchError(f"image vendor UUID {found} is not this device's {trust.vendor_uuid}")
    if trust.class_uuid is not None and manifest.class_uuid != trust.class_uuid:
        found = manifest.class_uuid or "none"
        raise ClassMismatchError(f"image class UUID {found} is not this device's {trust.class_uuid}")


def _trusted_signers(manifest: Manifest, trust: Trust) -> tuple[bytes, ...]:
    if not manifest.signatures:
        raise NoSignatureError("the image is not signed")
    by_hash = {key.key_hash: key for key in trust.keys}
    accepted: list[bytes] = []
    revoked: list[bytes] = []
    unknown: list[bytes] = []
    for entry in manifest.signatures:
        key = by_hash.get(entry.key_hash)
        if key is None:
            _refuse_mislabelled(entry, manifest.digest, trust.keys)
            unknown.append(entry.key_hash)
        elif entry.key_hash in trust.revoked:
            revoked.append(entry.key_hash)
        else:
            try:
                _check_signature(entry, key, manifest.digest)
            except (SignatureTypeError, BadSignatureError):
                # the KEYHASH may have been redirected from the trusted key that really signed
                _refuse_mislabelled(entry, manifest.digest, trust.keys)
                raise
            accepted.append(entry.key_hash)
    if accepted:
        return tuple(accepted)
    if revoked:
        raise RevokedKeyError(f"the image is signed only by revoked key(s) {_short(revoked)}")
    raise UnknownKeyError(f"the image is signed only by untrusted key(s) {_short(unknown)}")


def _check_signature(entry: SignatureEntry, key: PublicKey, digest: bytes) -> None:
    expected = key.algorithm.signature_tlv
    if entry.tlv_type != expected:
        raise SignatureTypeError(
            f"key {entry.key_hash.hex()[:16]} is {key.algorithm.value} but its signature TLV is "
            f"{entry.tlv_type.name}, not {expected.name}"
        )
    if not key.verifies(entry.signature, digest):
        raise BadSignatureError(
            f"the {entry.tlv_type.name} signature of trusted key {entry.key_hash.hex()[:16]} does not verify"
        )


def _refuse_mislabelled(entry: SignatureEntry, digest: bytes, keys: Iterable[PublicKey]) -> None:
    """A signature a trusted key made, under a KEYHASH naming another key, means the KEYHASH was altered:
    refuse it loudly rather than treat it as merely unknown (imgtool accepts such an image)."""
    for key in keys:
        if key.algorithm.signature_tlv == entry.tlv_type and key.verifies(entry.signature, digest):
            raise KeyHashMismatchError(
                f"KEYHASH {entry.key_hash.hex()[:16]} does not match the key that made the signature "
                f"({key.key_hash.hex()[:16]})"
            )


def _short(hashes: list[bytes]) -> str:
    return ", ".join(h.hex()[:16] for h in hashes)

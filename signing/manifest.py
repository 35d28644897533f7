"""What an image's TLVs say, checked for shape: the claimed digest, the metadata, the signatures.

A `Manifest` is read from a layout before any payload byte is hashed, so a device can reject a wrong
vendor, a downgrade or an unknown key from the header and trailer alone (docs/design.md §3, "reject
early"). Nothing here decides trust; `verify.py` does that.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BadTlvError, MissingHashError, MissingKeyHashError, UnsupportedImageError
from .image_format import (
    CUSTOM_TLV_MAX,
    CUSTOM_TLV_MIN,
    REFUSED_FLAGS,
    SIGNATURE_TLV_TYPES,
    ImageFlag,
    ImageVersion,
    SecurityCounterValue,
    TlvType,
)
from .layout import ImageLayout, TlvEntry

_DIGEST_SIZE = 32
_UUID_SIZE = 16
_SIGNATURE_SIZES = {
    TlvType.RSA3072: range(384, 385),
    TlvType.ED25519: range(64, 65),
    TlvType.ECDSASIG: range(8, 73),  # DER, 70-72 bytes in practice
}
#: protected TLVs we carry without interpreting them: they are covered by the hash, so harmless
_OPAQUE_PROTECTED = frozenset(
    {
        TlvType.DEPENDENCY,
        TlvType.BOOT_RECORD,
        TlvType.DECOMP_SIZE,
        TlvType.DECOMP_SHA,
        TlvType.DECOMP_SIGNATURE,
    }
)
#: unprotected TLVs of MCUboot features we refuse, with the reason a user can act on
_UNSUPPORTED_UNPROTECTED = {
    TlvType.PUBKEY: "a full public key instead of KEYHASH (sign with imgtool --public-key-format hash)",
    TlvType.SHA384: "a SHA-384 image hash (only SHA-256 is supported)",
    TlvType.SHA512: "a SHA-512 image hash (only SHA-256 is supported)",
    TlvType.SIG_PURE: "a pure signature over the whole image (only digest signatures are supported)",
    TlvType.RSA2048: "an RSA-2048 signature (only RSA-3072 is supported)",
    TlvType.ENCRSA2048: "an encrypted payload",
    TlvType.ENCKW: "an encrypted payload",
    TlvType.ENCEC256: "an encrypted payload",
    TlvType.ENCX25519: "an encrypted payload",
    TlvType.ENCX25519_SHA512: "an encrypted payload",
}


@dataclass(frozen=True)
class SignatureEntry:
    """A KEYHASH and the signature TLV that follows it."""

    key_hash: bytes
    tlv_type: TlvType
    signature: bytes


@dataclass(frozen=True)
class Manifest:
    version: ImageVersion
    img_size: int
    hdr_size: int
    flags: int
    digest: bytes
    security_counter: int | None
    vendor_uuid: uuid.UUID | None
    class_uuid: uuid.UUID | None
    custom_tlvs: tuple[tuple[int, bytes], ...]
    signatures: tuple[SignatureEntry, ...]


def read_manifest(layout: ImageLayout) -> Manifest:
    """Interpret both TLV areas, refusing what is malformed, repeated, misplaced or unsupported."""
    flags = layout.header.flags
    if flags & REFUSED_FLAGS:
        names = ", ".join(flag.name or hex(flag) for flag in ImageFlag if flag & flags & REFUSED_FLAGS)
        raise UnsupportedImageError(
            f"image flags {names} are not supported: a gateway slot takes the payload as it is", field="flags"
        )
    protected = _read_protected(layout.protected.entries if layout.protected else ())
    digest, signatures = _read_unprotected(layout.unprotected.entries)
    return Manifest(
        version=layout.header.version,
        img_size=layout.header.img_size,
        hdr_size=layout.header.hdr_size,
        flags=flags,
        digest=digest,
        security_counter=protected.security_counter,
        vendor_uuid=protected.vendor_uuid,
        class_uuid=protected.class_uuid,
        custom_tlvs=protected.custom_tlvs,
        signatures=signatures,
    )


@dataclass(frozen=True)
class _Protected:
    security_counter: int | None
    vendor_uuid: uuid.UUID | None
    class_uuid: uuid.UUID | None
    custom_tlvs: tuple[tuple[int, bytes], ...]


def _read_protected(entries: Iterable[TlvEntry]) -> _Protected:
    seen: set[int] = set()
    counter = vendor = image_class = None
    custom = []
    for entry in entries:
        name = _name(entry.type)
        if entry.type in seen:
            raise BadTlvError(f"{name} appears twice in the protected TLV area", field=name)
        seen.add(entry.type)
        if entry.type == TlvType.SEC_CNT:
            _expect_length(entry, 4)
            counter = SecurityCounterValue.parse(entry.value)
        elif entry.type == TlvType.UUID_VID:
            _expect_length(entry, _UUID_SIZE)
            vendor = uuid.UUID(bytes=entry.value)
        elif entry.type == TlvType.UUID_CID:
            _expect_length(entry, _UUID_SIZE)
            image_class = uuid.UUID(bytes=entry.value)
        elif CUSTOM_TLV_MIN <= entry.type <= CUSTOM_TLV_MAX:  # 0xffff is reserved, as imgtool has it
            custom.append((entry.type, entry.value))
        elif entry.type not in _OPAQUE_PROTECTED:
            raise BadTlvError(f"{name} is not allowed in the protected TLV area", field=name)
    return _Protected(counter, vendor, image_class, tuple(custom))


def _read_unprotected(entries: tuple[TlvEntry, ...]) -> tuple[bytes, tuple[SignatureEntry, ...]]:
    """The one SHA256 and the KEYHASH + signature pairs; anything else is refused."""
    digests = []
    signatures = []
    pending_key_hash: TlvEntry | None = None
    for entry in entries:
        name = _name(entry.type)
        if entry.type in _UNSUPPORTED_UNPROTECTED:
            raise UnsupportedImageError(
                f"the image carries {_UNSUPPORTED_UNPROTECTED[TlvType(entry.type)]}", field=name
            )
        if pending_key_hash is not None and entry.type not in SIGNATURE_TLV_TYPES:
            raise BadTlvError(
                f"KEYHASH at offset {pending_key_hash.offset} is not followed by a signature", field="KEYHASH"
            )
        if entry.type == TlvType.SHA256:
            _expect_length(entry, _DIGEST_SIZE)
            digests.append(entry.value)
        elif entry.type == TlvType.KEYHASH:
            _expect_length(entry, _DIGEST_SIZE)
            pending_key_hash = entry
        elif entry.type in SIGNATURE_TLV_TYPES:
            tlv_type = TlvType(entry.type)
            if pending_key_hash is None:
                raise MissingKeyHashError(
                    f"{name} signature at offset {entry.offset} has no KEYHASH before it", field="KEYHASH"
                )
            if len(entry.value) not in _SIGNATURE_SIZES[tlv_type]:
                raise BadTlvError(
                    f"{name} signature of {len(entry.value)} bytes has the wrong size", field=name
                )
            signatures.append(SignatureEntry(pending_key_hash.value, tlv_type, entry.value))
            pending_key_hash = None
        else:
            raise BadTlvError(f"{name} is not allowed in the unprotected TLV area", field=name)
    if pending_key_hash is not None:
        raise BadTlvError("the last KEYHASH is not followed by a signature", field="KEYHASH")
    if len(digests) != 1:
        raise MissingHashError(
            f"the image carries {len(digests)} SHA256 TLVs; exactly one is required", field="SHA256"
        )
    return digests[0], tuple(signatures)


def _expect_length(entry: TlvEntry, length: int) -> None:
    if len(entry.value) != length:
        name = _name(entry.type)
        raise BadTlvError(f"{name} is {len(entry.value)} bytes; it must be {length}", field=name)


def _name(tlv_type: int) -> str:
    try:
        return TlvType(tlv_type).name
    except ValueError:
        return f"TLV 0x{tlv_type:02x}"

"""The MCUboot image format, declared once with construct for both parsing and building.

Byte-compatible with MCUboot / imgtool 2.x (docs/design.md §3): a 32-byte header, the payload at
`hdr_size`, an optional protected TLV area (covered by the image hash) and the unprotected TLV area that
carries the hash, the key hashes and the signatures. All integers are little-endian. No offset arithmetic
on these structures lives outside this module.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct, this

from .errors import InvalidArgumentError

IMAGE_MAGIC = 0x96F3B83D
PROTECTED_TLV_INFO_MAGIC = 0x6908
TLV_INFO_MAGIC = 0x6907
HEADER_SIZE = 32
TLV_INFO_SIZE = 4
TLV_HEADER_SIZE = 4
CUSTOM_TLV_MIN = 0x00A0
CUSTOM_TLV_MAX = 0xFFFE
MAX_TLV_AREA = 0xFFFF  # the info's u16 total includes itself


class TlvType(enum.IntEnum):
    """TLV types we name (imgtool's TLV_VALUES); any other protected type is carried opaquely."""

    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    SHA384 = 0x11
    SHA512 = 0x12
    RSA2048 = 0x20
    ECDSASIG = 0x22
    RSA3072 = 0x23
    ED25519 = 0x24
    SIG_PURE = 0x25
    ENCRSA2048 = 0x30
    ENCKW = 0x31
    ENCEC256 = 0x32
    ENCX25519 = 0x33
    ENCX25519_SHA512 = 0x34
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60
    DECOMP_SIZE = 0x70
    DECOMP_SHA = 0x71
    DECOMP_SIGNATURE = 0x72
    UUID_VID = 0x74
    UUID_CID = 0x75


SIGNATURE_TLV_TYPES = frozenset({TlvType.RSA3072, TlvType.ECDSASIG, TlvType.ED25519})


class ImageFlag(enum.IntFlag):
    """Header flags (imgtool's IMAGE_F)."""

    PIC = 0x001
    ENCRYPTED_AES128 = 0x004
    ENCRYPTED_AES256 = 0x008
    NON_BOOTABLE = 0x010
    RAM_LOAD = 0x020
    ROM_FIXED = 0x100
    COMPRESSED_LZMA1 = 0x200
    COMPRESSED_LZMA2 = 0x400
    COMPRESSED_ARM_THUMB = 0x800


#: flags that change what the payload bytes mean: a gateway slot takes the payload as it is, so refuse them
REFUSED_FLAGS = (
    ImageFlag.ENCRYPTED_AES128
    | ImageFlag.ENCRYPTED_AES256
    | ImageFlag.COMPRESSED_LZMA1
    | ImageFlag.COMPRESSED_LZMA2
    | ImageFlag.COMPRESSED_ARM_THUMB
)

ImageHeader = Struct(
    "magic" / Int32ul,
    "load_addr" / Int32ul,
    "hdr_size" / Int16ul,
    "protect_tlv_size" / Int16ul,
    "img_size" / Int32ul,
    "flags" / Int32ul,
    "version"
    / Struct(
        "major" / Int8ul,
        "minor" / Int8ul,
        "revision" / Int16ul,
        "build" / Int32ul,
    ),
    "pad" / Int32ul,
)

TlvInfo = Struct("magic" / Int16ul, "total" / Int16ul)

TlvHeader = Struct("type" / Int16ul, "length" / Int16ul)

Tlv = Struct("type" / Int16ul, "length" / Int16ul, "value" / Bytes(this.length))

SecurityCounterValue = Int32ul


_VERSION_RE = re.compile(r"^(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*)(?:\+(0|[1-9]\d*))?)?)?$")


@dataclass(frozen=True, order=True)
class ImageVersion:
    """major.minor.revision+build, sized as the header stores it (u8, u8, u16, u32)."""

    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        match = _VERSION_RE.match(text.strip())
        if not match:
            raise InvalidArgumentError(
                f"version {text!r} is not of the form MAJOR[.MINOR[.REVISION[+BUILD]]]", field="version"
            )
        parts = [int(group) if group else 0 for group in match.groups()]
        limits = (0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)
        names = ("major", "minor", "revision", "build")
        for value, limit, name in zip(parts, limits, names, strict=True):
            if value > limit:
                raise InvalidArgumentError(f"version {name} {value} exceeds {limit}", field="version")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"


def vendor_uuid(vendor: str) -> uuid.UUID:
    """The UUID_VID of a vendor name, derived exactly as `imgtool --vid NAME` derives it."""
    return _uuid_from_text(uuid.NAMESPACE_DNS, vendor)


def class_uuid(vendor: str, image_class: str) -> uuid.UUID:
    """The UUID_CID of a class name, derived exactly as `imgtool --vid V --cid NAME` derives it."""
    return _uuid_from_text(vendor_uuid(vendor), image_class)


_RAW_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX_UUID_RE = re.compile(r"[0-9a-fA-F]{32}")


def _uuid_from_text(namespace: uuid.UUID, text: str) -> uuid.UUID:
    """A name becomes uuid5(namespace, name); a value already written as a UUID is taken as it is."""
    if _RAW_UUID_RE.fullmatch(text) or _HEX_UUID_RE.fullmatch(text):
        return uuid.UUID(hex=text.replace("-", ""))
    if not text or not text.isprintable():
        raise InvalidArgumentError(f"{text!r} is not a printable name or a UUID", field="uuid")
    return uuid.uuid5(namespace, text)

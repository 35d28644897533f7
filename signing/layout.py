"""Where everything sits in an image, read without trusting a single length.

`read_layout` reads only the header and the two TLV areas (each at most 64 KiB, so memory is bounded
whatever the file claims), checks every size and offset against the real size before using it, and never
lets a construct or struct exception escape: arbitrary bytes yield an `ImageFormatError` naming the field.
It works on anything that can read at an offset, so the installer can feed it HTTP range responses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from construct import ConstructError

from .errors import (
    BadMagicError,
    SizeOutOfRangeError,
    TlvOverrunError,
    TrailingDataError,
    TruncatedImageError,
)
from .image_format import (
    HEADER_SIZE,
    IMAGE_MAGIC,
    PROTECTED_TLV_INFO_MAGIC,
    TLV_HEADER_SIZE,
    TLV_INFO_MAGIC,
    TLV_INFO_SIZE,
    ImageHeader,
    ImageVersion,
    TlvHeader,
    TlvInfo,
)


class RandomAccess(Protocol):
    """A source of image bytes that knows its size and reads at an offset (a file, an HTTP range)."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class FileSource:
    """`RandomAccess` over an open file descriptor, with pread so no shared file position is touched."""

    fd: int
    size: int

    def read_at(self, offset: int, length: int) -> bytes:
        chunks = []
        while length > 0:
            chunk = os.pread(self.fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)


@dataclass(frozen=True)
class Header:
    magic: int
    load_addr: int
    hdr_size: int
    protect_tlv_size: int
    img_size: int
    flags: int
    version: ImageVersion
    pad: int


@dataclass(frozen=True)
class TlvEntry:
    """One TLV as found: its type, the absolute offset of its 4-byte header, and its value."""

    type: int
    offset: int
    value: bytes


@dataclass(frozen=True)
class TlvArea:
    magic: int
    offset: int
    total: int
    entries: tuple[TlvEntry, ...]


@dataclass(frozen=True)
class ImageLayout:
    header: Header
    protected: TlvArea | None
    unprotected: TlvArea
    file_size: int

    @property
    def payload_offset(self) -> int:
        return self.header.hdr_size

    @property
    def signed_length(self) -> int:
        """How many bytes from the start the SHA256 TLV covers: header, padding, payload, protected TLVs."""
        return self.unprotected.offset


def parse_header(data: bytes) -> Header:
    """The 32-byte header, with its magic checked (the one check that needs nothing but the header)."""
    if len(data) < HEADER_SIZE:
        raise TruncatedImageError(
            f"image is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header", field="header"
        )
    try:
        raw = ImageHeader.parse(data[:HEADER_SIZE])
    except ConstructError as exc:  # unreachable with 32 bytes, kept so no parser error can escape
        raise TruncatedImageError(f"unreadable header: {exc}", field="header") from exc
    if raw.magic != IMAGE_MAGIC:
        raise BadMagicError(
            f"header magic is 0x{raw.magic:08x}, not 0x{IMAGE_MAGIC:08x}: not an MCUboot image", field="magic"
        )
    version = ImageVersion(raw.version.major, raw.version.minor, raw.version.revision, raw.version.build)
    return Header(
        raw.magic,
        raw.load_addr,
        raw.hdr_size,
        raw.protect_tlv_size,
        raw.img_size,
        raw.flags,
        version,
        raw.pad,
    )


def read_layout(source: RandomAccess) -> ImageLayout:
    """Locate the header, payload and TLV areas of the image in `source`, checking every bound."""
    header = parse_header(source.read_at(0, HEADER_SIZE))
    if header.hdr_size < HEADER_SIZE:
        raise SizeOutOfRangeError(
            f"hdr_size {header.hdr_size} is smaller than the {HEADER_SIZE}-byte header", field="hdr_size"
        )
    payload_end = header.hdr_size + header.img_size
    if payload_end > source.size:
        raise SizeOutOfRangeError(
            f"hdr_size + img_size = {payload_end} runs past the end of the {source.size}-byte file",
            field="img_size",
        )
    protected = None
    offset = payload_end
    if header.protect_tlv_size:
        protected = _read_area(source, offset, PROTECTED_TLV_INFO_MAGIC, "protected TLV area")
        if protected.total != header.protect_tlv_size:
            raise SizeOutOfRangeError(
                f"protect_tlv_size is {header.protect_tlv_size} but the protected TLV area says "
                f"{protected.total}",
                field="protect_tlv_size",
            )
        offset += protected.total
    unprotected = _read_area(source, offset, TLV_INFO_MAGIC, "TLV area")
    end = offset + unprotected.total
    if end != source.size:
        raise TrailingDataError(
            f"{source.size - end} bytes follow the TLV area, which ends at {end}", field="trailer"
        )
    return ImageLayout(header, protected, unprotected, source.size)


def _read_area(source: RandomAccess, offset: int, magic: int, name: str) -> TlvArea:
    """One TLV area: its info (magic, total including the info) and the TLVs that exactly fill it."""
    if offset + TLV_INFO_SIZE > source.size:
        raise TruncatedImageError(f"file ends before the {name} at offset {offset}", field=name)
    info = TlvInfo.parse(source.read_at(offset, TLV_INFO_SIZE))
    if info.magic != magic:
        raise BadMagicError(
            f"{name} magic at offset {offset} is 0x{info.magic:04x}, not 0x{magic:04x}", field=name
        )
    if info.total < TLV_INFO_SIZE:
        raise SizeOutOfRangeError(f"{name} total {info.total} is smaller than its own info", field=name)
    if offset + info.total > source.size:
        raise TruncatedImageError(
            f"{name} of {info.total} bytes at offset {offset} runs past the end of the file", field=name
        )
    body = source.read_at(offset + TLV_INFO_SIZE, info.total - TLV_INFO_SIZE)
    return TlvArea(info.magic, offset, info.total, _split_tlvs(body, offset + TLV_INFO_SIZE, name))


def _split_tlvs(body: bytes, base: int, name: str) -> tuple[TlvEntry, ...]:
    entries = []
    position = 0
    while position < len(body):
        if position + TLV_HEADER_SIZE > len(body):
            raise TlvOverrunError(
                f"a TLV header at offset {base + position} runs past the end of the {name}", field=name
            )
        tlv = TlvHeader.parse(body[position : position + TLV_HEADER_SIZE])
        start = position + TLV_HEADER_SIZE
        if start + tlv.length > len(body):
            raise TlvOverrunError(
                f"TLV 0x{tlv.type:02x} at offset {base + position} declares {tlv.length} bytes, "
                f"past the end of the {name}",
                field=name,
            )
        entries.append(TlvEntry(tlv.type, base + position, body[start : start + tlv.length]))
        position = start + tlv.length
    return tuple(entries)

"""Verifying an image as its bytes go past: the one place the signed range is hashed and judged.

A device fetches an image's header and TLV trailer first and rejects a wrong image before writing a byte
(docs/design.md §3, "reject early"); it then streams the payload into a slot, and reads a slot back to
check it still holds what was verified. All three go through here, hashlib-style:

- `ImageHead`: the image without its payload (the header with its padding, and the TLV trailer), parsed
  with every length checked; `read_image_head` fetches it through a range reader in at most two bounded
  reads, `ImageHead.from_record` rebuilds it from the bytes a device kept;
- `ImageVerifier(head, trust)`: every check that needs no payload byte at once, then `update(chunk)` with
  the payload in order, and `finish()` hashes the protected TLVs, compares with the signed digest and
  returns the `VerifiedImage`;
- `ContentCheck(head)`: the same hash against a head verified earlier (a slot read back), no trust needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SizeOutOfRangeError, TruncatedImageError
from .image_format import HEADER_SIZE, ImageVersion
from .layout import ImageLayout, parse_header, read_layout
from .manifest import Manifest, read_manifest
from .verify import Trust, VerifiedImage, check_manifest, judge_digest, require_digest

#: the header is read in one go up to this size (imgtool pads headers to 0x200 or 0x400 in practice)
HEAD_PROBE = 4096
#: a header padded beyond this is refused: it is held in memory and in a device's records
MAX_HEADER = 64 << 10
#: two TLV areas of at most 64 KiB each (their totals are u16): a longer trailer is not an image's
MAX_TRAILER = 2 * 0xFFFF

#: reads bytes [start, stop) of an image
RangeReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ImageHead:
    """Everything of an image but its payload, parsed: bytes 0..hdr_size (`head`) and payload end to file
    end (`tail`). Build it with `read_image_head` or `ImageHead.from_record`."""

    head: bytes
    tail: bytes
    _layout: ImageLayout
    _manifest: Manifest

    @classmethod
    def from_parts(cls, head: bytes, tail: bytes) -> ImageHead:
        """The head of an image whose header (with its padding) is `head` and whose TLV areas are `tail`;
        a `SigningError` names what is malformed."""
        header = parse_header(head)
        if header.hdr_size < HEADER_SIZE or len(head) != header.hdr_size:
            raise SizeOutOfRangeError(
                f"hdr_size {header.hdr_size} does not match the {len(head)} header bytes", field="hdr_size"
            )
        layout = read_layout(_WithoutPayload(head, tail, header.hdr_size + header.img_size + len(tail)))
        return cls(head, tail, layout, read_manifest(layout))

    @classmethod
    def from_record(cls, header_and_tlvs: bytes) -> ImageHead:
        """The head from the bytes a device keeps of an image (`record_bytes`: header, then TLV areas)."""
        hdr_size = parse_header(header_and_tlvs).hdr_size
        if hdr_size > len(header_and_tlvs):
            raise TruncatedImageError(
                f"{len(header_and_tlvs)} bytes are shorter than the header's hdr_size {hdr_size}",
                field="hdr_size",
            )
        return cls.from_parts(header_and_tlvs[:hdr_size], header_and_tlvs[hdr_size:])

    @property
    def hdr_size(self) -> int:
        """Where the payload starts."""
        return self._layout.header.hdr_size

    @property
    def payload_size(self) -> int:
        return self._layout.header.img_size

    @property
    def image_size(self) -> int:
        return self._layout.file_size

    @property
    def version(self) -> ImageVersion:
        return self._manifest.version

    @property
    def security_counter(self) -> int:
        return self._manifest.security_counter or 0

    @property
    def digest(self) -> bytes:
        """The SHA-256 the image claims (and its signatures cover); `finish` compares the real one."""
        return self._manifest.digest

    @property
    def record_bytes(self) -> bytes:
        """What a device keeps of the image: all but the payload."""
        return self.head + self.tail

    def check(self, trust: Trust) -> tuple[bytes, ...]:
        """Every check that needs no payload byte (hardware, downgrade, slot size, a trusted key's signature
        over the claimed digest); the key hashes whose signatures verify."""
        return check_manifest(self._manifest, trust)

    def _protected_tail(self) -> bytes:
        """The TLV bytes the digest covers after the payload (the protected area, if any)."""
        return self.tail[: self._layout.signed_length - self.hdr_size - self.payload_size]


class ContentCheck:
    """The signed range's SHA-256 over a head and a payload given in order: `finish` says whether they are
    the image the head describes. Memory is the hash state, whatever the payload size."""

    def __init__(self, head: ImageHead) -> None:
        self.head = head
        self.received = 0
        self._hash = hashlib.sha256(head.head)

    def update(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.head.payload_size:
            raise SizeOutOfRangeError(
                f"more than the {self.head.payload_size} payload bytes the header declares", field="img_size"
            )
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> bytes:
        """The digest, once the whole payload went through `update` and it matches the claimed one."""
        if self.received != self.head.payload_size:
            raise TruncatedImageError(
                f"the payload ended after {self.received} of its {self.head.payload_size} bytes",
                field="img_size",
            )
        self._hash.update(self.head._protected_tail())
        digest = self._hash.digest()
        require_digest(digest, self.head.digest)
        return digest


class ImageVerifier:
    """A `ContentCheck` under a `Trust`: refuses at once what the head alone shows wrong, and `finish`
    returns the `VerifiedImage`, the only thing that should ever reach a slot."""

    def __init__(self, head: ImageHead, trust: Trust) -> None:
        self._signers = head.check(trust)
        self._content = ContentCheck(head)

    @property
    def head(self) -> ImageHead:
        return self._content.head

    def update(self, chunk: bytes) -> None:
        self._content.update(chunk)

    def finish(self) -> VerifiedImage:
        return judge_digest(self.head._manifest, self._content.finish(), self._signers)


def read_image_head(read: RangeReader, size: int) -> ImageHead:
    """Fetch the header and trailer of the `size`-byte image `read` gives, in at most two reads bounded
    whatever the image claims, and parse them; a `SigningError` names what is wrong."""
    first = read(0, min(size, HEAD_PROBE))
    header = parse_header(first)
    if header.hdr_size > MAX_HEADER:
        raise SizeOutOfRangeError(
            f"hdr_size {header.hdr_size} is larger than {MAX_HEADER} bytes", field="hdr_size"
        )
    head = first[: header.hdr_size]
    if header.hdr_size > len(first) and header.hdr_size <= size:
        head = first + read(len(first), header.hdr_size)
    payload_end = header.hdr_size + header.img_size
    if payload_end > size:
        raise SizeOutOfRangeError(
            f"hdr_size + img_size = {payload_end} runs past the end of the {size}-byte image",
            field="img_size",
        )
    if size - payload_end > MAX_TRAILER:
        raise SizeOutOfRangeError(
            f"{size - payload_end} bytes follow the payload, more than two TLV areas can hold",
            field="trailer",
        )
    tail = read(payload_end, size) if size > payload_end else b""
    return ImageHead.from_parts(head, tail)


@dataclass(frozen=True)
class _WithoutPayload:
    """`layout.RandomAccess` over an image's head and tail; the layout reader never asks for the payload,
    and a malformed image whose lengths point into it gets empty bytes, so the reader names the field."""

    head: bytes
    tail: bytes
    size: int

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        tail_start = self.size - len(self.tail)
        if end <= len(self.head):
            return self.head[offset:end]
        if offset >= tail_start:
            return self.tail[offset - tail_start : end - tail_start]
        if offset < len(self.head):
            return self.head[offset:end]
        return b""

"""The image's header and TLV trailer, fetched and judged before a single slot byte is written.

docs/design.md §3, "reject early": the header (bytes 0..hdr_size) and the trailer (payload end to file end)
are fetched first, by range, from wherever the image is; `signing` parses them and runs every check that
needs no payload byte (vendor and class, security counter against the board's floor, slot size, a
trusted, non-revoked key that signed the claimed digest). A wrong image therefore never erases the
inactive slot. The same `Trust` then finishes the verification once the payload has been hashed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from board.interface import Board, KeySlotState
from signing.errors import SigningError
from signing.image_format import HEADER_SIZE, class_uuid, vendor_uuid
from signing.keys import PublicKey, public_key_from_bytes
from signing.layout import ImageLayout, parse_header, read_layout
from signing.manifest import Manifest, read_manifest
from signing.verify import Trust, check_manifest

from .errors import ImageRejectedError

#: the header is read in one go up to this size (imgtool pads headers to 0x200 or 0x400 in practice)
HEAD_PROBE = 4096
#: a header padded beyond this is refused: it would be held in memory and in the slot record
MAX_HEADER = 64 << 10
#: two TLV areas of at most 64 KiB each (their totals are u16): a longer trailer is not an image's
MAX_TRAILER = 2 * 0xFFFF

#: reads bytes [start, stop) of the image
RangeReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ImageHead:
    """Everything of an image but its payload, parsed and checked."""

    layout: ImageLayout
    manifest: Manifest
    head: bytes  # header and padding: bytes 0..hdr_size
    tail: bytes  # protected and unprotected TLV areas: payload end to file end
    signers: tuple[bytes, ...]

    @property
    def payload_offset(self) -> int:
        return self.layout.payload_offset

    @property
    def payload_size(self) -> int:
        return self.layout.header.img_size

    @property
    def protected_tail(self) -> bytes:
        """The TLV bytes the image hash covers after the payload (the protected area, if any)."""
        return self.tail[: self.layout.signed_length - self.payload_offset - self.payload_size]

    @property
    def record_bytes(self) -> bytes:
        """The slot record's content: the image outside its payload."""
        return self.head + self.tail


def board_trust(board: Board, slot_size: int) -> Trust:
    """What this board believes: its key slots (revoked ones named, so their signatures are refused as
    revoked rather than unknown), its security-counter floor (no downgrade), its vendor and class (no
    image for other hardware) and the inactive slot's size."""
    keys: list[PublicKey] = []
    revoked: set[bytes] = set()
    for slot in board.key_slots():
        if slot.state is KeySlotState.EMPTY or slot.public_key_der is None:
            continue
        key = public_key_from_bytes(slot.public_key_der, source=f"key slot {slot.index}")
        keys.append(key)
        if slot.state is KeySlotState.REVOKED:
            revoked.add(key.key_hash)
    identity = board.identity
    return Trust(
        keys=tuple(keys),
        revoked=frozenset(revoked),
        min_security_counter=board.security_counter_floor(),
        vendor_uuid=vendor_uuid(identity.vendor),
        class_uuid=class_uuid(identity.vendor, identity.image_class),
        slot_size=slot_size,
    )


def read_image_head(read: RangeReader, size: int, trust: Trust) -> ImageHead:
    """Fetch the header and trailer through `read` and run the early checks; `ImageRejectedError` names
    the failed field. At most two small reads, bounded whatever the image claims."""
    try:
        first = read(0, min(size, HEAD_PROBE))
        header = parse_header(first)
        if header.hdr_size > MAX_HEADER:
            raise ImageRejectedError(
                f"hdr_size {header.hdr_size} is larger than {MAX_HEADER} bytes", field="hdr_size"
            )
        head = first[: header.hdr_size]
        if header.hdr_size > len(first) and header.hdr_size <= size:
            head = first + read(len(first), header.hdr_size)
        payload_end = header.hdr_size + header.img_size
        tail = b""
        if 0 < size - payload_end <= MAX_TRAILER:
            tail = read(payload_end, size)
        elif size - payload_end > MAX_TRAILER:
            raise ImageRejectedError(
                f"{size - payload_end} bytes follow the payload, more than two TLV areas can hold",
                field="trailer",
            )
        layout = read_layout(_HeadAndTail(head, tail, size))
        manifest = read_manifest(layout)
        signers = check_manifest(manifest, trust)
    except SigningError as exc:
        raise ImageRejectedError(str(exc), field=exc.field or type(exc).__name__) from exc
    return ImageHead(layout, manifest, head, tail, signers)


@dataclass(frozen=True)
class _HeadAndTail:
    """`signing.layout.RandomAccess` over the fetched head and tail; the payload is not there, and the
    layout reader never asks for it."""

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
        if offset < HEADER_SIZE:
            return self.head[offset:end]
        # a read spanning the payload: only a malformed image asks; give what is known so the layout
        # reader reports the bad field rather than us inventing bytes
        return b""


def stored_image_head(header_and_tlvs: bytes, size: int, trust: Trust) -> ImageHead:
    """The `ImageHead` of a journalled install, from the bytes kept in the journal, checked again (the
    board's floor or key slots may have changed since the install started)."""
    try:
        hdr_size = parse_header(header_and_tlvs).hdr_size
    except SigningError as exc:
        raise ImageRejectedError(f"the journalled image header: {exc}", field="journal") from exc
    head, tail = header_and_tlvs[:hdr_size], header_and_tlvs[hdr_size:]
    tail_start = size - len(tail)

    def read(start: int, stop: int) -> bytes:
        if stop <= len(head):
            return head[start:stop]
        if start >= tail_start:
            return tail[start - tail_start : stop - tail_start]
        return head[start : min(stop, len(head))]

    return read_image_head(read, size, trust)

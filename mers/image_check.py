"""The image's header and TLV trailer, fetched and judged before a single slot byte is written.

docs/design.md §3, "reject early": the header (bytes 0..hdr_size) and the trailer (payload end to file end)
are fetched first, by range, from wherever the image is; `signing` parses them and runs every check that
needs no payload byte (vendor and class, security counter against the board's floor, slot size, a
trusted, non-revoked key that signed the claimed digest), against what this board believes
(`board_trust`). A wrong image therefore never erases the inactive slot. The same `Trust` then finishes
the verification (`signing.ImageVerifier`) once the payload has streamed into the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from board.interface import Board, KeySlotState
from signing import (
    ImageHead,
    PublicKey,
    SigningError,
    Trust,
    class_uuid,
    public_key_from_bytes,
    vendor_uuid,
)
from signing import read_image_head as fetch_image_head

from .errors import ImageRejectedError

#: reads bytes [start, stop) of the image
RangeReader = Callable[[int, int], bytes]


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
    """Fetch the header and trailer through `read` (at most two small reads, bounded whatever the image
    claims) and run the early checks; `ImageRejectedError` names the failed field."""
    with _rejected():
        head = fetch_image_head(read, size)
        head.check(trust)
    return head


def stored_image_head(header_and_tlvs: bytes, size: int, trust: Trust) -> ImageHead:
    """The `ImageHead` of a journalled install, from the bytes kept in the journal, checked again (the
    board's floor or key slots may have changed since the install started)."""
    with _rejected("the journalled image header: ", field="journal"):
        head = ImageHead.from_record(header_and_tlvs)
    if head.image_size != size:
        raise ImageRejectedError(
            f"the journalled image header describes a {head.image_size}-byte image, not {size} bytes",
            field="journal",
        )
    with _rejected():
        head.check(trust)
    return head


@contextmanager
def _rejected(context: str = "", field: str | None = None) -> Iterator[None]:
    try:
        yield
    except SigningError as exc:
        raise ImageRejectedError(f"{context}{exc}", field=field or exc.field or type(exc).__name__) from exc

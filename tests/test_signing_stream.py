"""`signing`'s streaming verifier, the one owner of "is this image good" for a stream of bytes: the head
fetched in bounded reads, the payload in any chunking, and the same verdict as verifying the whole file."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing import (
    ContentCheck,
    ImageHead,
    ImageVerifier,
    KeyAlgorithm,
    SigningError,
    Trust,
    class_uuid,
    read_image_head,
    vendor_uuid,
    verify_image,
)
from signing.errors import (
    HashMismatchError,
    SecurityCounterError,
    SizeOutOfRangeError,
    TruncatedImageError,
    VendorMismatchError,
)
from signing.stream import HEAD_PROBE, MAX_TRAILER
from tests.signing_helpers import make_image, signer_for

PAYLOAD = os.urandom(20_000)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(
        tmp_path_factory.mktemp("stream"),
        [signer_for(KeyAlgorithm.ECDSA_P256)],
        payload=PAYLOAD,
        vendor="Acme",
        image_class="gw-100",
        header_size=0x1200,  # beyond the first probe: the head takes a second read
        security_counter=5,
    )


def trust(**changes: object) -> Trust:
    settings: dict[str, object] = {
        "keys": (signer_for(KeyAlgorithm.ECDSA_P256).public_key,),
        "vendor_uuid": vendor_uuid("Acme"),
        "class_uuid": class_uuid("Acme", "gw-100"),
        "min_security_counter": 5,
    }
    settings.update(changes)
    return Trust(**settings)  # type: ignore[arg-type]


def head_of(path: Path, reads: list[tuple[int, int]] | None = None) -> ImageHead:
    data = path.read_bytes()

    def read(start: int, stop: int) -> bytes:
        if reads is not None:
            reads.append((start, stop))
        return data[start:stop]

    return read_image_head(read, len(data))


def payload_of(path: Path, head: ImageHead) -> bytes:
    return path.read_bytes()[head.hdr_size : head.hdr_size + head.payload_size]


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, len(PAYLOAD)), max_size=8))
def test_the_payload_in_any_chunking_verifies_like_the_whole_file(signed: Path, cuts: list[int]) -> None:
    head = head_of(signed)
    verifier = ImageVerifier(head, trust())
    payload = payload_of(signed, head)
    bounds = [0, *sorted(cuts), len(payload)]
    for start, stop in itertools.pairwise(bounds):
        verifier.update(payload[start:stop])
    assert verifier.finish() == verify_image(signed, trust())


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(0, len(PAYLOAD) - 1), bit=st.integers(0, 7))
def test_any_changed_payload_bit_is_a_hash_mismatch(signed: Path, where: int, bit: int) -> None:
    head = head_of(signed)
    payload = bytearray(payload_of(signed, head))
    payload[where] ^= 1 << bit
    verifier = ImageVerifier(head, trust())
    verifier.update(bytes(payload))
    with pytest.raises(HashMismatchError):
        verifier.finish()


def test_a_short_or_long_payload_is_refused_before_any_hash_is_judged(signed: Path) -> None:
    head = head_of(signed)
    payload = payload_of(signed, head)
    short = ContentCheck(head)
    short.update(payload[:-1])
    with pytest.raises(TruncatedImageError):
        short.finish()
    long = ContentCheck(head)
    long.update(payload)
    with pytest.raises(SizeOutOfRangeError):
        long.update(b"x")


def test_what_the_head_shows_wrong_is_refused_before_a_payload_byte(signed: Path) -> None:
    head = head_of(signed)
    with pytest.raises(VendorMismatchError):
        ImageVerifier(head, trust(vendor_uuid=vendor_uuid("Other")))
    with pytest.raises(SecurityCounterError):
        ImageVerifier(head, trust(min_security_counter=6))


def test_the_head_is_fetched_in_bounded_reads_and_rebuilt_from_what_a_device_keeps(signed: Path) -> None:
    reads: list[tuple[int, int]] = []
    head = head_of(signed, reads)
    size = signed.stat().st_size
    assert reads == [(0, HEAD_PROBE), (HEAD_PROBE, 0x1200), (0x1200 + len(PAYLOAD), size)]
    assert (head.hdr_size, head.payload_size, head.image_size) == (0x1200, len(PAYLOAD), size)
    again = ImageHead.from_record(head.record_bytes)
    assert (again.head, again.tail, again.digest) == (head.head, head.tail, head.digest)
    check = ContentCheck(again)
    check.update(payload_of(signed, head))
    assert check.finish() == head.digest


def test_an_image_claiming_a_trailer_longer_than_two_tlv_areas_is_refused_without_reading_it(
    signed: Path,
) -> None:
    data = signed.read_bytes()
    size = len(data) + MAX_TRAILER  # as if that much followed the payload
    reads: list[tuple[int, int]] = []

    def read(start: int, stop: int) -> bytes:
        reads.append((start, stop))
        return data[start:stop]

    with pytest.raises(SizeOutOfRangeError) as caught:
        read_image_head(read, size)
    assert caught.value.field == "trailer"
    assert all(stop <= 0x1200 for _, stop in reads)


@settings(max_examples=200)
@given(blob=st.binary(max_size=300), size_extra=st.integers(0, 300))
def test_arbitrary_bytes_are_a_head_or_a_signing_error(blob: bytes, size_extra: int) -> None:
    size = len(blob) + size_extra
    with contextlib.suppress(SigningError):
        read_image_head(lambda start, stop: blob[start:stop], size)
    with contextlib.suppress(SigningError):
        ImageHead.from_record(blob)

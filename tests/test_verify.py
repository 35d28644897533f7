"""Signing and strict verification through the library API (the CLI and imgtool have their own files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from signing import (
    ImageOptions,
    ImageVersion,
    Trust,
    class_uuid,
    prepare_unsigned,
    sign_image,
    vendor_uuid,
    verify_image,
)
from signing.errors import (
    BadSignatureError,
    ClassMismatchError,
    HashMismatchError,
    InputFileError,
    InvalidArgumentError,
    KeyHashMismatchError,
    NoSignatureError,
    RevokedKeyError,
    SecurityCounterError,
    SlotTooSmallError,
    UnknownKeyError,
    VendorMismatchError,
)
from signing.info import read_image_info
from signing.keys import KeyAlgorithm, PublicKey
from signing.layout import FileSource, read_layout
from signing.manifest import read_manifest
from signing.verify import check_manifest
from tests.signing_helpers import make_image, signer_for

RSA = KeyAlgorithm.RSA3072


def trust_of(*keys: PublicKey, **constraints: object) -> Trust:
    return Trust(keys=keys, **constraints)  # type: ignore[arg-type]


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def tlv_offset(path: Path, type_name: str) -> int:
    """Absolute offset of the first TLV of that name (its 4-byte header)."""
    info = read_image_info(path)
    for area, key in (("tlv_hdr_prot", "tlvs_prot"), ("tlv_hdr", "tlvs")):
        if not info["tlv_area"][key]:
            continue
        offset = info["tlv_area"][area]["offset"] + 4
        for tlv in info["tlv_area"][key]:
            if tlv["type_name"] == type_name:
                return int(offset)
            offset += 4 + tlv["len"]
    raise AssertionError(f"no {type_name} TLV")


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_an_image_signed_with_each_algorithm_verifies_with_its_public_key(tmp_path, algorithm):
    signer = signer_for(algorithm)
    payload = os.urandom(10_000)
    image = make_image(tmp_path, [signer], payload=payload, security_counter=5)

    verified = verify_image(image, trust_of(signer.public_key))

    assert verified.version == ImageVersion(1, 2, 3, 4)
    assert verified.security_counter == 5
    assert verified.img_size == len(payload)
    assert verified.signed_by == (signer.public_key.key_hash,)
    data = image.read_bytes()
    assert data[verified.hdr_size : verified.hdr_size + len(payload)] == payload
    signed_length = read_image_info(image)["tlv_area"]["tlv_hdr"]["offset"]
    assert hashlib.sha256(data[:signed_length]).digest() == verified.digest


def test_the_payload_starts_at_the_requested_header_size(tmp_path):
    payload = b"\x5a" * 100
    image = make_image(tmp_path, payload=payload, header_size=0x200)
    data = image.read_bytes()
    assert data[0x200 : 0x200 + 100] == payload
    assert data[32:0x200] == bytes(0x200 - 32)
    assert verify_image(image, trust_of(signer_for(RSA).public_key)).hdr_size == 0x200


def test_an_empty_payload_signs_and_verifies(tmp_path):
    image = make_image(tmp_path, payload=b"")
    assert verify_image(image, trust_of(signer_for(RSA).public_key)).img_size == 0


def test_an_image_signed_by_two_keys_verifies_with_either_key_alone(tmp_path):
    rsa, ed = signer_for(RSA), signer_for(KeyAlgorithm.ED25519)
    image = make_image(tmp_path, [rsa, ed])
    assert verify_image(image, trust_of(rsa.public_key)).signed_by == (rsa.public_key.key_hash,)
    assert verify_image(image, trust_of(ed.public_key)).signed_by == (ed.public_key.key_hash,)
    both = verify_image(image, trust_of(ed.public_key, rsa.public_key))
    assert set(both.signed_by) == {rsa.public_key.key_hash, ed.public_key.key_hash}


def test_an_image_signed_by_an_untrusted_key_is_rejected(tmp_path):
    image = make_image(tmp_path, [signer_for(RSA, 1)])
    with pytest.raises(UnknownKeyError):
        verify_image(image, trust_of(signer_for(RSA).public_key))


def test_a_revoked_key_alone_does_not_make_an_image_trusted(tmp_path):
    signer = signer_for(RSA)
    image = make_image(tmp_path, [signer])
    with pytest.raises(RevokedKeyError):
        verify_image(image, trust_of(signer.public_key, revoked=frozenset({signer.public_key.key_hash})))


def test_a_second_signature_by_a_valid_key_survives_the_revocation_of_the_first(tmp_path):
    old, new = signer_for(RSA), signer_for(KeyAlgorithm.ECDSA_P256)
    image = make_image(tmp_path, [old, new])
    trust = trust_of(old.public_key, new.public_key, revoked=frozenset({old.public_key.key_hash}))
    assert verify_image(image, trust).signed_by == (new.public_key.key_hash,)


@pytest.mark.parametrize("other_algorithm", [RSA, KeyAlgorithm.ED25519])
def test_a_keyhash_redirected_to_another_trusted_key_is_reported_as_a_keyhash_mismatch(
    tmp_path, other_algorithm
):
    signer, other = signer_for(RSA), signer_for(other_algorithm, 1)
    image = make_image(tmp_path, [signer])
    patch(image, tlv_offset(image, "KEYHASH") + 4, other.public_key.key_hash)
    with pytest.raises(KeyHashMismatchError):
        verify_image(image, trust_of(signer.public_key, other.public_key))


def test_a_corrupted_signature_of_a_trusted_key_is_a_bad_signature(tmp_path):
    signer = signer_for(RSA)
    image = make_image(tmp_path, [signer])
    offset = tlv_offset(image, "RSA3072") + 4 + 100
    patch(image, offset, bytes([image.read_bytes()[offset] ^ 1]))
    with pytest.raises(BadSignatureError):
        verify_image(image, trust_of(signer.public_key))


def test_a_keyhash_altered_to_name_no_key_is_caught_although_the_signature_is_good(tmp_path):
    signer = signer_for(KeyAlgorithm.ECDSA_P256)
    image = make_image(tmp_path, [signer])
    patch(image, tlv_offset(image, "KEYHASH") + 4, bytes(32))
    with pytest.raises(KeyHashMismatchError):
        verify_image(image, trust_of(signer.public_key))


def test_a_changed_payload_byte_is_rejected_as_a_hash_mismatch(tmp_path):
    image = make_image(tmp_path)
    patch(image, 40, b"\xff")
    with pytest.raises(HashMismatchError):
        verify_image(image, trust_of(signer_for(RSA).public_key))


def test_an_image_without_any_signature_is_rejected(tmp_path):
    image = make_image(tmp_path, [signer_for(RSA)])
    raw = tmp_path / "unsigned.raw"
    raw.write_bytes(b"x")
    unsigned = tmp_path / "unsigned.img"
    prepare_unsigned(raw, unsigned, ImageOptions(version=ImageVersion(1)))
    with pytest.raises(NoSignatureError):
        verify_image(unsigned, trust_of(signer_for(RSA).public_key))
    assert image.exists()


@pytest.mark.parametrize(("counter", "floor", "accepted"), [(None, 0, True), (3, 3, True), (3, 4, False)])
def test_the_security_counter_must_reach_the_devices_floor(tmp_path, counter, floor, accepted):
    image = make_image(tmp_path, security_counter=counter)
    trust = trust_of(signer_for(RSA).public_key, min_security_counter=floor)
    if accepted:
        verify_image(image, trust)
    else:
        with pytest.raises(SecurityCounterError):
            verify_image(image, trust)


def test_an_image_for_another_vendor_or_class_is_rejected(tmp_path):
    image = make_image(tmp_path, vendor="acme.example", image_class="gw-1")
    key = signer_for(RSA).public_key
    good = trust_of(
        key, vendor_uuid=vendor_uuid("acme.example"), class_uuid=class_uuid("acme.example", "gw-1")
    )
    assert verify_image(image, good).class_uuid == class_uuid("acme.example", "gw-1")
    with pytest.raises(VendorMismatchError):
        verify_image(image, trust_of(key, vendor_uuid=vendor_uuid("other.example")))
    with pytest.raises(ClassMismatchError):
        verify_image(image, trust_of(key, class_uuid=class_uuid("acme.example", "gw-2")))


def test_a_device_that_declares_a_class_refuses_an_image_that_declares_none(tmp_path):
    image = make_image(tmp_path)
    with pytest.raises(ClassMismatchError):
        verify_image(image, trust_of(signer_for(RSA).public_key, class_uuid=class_uuid("acme.example", "gw")))


def test_a_payload_larger_than_the_slot_is_rejected(tmp_path):
    image = make_image(tmp_path, payload=bytes(4096))
    key = signer_for(RSA).public_key
    verify_image(image, trust_of(key, slot_size=4096))
    with pytest.raises(SlotTooSmallError):
        verify_image(image, trust_of(key, slot_size=4095))


def test_wrong_hardware_is_rejected_from_header_and_trailer_without_reading_the_payload(tmp_path):
    """docs/design.md §3: a device rejects early, before a byte is written or even downloaded."""
    payload = os.urandom(1 << 16)
    image = make_image(tmp_path, payload=payload, vendor="acme.example")
    reads: list[tuple[int, int]] = []

    class RecordingSource:
        def __init__(self, fd: int, size: int) -> None:
            self.inner = FileSource(fd, size)
            self.size = size

        def read_at(self, offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return self.inner.read_at(offset, length)

    with image.open("rb") as handle:
        manifest = read_manifest(read_layout(RecordingSource(handle.fileno(), image.stat().st_size)))
    with pytest.raises(VendorMismatchError):
        check_manifest(
            manifest, trust_of(signer_for(RSA).public_key, vendor_uuid=vendor_uuid("evil.example"))
        )
    payload_start, payload_end = 32, 32 + len(payload)
    assert reads, "the layout was read through the recording source"
    for offset, length in reads:
        assert offset + length <= payload_start or offset >= payload_end, f"read {length} bytes at {offset}"


def test_invalid_image_options_are_refused_before_any_file_is_touched(tmp_path):
    for bad in (
        {"header_size": 16},
        {"security_counter": 1 << 32},
        {"image_class": "gw-1"},
        {"custom_tlvs": ((0x10, b"x"),)},
        {"custom_tlvs": ((0xA0, b"x"), (0xA0, b"y"))},
    ):
        with pytest.raises(InvalidArgumentError):
            ImageOptions(version=ImageVersion(1), **bad)


def test_a_failed_signature_leaves_no_output_and_no_temporary_file(tmp_path):
    class BrokenSigner:
        public_key = signer_for(RSA).public_key

        def sign_digest(self, digest: bytes) -> bytes:
            raise InvalidArgumentError("the token went away")

        def close(self) -> None:
            pass

    raw = tmp_path / "in.raw"
    raw.write_bytes(b"payload")
    with pytest.raises(InvalidArgumentError):
        sign_image(raw, tmp_path / "out.img", [BrokenSigner()], ImageOptions(version=ImageVersion(1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]


def test_a_missing_input_is_a_typed_error(tmp_path):
    with pytest.raises(InputFileError):
        sign_image(
            tmp_path / "nope", tmp_path / "out", [signer_for(RSA)], ImageOptions(version=ImageVersion(1))
        )
    with pytest.raises(InputFileError):
        verify_image(tmp_path / "nope", trust_of(signer_for(RSA).public_key))

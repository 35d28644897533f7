"""Property tests: no mutation of a signed image survives verification, and no input crashes the parser."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signing import Trust, verify_image
from signing.errors import SigningError
from signing.image_format import IMAGE_MAGIC
from signing.info import read_image_info
from signing.keys import KeyAlgorithm
from tests.signing_helpers import make_image, signer_for

_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@functools.cache
def valid_image(algorithm: KeyAlgorithm) -> tuple[bytes, int]:
    """A small signed image with every protected TLV kind, and the length of its signed range."""
    with tempfile.TemporaryDirectory() as directory:
        path = make_image(
            Path(directory),
            [signer_for(algorithm)],
            payload=os.urandom(700),
            header_size=64,
            security_counter=9,
            vendor="acme.example",
            image_class="gw-1",
            custom_tlvs=((0xA0, b"\x01\x02"),),
        )
        data = path.read_bytes()
        signed_length = read_image_info(path)["tlv_area"]["tlv_hdr"]["offset"]
    return data, signed_length


def _verify_bytes(directory: Path, data: bytes, algorithm: KeyAlgorithm) -> None:
    path = directory / "mutant.img"
    path.write_bytes(data)
    verify_image(path, Trust(keys=(signer_for(algorithm).public_key,)))


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
@_SETTINGS
@given(data=st.data())
def test_any_change_inside_the_signed_range_is_rejected(tmp_path, algorithm, data):
    image, signed_length = valid_image(algorithm)
    offset = data.draw(st.integers(0, signed_length - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    mutant = bytearray(image)
    mutant[offset] ^= mask
    with pytest.raises(SigningError):
        _verify_bytes(tmp_path, bytes(mutant), algorithm)


@_SETTINGS
@given(data=st.data())
def test_any_truncation_or_extension_is_rejected(tmp_path, data):
    image, _ = valid_image(KeyAlgorithm.ED25519)
    cut = data.draw(st.integers(0, len(image) - 1), label="cut")
    tail = data.draw(st.binary(max_size=8), label="appended")
    if tail:
        with pytest.raises(SigningError):
            _verify_bytes(tmp_path, image + tail, KeyAlgorithm.ED25519)
    # cutting the last bytes and appending the same ones gives the valid image back: not a mutation
    assume(image[:cut] + tail != image)
    with pytest.raises(SigningError):
        _verify_bytes(tmp_path, image[:cut] + tail, KeyAlgorithm.ED25519)


def _info_of(directory: Path, data: bytes) -> None:
    path = directory / "arbitrary.img"
    path.write_bytes(data)
    with contextlib.suppress(SigningError):  # our own error type is the only acceptable failure
        read_image_info(path)


@_SETTINGS
@given(blob=st.binary(max_size=600))
def test_info_on_arbitrary_bytes_raises_nothing_but_our_own_error(tmp_path, blob):
    _info_of(tmp_path, blob)


@_SETTINGS
@given(blob=st.binary(min_size=28, max_size=600))
def test_info_on_arbitrary_bytes_behind_a_valid_magic_raises_nothing_but_our_own_error(tmp_path, blob):
    _info_of(tmp_path, IMAGE_MAGIC.to_bytes(4, "little") + blob)


@_SETTINGS
@given(data=st.data())
def test_info_on_randomly_corrupted_images_raises_nothing_but_our_own_error(tmp_path, data):
    image, _ = valid_image(KeyAlgorithm.ECDSA_P256)
    mutant = bytearray(image)
    for _ in range(data.draw(st.integers(1, 6), label="changes")):
        offset = data.draw(st.integers(0, len(mutant) - 1))
        mutant[offset] = data.draw(st.integers(0, 255))
    _info_of(tmp_path, bytes(mutant))

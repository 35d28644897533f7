"""The declarative format: versions, UUID derivation as imgtool does it, header round trips."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imgtool.image import parse_uuid  # the peer implementation we must agree with

from signing.errors import InvalidArgumentError
from signing.image_format import ImageHeader, ImageVersion, class_uuid, vendor_uuid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", ImageVersion(1)),
        ("1.2", ImageVersion(1, 2)),
        ("1.2.3", ImageVersion(1, 2, 3)),
        ("1.2.3+4", ImageVersion(1, 2, 3, 4)),
        ("255.255.65535+4294967295", ImageVersion(255, 255, 65535, 4294967295)),
    ],
)
def test_versions_parse_like_imgtool(text, expected):
    assert ImageVersion.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "v1", "1.2.3.4", "01.2", "1.2+3", "256.0.0", "1.256", "1.0.65536", "-1"]
)
def test_malformed_or_oversized_versions_are_refused(text):
    with pytest.raises(InvalidArgumentError):
        ImageVersion.parse(text)


@given(st.integers(0, 0xFF), st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
def test_a_version_survives_printing_and_parsing(major, minor, revision, build):
    version = ImageVersion(major, minor, revision, build)
    assert ImageVersion.parse(str(version)) == version


def test_versions_order_by_their_numbers():
    assert ImageVersion.parse("1.10.0") > ImageVersion.parse("1.9.9+99")


@given(
    st.text(min_size=1, max_size=40).filter(str.isprintable),
    st.text(min_size=1, max_size=40).filter(str.isprintable),
)
def test_vendor_and_class_uuids_are_derived_exactly_as_imgtool_derives_them(vendor, image_class):
    imgtool_vid = parse_uuid(uuid.NAMESPACE_DNS, vendor)
    assert vendor_uuid(vendor).bytes == imgtool_vid
    assert class_uuid(vendor, image_class).bytes == parse_uuid(uuid.UUID(bytes=imgtool_vid), image_class)


def test_a_vendor_already_written_as_a_uuid_is_taken_as_it_is():
    raw = "12345678-1234-5678-1234-567812345678"
    assert vendor_uuid(raw) == uuid.UUID(raw)
    assert vendor_uuid(raw.replace("-", "")) == uuid.UUID(raw)


@given(
    st.fixed_dictionaries(
        {
            "magic": st.integers(0, 0xFFFFFFFF),
            "load_addr": st.integers(0, 0xFFFFFFFF),
            "hdr_size": st.integers(0, 0xFFFF),
            "protect_tlv_size": st.integers(0, 0xFFFF),
            "img_size": st.integers(0, 0xFFFFFFFF),
            "flags": st.integers(0, 0xFFFFFFFF),
            "version": st.fixed_dictionaries(
                {
                    "major": st.integers(0, 0xFF),
                    "minor": st.integers(0, 0xFF),
                    "revision": st.integers(0, 0xFFFF),
                    "build": st.integers(0, 0xFFFFFFFF),
                }
            ),
            "pad": st.integers(0, 0xFFFFFFFF),
        }
    )
)
def test_the_header_is_32_bytes_and_parses_back_to_what_was_built(fields):
    data = ImageHeader.build(fields)
    assert len(data) == 32
    parsed = ImageHeader.parse(data)
    assert parsed.img_size == fields["img_size"]
    assert parsed.version.build == fields["version"]["build"]
    assert ImageHeader.build(parsed) == data

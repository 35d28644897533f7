"""`ImageOptions`: everything about a new image except its keys, refused at construction when the image
format cannot carry it, so that no library caller meets a construct exception half-way through signing."""

from __future__ import annotations

import pytest

from signing import ImageOptions, ImageVersion
from signing.errors import InvalidArgumentError

VERSION = ImageVersion(1, 0)
TLV_LENGTH_MAX = 0xFFFF  # a TLV's length is a u16
AREA_MAX = 0xFFFF  # so is a TLV area's total, its 4-byte info included
TLV_OVERHEAD = 4  # type and length


def test_a_custom_tlv_value_longer_than_a_tlv_length_can_say_is_refused():
    with pytest.raises(InvalidArgumentError, match="custom TLV 0x00a0 holds 65536 bytes") as refused:
        ImageOptions(VERSION, custom_tlvs=((0xA0, bytes(TLV_LENGTH_MAX + 1)),))
    assert refused.value.field == "custom_tlv"


def test_protected_tlvs_that_overflow_their_area_are_refused_and_the_largest_that_fit_are_not():
    fitting = AREA_MAX - 4 - TLV_OVERHEAD  # the area's info, one TLV's header
    ImageOptions(VERSION, custom_tlvs=((0xA0, bytes(fitting)),))
    with pytest.raises(InvalidArgumentError, match="need 65536 bytes") as refused:
        ImageOptions(VERSION, custom_tlvs=((0xA0, bytes(fitting + 1)),))
    assert refused.value.field == "custom_tlv"
    with pytest.raises(InvalidArgumentError, match="at most 65535"):
        ImageOptions(VERSION, custom_tlvs=((0xA0, bytes(33_000)), (0xA1, bytes(33_000))))


def test_the_emitted_tlvs_count_toward_the_protected_area():
    """SEC_CNT (4 + 4 bytes) and the two UUIDs (4 + 16 each) share the area with the custom TLVs."""
    fitting = AREA_MAX - 4 - TLV_OVERHEAD - (4 + 4) - 2 * (4 + 16)

    def options(custom_size: int) -> ImageOptions:
        return ImageOptions(
            VERSION,
            security_counter=1,
            vendor="acme.example",
            image_class="gw-1",
            custom_tlvs=((0xA0, bytes(custom_size)),),
        )

    options(fitting)
    with pytest.raises(InvalidArgumentError, match="protected TLVs need 65536 bytes"):
        options(fitting + 1)

"""Slots and their records: which slot may be written, content checked against its record, bounded writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from board.errors import (
    ActiveSlotWriteError,
    SlotContentMismatchError,
    SlotError,
    SlotFullError,
    SlotRecordError,
)
from board.interface import SlotName, SlotRecord, SlotStatus
from board.slots import (
    SlotDevice,
    decode_record,
    encode_record,
    payload_offset,
    slot_record,
    slot_record_of_image,
    verify_slot_content,
    writable_slot,
)
from signing.layout import FileSource, read_layout
from signing.manifest import read_manifest
from tests.signing_helpers import make_image

SLOT_SIZE = 1 << 16


def env(boot_slot: str = "a", upgrade_available: str = "0") -> dict[str, str]:
    return {
        "boot_slot": boot_slot,
        "upgrade_available": upgrade_available,
        "bootcount": "0",
        "bootlimit": "3",
    }


# --- which slot may be written ---------------------------------------------------------------------


@pytest.mark.parametrize("running", list(SlotName))
def test_the_writable_slot_is_the_one_neither_running_nor_booting_next(running):
    assert writable_slot(running, env(running.value)) is running.other


def test_no_slot_is_writable_while_a_switch_waits_for_the_reboot():
    with pytest.raises(ActiveSlotWriteError, match="reboot first") as caught:
        writable_slot(SlotName.A, env("b", "1"))
    assert caught.value.field == "boot_slot"


def test_no_slot_is_writable_while_the_running_slot_is_on_trial():
    with pytest.raises(ActiveSlotWriteError, match="fallback") as caught:
        writable_slot(SlotName.B, env("b", "1"))
    assert caught.value.field == "upgrade_available"


@pytest.mark.parametrize("boot_slot", [None, "", "c", "A"])
def test_no_slot_is_writable_when_the_environment_does_not_say_what_boots(boot_slot):
    variables = env()
    if boot_slot is None:
        del variables["boot_slot"]
    else:
        variables["boot_slot"] = boot_slot
    with pytest.raises(ActiveSlotWriteError):
        writable_slot(SlotName.A, variables)


@given(
    running=st.sampled_from(list(SlotName)),
    variables=st.dictionaries(
        st.sampled_from(["boot_slot", "upgrade_available", "bootcount"]),
        st.sampled_from(["a", "b", "0", "1", "", "x"]),
    ),
)
def test_a_writable_slot_is_never_the_running_the_next_or_a_fallback_slot(running, variables):
    try:
        slot = writable_slot(running, variables)
    except ActiveSlotWriteError:
        return
    assert slot is not running
    assert variables["boot_slot"] != slot.value
    assert variables.get("upgrade_available", "0") == "0"


# --- records ---------------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path) -> Path:
    return make_image(
        tmp_path, payload=os.urandom(5000), vendor="Acme", image_class="gw-100", header_size=0x200
    )


def fill_slot(path: Path, image: Path, size: int = SLOT_SIZE) -> None:
    """A slot file of `size` bytes holding `image`'s payload, as an installer leaves it."""
    record = slot_record_of_image(image)
    data = image.read_bytes()
    start = payload_offset(record)
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(data[start : start + record.payload_size])


def test_the_record_of_an_image_is_everything_but_its_payload(image):
    record = slot_record_of_image(image)
    data = image.read_bytes()
    assert record.payload_size == 5000
    assert record.version == "1.2.3+4"
    assert payload_offset(record) == 0x200
    assert record.header_and_tlvs == data[:0x200] + data[0x200 + 5000 :]


def test_a_slot_holding_the_recorded_payload_hashes_to_the_signed_digest(tmp_path, image):
    fill_slot(tmp_path / "slot", image)
    with open(image, "rb") as handle:
        signed = read_manifest(read_layout(FileSource(handle.fileno(), image.stat().st_size))).digest
    with open(tmp_path / "slot", "rb") as slot:
        assert verify_slot_content(slot_record_of_image(image), slot.fileno(), SLOT_SIZE) == signed


@pytest.mark.parametrize("offset", [0, 2500, 4999])
def test_a_changed_payload_byte_is_a_content_mismatch(tmp_path, image, offset):
    fill_slot(tmp_path / "slot", image)
    with open(tmp_path / "slot", "r+b") as slot:
        slot.seek(offset)
        original = slot.read(1)
        slot.seek(offset)
        slot.write(bytes([original[0] ^ 1]))
        slot.flush()
        with pytest.raises(SlotContentMismatchError):
            verify_slot_content(slot_record_of_image(image), slot.fileno(), SLOT_SIZE)


def test_bytes_after_the_payload_do_not_matter(tmp_path, image):
    fill_slot(tmp_path / "slot", image)
    with open(tmp_path / "slot", "r+b") as slot:
        slot.seek(6000)
        slot.write(b"left over from an older, larger image")
        slot.flush()
        verify_slot_content(slot_record_of_image(image), slot.fileno(), SLOT_SIZE)


def test_a_slot_shorter_than_the_recorded_payload_is_a_mismatch(tmp_path, image):
    fill_slot(tmp_path / "slot", image, size=1000)
    os.truncate(tmp_path / "slot", 1000)
    with open(tmp_path / "slot", "rb") as slot, pytest.raises(SlotContentMismatchError):
        verify_slot_content(slot_record_of_image(image), slot.fileno(), SLOT_SIZE)


def test_a_record_whose_payload_exceeds_the_slot_is_refused(tmp_path, image):
    fill_slot(tmp_path / "slot", image)
    with open(tmp_path / "slot", "rb") as slot, pytest.raises(SlotRecordError):
        verify_slot_content(slot_record_of_image(image), slot.fileno(), 4999)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"\x00" * 64,
        lambda data: data[:100],
        lambda data: data[:-1],
        lambda data: data + b"trailer",
    ],
    ids=["empty", "no-magic", "header-only", "short-tlvs", "trailing-bytes"],
)
def test_bytes_that_are_not_an_images_header_and_tlvs_are_not_a_record(image, damage):
    with pytest.raises(SlotRecordError):
        slot_record(damage(slot_record_of_image(image).header_and_tlvs))


def test_a_file_that_is_not_an_image_has_no_record(tmp_path):
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    with pytest.raises(SlotRecordError) as caught:
        slot_record_of_image(tmp_path / "junk")
    assert caught.value.field == "image"
    with pytest.raises(SlotRecordError):
        slot_record_of_image(tmp_path / "absent")


# --- the slot device -------------------------------------------------------------------------------


@pytest.fixture
def slot(tmp_path) -> SlotDevice:
    device = tmp_path / "slot-b.img"
    with open(device, "wb") as handle:
        handle.truncate(SLOT_SIZE)
    return SlotDevice(SlotName.B, device, tmp_path / "slot-b.record", SLOT_SIZE)


def test_a_slot_without_record_is_unrecorded_factory_content(slot):
    assert slot.record() is None
    assert slot.check().status is SlotStatus.UNRECORDED
    assert slot.check().status.bootable


def test_a_slot_holding_its_recorded_image_checks_valid(slot, image):
    fill_slot(slot.device, image)
    slot._write_record(slot_record_of_image(image))
    assert slot.record() == slot_record_of_image(image)
    check = slot.check()
    assert (check.status, check.detail) == (SlotStatus.VALID, "holds image 1.2.3+4")


def test_opening_a_slot_for_writing_forgets_its_record_until_a_new_one_is_written(slot, image):
    fill_slot(slot.device, image)
    slot._write_record(slot_record_of_image(image))
    with slot._open_for_writing() as handle:
        handle.write(b"new")
    assert slot.record() is None
    assert slot.check().status is SlotStatus.INCOMPLETE
    assert not slot.check().status.bootable


def test_a_damaged_record_file_makes_the_slot_a_mismatch_not_a_crash(slot, image):
    fill_slot(slot.device, image)
    slot._write_record(slot_record_of_image(image))
    text = slot.record_path.read_text()
    slot.record_path.write_text(text.replace('"payload_size": 5000', '"payload_size": 4000'))
    assert slot.check().status is SlotStatus.MISMATCH
    slot.record_path.write_text("{")
    assert slot.check().status is SlotStatus.MISMATCH
    with pytest.raises(SlotRecordError):
        slot.record()


RECORD_FIELDS = ("format", "format_version", "content", "image_version", "payload_size", "header_and_tlvs")


@pytest.mark.parametrize("missing", RECORD_FIELDS)
def test_a_record_file_missing_a_field_makes_the_slot_a_mismatch_not_a_crash(slot, image, missing):
    fill_slot(slot.device, image)
    body = json.loads(encode_record(slot_record_of_image(image)))
    del body[missing]
    slot.record_path.write_text(json.dumps(body))
    check = slot.check()
    assert check.status is SlotStatus.MISMATCH and missing in check.detail
    with pytest.raises(SlotRecordError):
        slot.record()


@pytest.fixture(scope="module")
def record_file(tmp_path_factory) -> bytes:
    directory = tmp_path_factory.mktemp("record")
    return encode_record(slot_record_of_image(make_image(directory, payload=os.urandom(300))))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@given(
    removed=st.sets(st.sampled_from(RECORD_FIELDS)),
    replaced=st.dictionaries(st.sampled_from(RECORD_FIELDS), JSON_VALUES, max_size=3),
)
def test_a_damaged_record_file_is_a_record_or_a_slot_record_error(record_file, removed, replaced):
    body = json.loads(record_file)
    for name in removed:
        del body[name]
    body.update(replaced)
    try:
        decoded = decode_record(json.dumps(body).encode(), source="slot-a.record")
    except SlotRecordError:
        return
    assert decoded is None or isinstance(decoded, SlotRecord)


def test_a_record_too_large_for_the_slot_is_refused_and_the_old_record_stays(tmp_path, image):
    device = tmp_path / "small"
    device.write_bytes(bytes(100))
    small = SlotDevice(SlotName.A, device, tmp_path / "small.record")
    with pytest.raises(SlotRecordError):
        small._write_record(slot_record_of_image(image))
    assert not (tmp_path / "small.record").exists()


def test_a_write_past_the_end_of_the_slot_is_refused_whole_and_the_slot_keeps_its_size(slot):
    with slot._open_for_writing() as handle:
        handle.seek(SLOT_SIZE - 4)
        with pytest.raises(SlotFullError):
            handle.write(b"12345")
        assert handle.write(b"1234") == 4
        with pytest.raises(SlotError):
            handle.truncate(10)
    assert slot.device.stat().st_size == SLOT_SIZE
    assert slot.device.read_bytes()[-5:] == b"\x001234"


def test_a_large_write_lands_whole(slot):
    data = os.urandom(SLOT_SIZE)
    with slot._open_for_writing() as handle:
        assert handle.write(memoryview(data)) == SLOT_SIZE
    assert hashlib.sha256(slot.device.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_the_size_defaults_to_the_devices_and_may_not_exceed_it(tmp_path):
    device = tmp_path / "dev"
    device.write_bytes(bytes(4096))
    assert SlotDevice(SlotName.A, device, tmp_path / "r").size == 4096
    assert SlotDevice(SlotName.A, device, tmp_path / "r", 1024).size == 1024
    with pytest.raises(SlotError) as caught:
        _ = SlotDevice(SlotName.A, device, tmp_path / "r", 8192).size
    assert caught.value.field == "slots.a.size"


def test_the_record_file_of_a_slot_being_written_says_so(tmp_path):
    assert b'"content": "writing"' in encode_record(None)

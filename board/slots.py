"""The A/B slots: files or block devices of a fixed size, each with its record kept beside it.

A slot holds an image's payload only; its record holds the rest of the image (header and padding, then the
TLV areas), so the content can be checked again at any time by hashing the slot's payload between the two
through `signing`'s own check (`verify_slot_content`). Writing is the board's business: which slot may be
written depends on the boot environment (`writable_slot`), and `SlotDevice` opens a slot for
writing only when the board asks (the methods with a leading underscore), never by itself.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from signing import ContentCheck, ImageHead, SigningError, read_image_head

from .errors import (
    ActiveSlotWriteError,
    SlotContentMismatchError,
    SlotError,
    SlotFullError,
    SlotRecordError,
    StorageError,
)
from .interface import (
    ENV_BOOT_SLOT,
    ENV_UPGRADE_AVAILABLE,
    SlotCheck,
    SlotName,
    SlotRecord,
    SlotStatus,
)
from .storage import ensure_directory, read_if_present, remove_durably, write_atomically

_CHUNK = 1 << 20
_RECORD_FORMAT = "mers-slot-record"
_RECORD_FORMAT_VERSION = 1


# --- which slot may be written (pure) ---------------------------------------------------------------


def writable_slot(running: SlotName, env: Mapping[str, str]) -> SlotName:
    """The one slot the installer may write: the one the board neither runs, boots next, nor falls back
    to. Writing the running slot would corrupt the system under its own feet; writing the next boot's
    target after a switch would boot a half-written slot; writing the other slot while the running one is
    on trial would destroy the fallback the bootloader rolls back to."""
    target = env.get(ENV_BOOT_SLOT)
    if target not in (SlotName.A, SlotName.B):
        raise ActiveSlotWriteError(
            f"boot_slot is {target!r}: cannot tell which slot boots next, so none is written",
            field=ENV_BOOT_SLOT,
        )
    if target != running:
        raise ActiveSlotWriteError(
            f"slot {target} boots next (a switch is pending) while slot {running} runs: reboot first",
            field=ENV_BOOT_SLOT,
        )
    if env.get(ENV_UPGRADE_AVAILABLE, "0") != "0":
        raise ActiveSlotWriteError(
            f"slot {running} is on trial and slot {running.other} is its fallback: "
            "confirm or roll back first",
            field=ENV_UPGRADE_AVAILABLE,
        )
    return running.other


# --- records ---------------------------------------------------------------------------------------


def slot_record(header_and_tlvs: bytes) -> SlotRecord:
    """The record of an image from its bytes outside the payload, refusing bytes that are not the header
    and TLV areas of a well-formed image (so a bootloader check can never fail on a malformed record)."""
    head = _record_head(header_and_tlvs)
    return SlotRecord(header_and_tlvs, head.payload_size, str(head.version))


def slot_record_of_image(path: Path) -> SlotRecord:
    """The record of the image file at `path` (everything but its payload)."""
    try:
        with open(path, "rb") as handle:
            fd = handle.fileno()
            head = read_image_head(
                lambda start, stop: _pread_all(fd, stop - start, start), os.fstat(fd).st_size
            )
    except OSError as exc:
        raise SlotRecordError(f"cannot read image {path}: {exc.strerror}", field="image") from exc
    except SigningError as exc:
        raise SlotRecordError(f"{path} is not an image: {exc}", field="image") from exc
    return slot_record(head.record_bytes)


def verify_slot_content(record: SlotRecord, fd: int, slot_size: int) -> bytes:
    """Check that the slot open at `fd` holds the recorded image's payload: hash it after the record's
    header and before its protected TLVs (`signing.ContentCheck`), and compare with the SHA256 TLV.
    Returns the digest. Memory is one chunk, whatever the payload size.

    This catches a slot that was corrupted, half-written or overwritten since its image was verified, so
    neither the bootloader nor `mers status` takes it for the image it once held."""
    if record.payload_size > slot_size:
        raise SlotRecordError(
            f"the recorded payload of {record.payload_size} bytes exceeds the {slot_size}-byte slot"
        )
    check = ContentCheck(_record_head(record.header_and_tlvs))
    for offset in range(0, record.payload_size, _CHUNK):
        length = min(_CHUNK, record.payload_size - offset)
        try:
            data = _pread_all(fd, length, offset)
        except OSError as exc:  # a read error is the device's failure, not a content mismatch
            raise StorageError(
                f"cannot read the slot at byte {offset}: {exc.strerror or exc}", field="slot"
            ) from exc
        if len(data) != length:
            raise SlotContentMismatchError(
                f"the slot ends before the recorded payload's end at {offset + len(data)}"
            )
        check.update(data)
    try:
        return check.finish()
    except SigningError as exc:
        raise SlotContentMismatchError(
            f"the content hashes to something else than the recorded image's SHA256 "
            f"{check.head.digest.hex()[:16]}: {exc}"
        ) from exc


def payload_offset(record: SlotRecord) -> int:
    """Where the payload starts in the recorded image (its header's hdr_size)."""
    return _record_head(record.header_and_tlvs).hdr_size


def _record_head(header_and_tlvs: bytes) -> ImageHead:
    try:
        return ImageHead.from_record(header_and_tlvs)
    except SigningError as exc:
        raise SlotRecordError(f"the record is not an image's header and TLVs: {exc}") from exc


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def encode_record(record: SlotRecord | None) -> bytes:
    """The record file: the image's header and TLVs, or (None) the mark of a slot being written."""
    body: dict[str, Any] = {"format": _RECORD_FORMAT, "format_version": _RECORD_FORMAT_VERSION}
    if record is None:
        body["content"] = "writing"
    else:
        body.update(
            content="image",
            image_version=record.version,
            payload_size=record.payload_size,
            header_and_tlvs=base64.b64encode(record.header_and_tlvs).decode("ascii"),
        )
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def decode_record(data: bytes, *, source: str) -> SlotRecord | None:
    """The record in a record file, None for a slot being written; anything else is a `SlotRecordError`.

    Every field is read inside the ``try``: a damaged record file, or one an older release wrote without
    a field, must be this error (a failed slot check to the bootloader, one error line to `mers-board
    info`), never a KeyError's traceback."""
    try:
        body = json.loads(data)
        if body["format"] != _RECORD_FORMAT or body["format_version"] != _RECORD_FORMAT_VERSION:
            raise ValueError(f"not a version {_RECORD_FORMAT_VERSION} {_RECORD_FORMAT} file")
        if body["content"] == "writing":
            return None
        record = slot_record(base64.b64decode(body["header_and_tlvs"], validate=True))
        stated = (body["payload_size"], body["image_version"])
    except SlotRecordError as exc:
        raise SlotRecordError(f"{source}: {exc}") from exc
    except KeyError as exc:
        raise SlotRecordError(f"{source} is not a slot record: it has no {exc}") from exc
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise SlotRecordError(f"{source} is not a slot record: {exc}") from exc
    if (record.payload_size, record.version) != stated:
        raise SlotRecordError(f"{source}: its payload size or version disagrees with its image header")
    return record


# --- the slot --------------------------------------------------------------------------------------


class SlotDevice:
    """A slot backed by a file or a block device, with its record file. Read-only for everyone but the
    board, which alone knows whether the slot is inactive."""

    def __init__(self, name: SlotName, device: Path, record_path: Path, size: int | None = None) -> None:
        self._name = name
        self.device = device
        self.record_path = record_path
        self._configured_size = size

    @property
    def name(self) -> SlotName:
        return self._name

    @property
    def size(self) -> int:
        """The configured size, or the device's; a configured size larger than the device is refused (a
        write past the device's end would fail only after the download)."""
        actual = self._device_size()
        if self._configured_size is None:
            return actual
        if self._configured_size > actual:
            raise SlotError(
                f"slot {self._name} is configured as {self._configured_size} bytes "
                f"but {self.device} has {actual}",
                field=f"slots.{self._name}.size",
            )
        return self._configured_size

    def open_for_reading(self) -> BinaryIO:
        try:
            return open(self.device, "rb")
        except OSError as exc:
            raise self._io_error("open", exc) from exc

    def record(self) -> SlotRecord | None:
        data = read_if_present(self.record_path)
        return None if data is None else decode_record(data, source=str(self.record_path))

    def check(self) -> SlotCheck:
        data = read_if_present(self.record_path)
        if data is None:
            return SlotCheck(SlotStatus.UNRECORDED, "no record (factory content)")
        try:
            record = decode_record(data, source=str(self.record_path))
            if record is None:
                return SlotCheck(SlotStatus.INCOMPLETE, "opened for writing since its last record")
            with self.open_for_reading() as handle:
                verify_slot_content(record, handle.fileno(), self.size)
        except SlotError as exc:
            return SlotCheck(SlotStatus.MISMATCH, str(exc))
        return SlotCheck(SlotStatus.VALID, f"holds image {record.version}")

    # --- for the board only ----------------------------------------------------------------------------

    def _open_for_writing(self) -> BinaryIO:
        """Mark the record as being written first: from then on the slot never passes for its old image.
        A gateway's first install creates the records' directory (nothing else does: the factory image
        may have none there)."""
        size = self.size
        ensure_directory(self.record_path.parent)
        write_atomically(self.record_path, encode_record(None))
        try:
            return _BoundedSlotFile(self.device, size, self._name)
        except OSError as exc:
            raise self._io_error("open for writing", exc) from exc

    def _write_record(self, record: SlotRecord) -> None:
        if record.payload_size > self.size:
            raise SlotRecordError(
                f"the image's payload of {record.payload_size} bytes does not fit the {self.size}-byte slot",
                field=f"slots.{self._name}",
            )
        write_atomically(self.record_path, encode_record(record))

    def _forget_record(self) -> None:
        remove_durably(self.record_path)

    def _device_size(self) -> int:
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._io_error("open", exc) from exc
        try:
            return os.lseek(fd, 0, os.SEEK_END)  # works for block devices, where st_size is 0
        finally:
            os.close(fd)

    def _io_error(self, action: str, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot {action} slot {self._name} ({self.device}): {exc.strerror}", field=f"slots.{self._name}"
        )


class _BoundedSlotFile(io.FileIO):
    """A slot opened read-write without truncation, refusing any write that would pass the slot's end (a
    file-backed slot would otherwise grow) and any truncation (its size is fixed)."""

    def __init__(self, path: Path, limit: int, name: SlotName) -> None:
        super().__init__(path, "r+")
        self._limit = limit
        self._slot_name = name

    def write(self, data: Any, /) -> int:
        view = memoryview(data).cast("B")
        position = self.tell()
        if position + len(view) > self._limit:
            raise SlotFullError(
                f"writing {len(view)} bytes at offset {position} would pass the end of the "
                f"{self._limit}-byte slot {self._slot_name}",
                field=f"slots.{self._slot_name}",
            )
        done = 0
        while done < len(view):  # a raw write may be short; the caller gets all or an error
            try:
                written = super().write(view[done:])
            except OSError as exc:  # worn flash (EIO), a file-size limit (EFBIG): typed, naming the slot
                raise StorageError(
                    f"cannot write slot {self._slot_name} at byte {position + done} ({self.name}): "
                    f"{exc.strerror or exc}",
                    field=f"slots.{self._slot_name}",
                ) from exc
            done += written or 0
        return done

    def truncate(self, size: int | None = None, /) -> int:
        raise SlotError(
            f"slot {self._slot_name} has a fixed size; it cannot be truncated",
            field=f"slots.{self._slot_name}",
        )

"""The A/B slots: files or block devices of a fixed size, each with its record kept beside it.

A slot holds an image's payload only; its record holds the rest of the image (header and padding, then the
TLV areas), so the content can be checked again at any time by splicing the two back together and
hashing them exactly as `signing` does (`verify_slot_content`). Writing is the board's business: which
slot may be written depends on the boot environment (`writable_slot`), and `SlotDevice` opens a slot for
writing only when the board asks (the methods with a leading underscore), never by itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from signing.errors import SigningError
from signing.image_format import HEADER_SIZE
from signing.layout import FileSource, Header, read_layout
from signing.layout import parse_header as parse_image_header
from signing.manifest import read_manifest

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
    header = _parse_header(header_and_tlvs)
    if header.hdr_size > len(header_and_tlvs):
        raise SlotRecordError(
            f"the record is {len(header_and_tlvs)} bytes, "
            f"shorter than its header's hdr_size {header.hdr_size}"
        )
    image = _SplicedImage(header_and_tlvs, header.hdr_size, header.img_size, _zeros)
    try:
        read_manifest(read_layout(image))
    except SigningError as exc:
        raise SlotRecordError(f"the record is not an image's header and TLVs: {exc}") from exc
    return SlotRecord(header_and_tlvs, header.img_size, str(header.version))


def slot_record_of_image(path: Path) -> SlotRecord:
    """The record of the image file at `path` (everything but its payload)."""
    try:
        with open(path, "rb") as handle:
            layout = read_layout(FileSource(handle.fileno(), os.fstat(handle.fileno()).st_size))
            head = os.pread(handle.fileno(), layout.payload_offset, 0)
            tail_offset = layout.payload_offset + layout.header.img_size
            tail = os.pread(handle.fileno(), layout.file_size - tail_offset, tail_offset)
    except OSError as exc:
        raise SlotRecordError(f"cannot read image {path}: {exc.strerror}", field="image") from exc
    except SigningError as exc:
        raise SlotRecordError(f"{path} is not an image: {exc}", field="image") from exc
    return slot_record(head + tail)


def verify_slot_content(record: SlotRecord, fd: int, slot_size: int) -> bytes:
    """Check that the slot open at `fd` holds the recorded image's payload: splice header, payload and TLVs
    back together, hash the signed range as `signing` does, and compare with the SHA256 TLV. Returns the
    digest. Memory is one chunk, whatever the payload size.

    This catches a slot that was corrupted, half-written or overwritten since its image was verified, so
    neither the bootloader nor `mers status` takes it for the image it once held."""
    if record.payload_size > slot_size:
        raise SlotRecordError(
            f"the recorded payload of {record.payload_size} bytes exceeds the {slot_size}-byte slot"
        )
    header = _parse_header(record.header_and_tlvs)

    def payload(offset: int, length: int) -> bytes:
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
        return data

    image = _SplicedImage(record.header_and_tlvs, header.hdr_size, header.img_size, payload)
    try:
        manifest = read_manifest(read_layout(image))
        signed_length = read_layout(image).signed_length
    except SigningError as exc:
        raise SlotRecordError(f"the record is not an image's header and TLVs: {exc}") from exc
    digest = hashlib.sha256()
    for offset in range(0, signed_length, _CHUNK):
        digest.update(image.read_at(offset, min(_CHUNK, signed_length - offset)))
    if not hmac.compare_digest(digest.digest(), manifest.digest):
        raise SlotContentMismatchError(
            f"the content hashes to {digest.hexdigest()[:16]}, not to the recorded image's SHA256 "
            f"{manifest.digest.hex()[:16]}"
        )
    return manifest.digest


def payload_offset(record: SlotRecord) -> int:
    """Where the payload starts in the recorded image (its header's hdr_size)."""
    return int(_parse_header(record.header_and_tlvs).hdr_size)


def _parse_header(data: bytes) -> Header:
    try:
        return parse_image_header(data[:HEADER_SIZE])
    except SigningError as exc:
        raise SlotRecordError(f"the record does not start with an image header: {exc}") from exc


def _zeros(offset: int, length: int) -> bytes:
    del offset
    return bytes(length)


@dataclass(frozen=True)
class _SplicedImage:
    """An image as `signing.layout` reads it (`RandomAccess`), made of the record's head (header and
    padding), a payload read by `payload(offset, length)`, and the record's tail (the TLV areas)."""

    header_and_tlvs: bytes
    hdr_size: int
    payload_size: int
    payload: Callable[[int, int], bytes]

    @property
    def size(self) -> int:
        return len(self.header_and_tlvs) + self.payload_size

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        pieces = []
        payload_end = self.hdr_size + self.payload_size
        if offset < self.hdr_size:
            pieces.append(self.header_and_tlvs[offset : min(end, self.hdr_size)])
        if offset < payload_end and end > self.hdr_size:
            start = max(offset, self.hdr_size)
            pieces.append(self.payload(start - self.hdr_size, min(end, payload_end) - start))
        if end > payload_end:
            start = max(offset, payload_end)
            tail_start = start - self.payload_size
            pieces.append(self.header_and_tlvs[tail_start : end - self.payload_size])
        return b"".join(pieces)


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

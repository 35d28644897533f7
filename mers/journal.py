"""The installer's journal (docs/design.md §8): where an install stands, so every step survives a crash,
a SIGKILL or a power cut.

`IDLE → DOWNLOADING(offset) → VERIFIED → SWITCHED → REBOOTING → CONFIRMING → IDLE`. The journal is one
JSON file in the board's state directory, replaced atomically by `StateStore.write` (temp, fsync, rename),
so a reader sees the previous step or the next one, never a mix. `offset` counts payload bytes that were
fsynced to the slot before the journal said so: a restart may redo a little, never skip a byte.

The journal holds the image's URL when the install came from one: a signed URL is a credential, so it
stays in the 0600 state directory and `public_view` leaves it out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from board.interface import SlotName, StateStore
from board.storage import ensure_directory

from .errors import CorruptStateError, InstallBusyError, StorageError

JOURNAL_FILE = "install-journal.json"
LOCK_FILE = "install.lock"
_FORMAT = "mers-install-journal"
_FORMAT_VERSION = 1


class Phase(enum.StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"  # writing the inactive slot; `offset` payload bytes are durable
    VERIFIED = "VERIFIED"  # the whole image hashed and its signature checked; not yet bootable
    SWITCHED = "SWITCHED"  # slot record written; the boot environment flip (one env write) follows it
    REBOOTING = "REBOOTING"  # the reboot was requested
    CONFIRMING = "CONFIRMING"  # running the new slot on trial; health checks under way


class SourceKind(enum.StrEnum):
    TASK = "task"  # an installation task of the hub: state reported, URL refreshed on expiry
    URL = "url"  # a signed URL given by the operator
    FILE = "file"  # a local image file (USB stick)


@dataclass(frozen=True)
class Journal:
    phase: Phase = Phase.IDLE
    source: SourceKind | None = None
    task_id: str = ""
    location: str = ""  # the URL (a credential) or the file path
    etag: str = ""  # SHA-256 hex of the whole image file: the hub's strong ETag and task checksum
    image_size: int = 0
    slot: SlotName | None = None  # the slot being installed
    previous_slot: SlotName | None = None  # the slot that ran when the install started: the fallback
    offset: int = 0  # payload bytes durably in the slot
    header_and_tlvs: bytes = b""  # the image outside its payload: becomes the slot record
    version: str = ""
    security_counter: int = 0
    message: str = ""  # the last outcome, or why the trial is failing
    updated_at: float = 0.0

    @property
    def busy(self) -> bool:
        return self.phase is not Phase.IDLE

    def advanced(self, phase: Phase, **changes: Any) -> Journal:
        return replace(self, phase=phase, updated_at=time.time(), **changes)

    def finished(self, message: str) -> Journal:
        """Back to IDLE, keeping what was installed and how it ended (for `mers status`)."""
        return Journal(
            phase=Phase.IDLE,
            source=self.source,
            task_id=self.task_id,
            etag=self.etag,
            slot=self.slot,
            version=self.version,
            message=message,
            updated_at=time.time(),
        )

    def public_view(self) -> dict[str, Any]:
        """For `mers status`: everything but the URL and the raw image bytes."""
        return {
            "phase": self.phase.value,
            "source": self.source.value if self.source else None,
            "task_id": self.task_id or None,
            "file": self.location if self.source is SourceKind.FILE else None,
            "sha256": self.etag or None,
            "image_size": self.image_size or None,
            "slot": self.slot.value if self.slot else None,
            "previous_slot": self.previous_slot.value if self.previous_slot else None,
            "offset": self.offset if self.phase is Phase.DOWNLOADING else None,
            "version": self.version or None,
            "message": self.message or None,
        }


def load_journal(state: StateStore) -> Journal:
    """The stored journal, or an IDLE one when there is none. A damaged file is reported, never reset:
    guessing where an install stood could boot a half-written slot."""
    raw = state.read(JOURNAL_FILE)
    if raw is None:
        return Journal()
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise TypeError(f"a JSON {type(body).__name__}, not an object")
        if body.pop("format") != _FORMAT or body.pop("format_version") != _FORMAT_VERSION:
            raise ValueError("unknown format")
        return Journal(
            phase=Phase(body["phase"]),
            source=None if body["source"] is None else SourceKind(body["source"]),
            task_id=str(body["task_id"]),
            location=str(body["location"]),
            etag=str(body["etag"]),
            image_size=int(body["image_size"]),
            slot=None if body["slot"] is None else SlotName(body["slot"]),
            previous_slot=None if body["previous_slot"] is None else SlotName(body["previous_slot"]),
            offset=int(body["offset"]),
            header_and_tlvs=base64.b64decode(body["header_and_tlvs"], validate=True),
            version=str(body["version"]),
            security_counter=int(body["security_counter"]),
            message=str(body["message"]),
            updated_at=float(body["updated_at"]),
        )
    except (ValueError, KeyError, TypeError, OverflowError, binascii.Error) as exc:  # Overflow: Infinity
        raise CorruptStateError(f"the install journal {JOURNAL_FILE} is damaged: {exc}") from exc


def save_journal(state: StateStore, journal: Journal) -> None:
    body = asdict(journal)
    body["header_and_tlvs"] = base64.b64encode(journal.header_and_tlvs).decode("ascii")
    body["format"] = _FORMAT
    body["format_version"] = _FORMAT_VERSION
    state.write(JOURNAL_FILE, json.dumps(body, sort_keys=True).encode() + b"\n")


@contextlib.contextmanager
def journal_owner(state: StateStore) -> Iterator[None]:
    """Own the journal for a while: an exclusive lock, so the daemon and a `mers install` or `mers
    confirm` never drive one install from two processes at once. Not waited for: the other process may
    be in a download of minutes, so the caller is told at once (`InstallBusyError`)."""
    path = state.directory / LOCK_FILE
    ensure_directory(state.directory)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallBusyError("another mers process is installing or confirming right now") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock

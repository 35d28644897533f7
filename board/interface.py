"""The device behind one interface (docs/design.md §4): what the factory writes, what the installer uses.

A real gateway (configured by a TOML file) and the simulated board (one directory) implement `Board`
with the same code paths for files and block devices, so everything tested on the simulation runs on a
real gateway. Every write that matters is atomic: a power cut leaves the old state or the new one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import BoardError

__all__ = [
    "DEFAULT_BOOTLIMIT",
    "ENV_BOOTCOUNT",
    "ENV_BOOTLIMIT",
    "ENV_BOOT_SLOT",
    "ENV_UPGRADE_AVAILABLE",
    "KEY_SLOT_COUNT",
    "MAX_CA_BUNDLE_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_NETWORK_SIZE",
    "Board",
    "BoardError",
    "BoardingData",
    "BootEnvironment",
    "Identity",
    "KeySlot",
    "KeySlotState",
    "Slot",
    "SlotCheck",
    "SlotName",
    "SlotRecord",
    "SlotStatus",
    "StateStore",
    "uboot_number",
]

KEY_SLOT_COUNT = 3

# What a board stores of its boarding data, at most (the console's wire format, `board.protocol`, refuses
# more; they live here so the device side reads them without importing the wire format and its SMP stack).
MAX_CONFIG_SIZE = 64 * 1024
"""The largest boarding configuration JSON a board stores (``config``)."""
MAX_CA_BUNDLE_SIZE = 1024 * 1024
"""The largest CA bundle a board stores (``ca``); over the serial line `MAX_BOARDING_SIZE` bounds it first."""
MAX_NETWORK_SIZE = 64 * 1024
"""The largest network configuration JSON a board stores (``network``)."""

# The boot environment's variables (docs/design.md §4); all of one transition change in one env write.
ENV_BOOT_SLOT = "boot_slot"  # a | b: the slot the bootloader boots
ENV_UPGRADE_AVAILABLE = "upgrade_available"  # 1 while the booted slot is on trial, else 0
ENV_BOOTCOUNT = "bootcount"  # trial boots so far
ENV_BOOTLIMIT = "bootlimit"  # trial boots allowed before rolling back
DEFAULT_BOOTLIMIT = 3  # a new simulated board's, and the installer's when a trial finds none


def uboot_number(value: str | None) -> int:
    """An environment number as U-Boot reads `bootlimit` and `bootcount` (``env_get_ulong(name, 10, 0)``,
    i.e. ``simple_strtoul``): missing is 0; a ``0x`` prefix switches to hexadecimal; digits are read up to
    the first character that is not one (``5abc`` is 5, ``abc`` and `` 5`` are 0). The installer and
    `mers confirm` must judge a limit as the bootloader will, or they would overwrite a limit it honours
    (``0x5``) or trust one it ignores."""
    if value is None:
        return 0
    text, base = value, 10
    if text[:2].lower() == "0x":
        text, base = text[2:], 16
    digits = "0123456789abcdef"[:base]
    length = 0
    while length < len(text) and text[length].lower() in digits:
        length += 1
    return int(text[:length], base) if length else 0


class SlotName(enum.StrEnum):
    """The two A/B firmware slots."""

    A = "a"
    B = "b"

    @property
    def other(self) -> SlotName:
        return SlotName.B if self is SlotName.A else SlotName.A


class KeySlotState(enum.StrEnum):
    """A trust-anchor slot is written once and may be revoked once; nothing goes back."""

    EMPTY = "empty"
    WRITTEN = "written"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Identity:
    serial_number: str
    vendor: str
    image_class: str  # the hardware model; images carry it as UUID_CID
    hardware_revision: str


@dataclass(frozen=True)
class KeySlot:
    index: int
    state: KeySlotState
    public_key_der: bytes | None  # the form MCUboot embeds (signing.keys.PublicKey.der)
    key_hash: bytes | None  # SHA-256 of public_key_der, the KEYHASH images carry


@dataclass(frozen=True)
class BoardingData:
    """What the factory gives a device to reach its hub: the boarding configuration JSON (with the IAT),
    the CA bundle it trusts for the hub, and an optional network configuration JSON (HTTPS proxy). The
    configuration holds the IAT and the network configuration perhaps a proxy password: neither is in
    the repr, so a log line or a traceback that shows this value shows no secret."""

    config: bytes = field(repr=False)
    ca_bundle: bytes
    network: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SlotRecord:
    """The image header and TLV areas kept beside a slot's payload, so its content can be checked again
    at any time (by the simulated bootloader, by `mers status`)."""

    header_and_tlvs: bytes  # the image bytes outside the payload: header+padding, then the TLV areas
    payload_size: int
    version: str


class SlotStatus(enum.StrEnum):
    """What a check of a slot's content against its record found."""

    VALID = "valid"  # the content hashes to the SHA256 of its recorded image
    UNRECORDED = "unrecorded"  # no record: factory content, nothing to check it against
    INCOMPLETE = "incomplete"  # opened for writing since its last record: content unknown
    MISMATCH = "mismatch"  # the content (or the record) is not the recorded image

    @property
    def bootable(self) -> bool:
        """What the (simulated) bootloader accepts: content that is known good or was never recorded."""
        return self in (SlotStatus.VALID, SlotStatus.UNRECORDED)


@dataclass(frozen=True)
class SlotCheck:
    status: SlotStatus
    detail: str  # one line for people: which check failed, or the version found


#: inspects what a lock is about to seal, and raises to refuse it
LockCheck = Callable[[tuple["KeySlot", ...], "BoardingData | None"], None]


class BootEnvironment(Protocol):
    """The U-Boot environment (docs/design.md §4), readable by fw_printenv."""

    def read(self) -> dict[str, str]:
        """All variables of the current copy; raises a BoardError if no copy is valid."""
        ...

    def write(self, changes: Mapping[str, str | None]) -> None:
        """Set (or, with None, delete) several variables in ONE environment write."""
        ...


class StateStore(Protocol):
    """The installer's persistent files: atomic (temp, fsync, rename, fsync dir), all at mode 0600."""

    @property
    def directory(self) -> Path: ...

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...

    def delete(self, name: str) -> None: ...


class Slot(Protocol):
    """One A/B slot (a file or a block device), read-only: writing goes through the board, which knows
    which slot is inactive."""

    @property
    def name(self) -> SlotName: ...

    @property
    def size(self) -> int: ...

    def open_for_reading(self) -> BinaryIO: ...

    def record(self) -> SlotRecord | None:
        """The recorded image, or None when there is none (never recorded, or being written)."""
        ...

    def check(self) -> SlotCheck:
        """Hash the content against the record (the whole payload is read: bounded memory)."""
        ...


class Board(Protocol):
    """The device. Refused operations raise a `BoardError` subclass naming the field and write nothing."""

    @property
    def identity(self) -> Identity: ...

    # --- trust anchors and the provisioning lock (emulated OTP / eFuse on the simulation)
    def key_slots(self) -> tuple[KeySlot, ...]:
        """All `KEY_SLOT_COUNT` slots, empty ones included, in index order."""
        ...

    def write_key(self, index: int, public_key_der: bytes) -> KeySlot:
        """Write-once: the same key again is a no-op success; another key, a revoked slot, a key that is not
        a supported public key in the form MCUboot embeds, or any write after lock, fails."""
        ...

    def revoke_key(self, index: int) -> KeySlot:
        """Revoke a written key for good (again: no-op). Allowed after lock, since revoking only removes
        trust; refused for the last usable key of a locked board, which could then accept no image."""
        ...

    def is_locked(self) -> bool: ...

    def lock(self, check: LockCheck | None = None) -> None:
        """End provisioning writes for good; needs a usable key and the boarding data; again: no-op.
        `check` sees exactly the slots and boarding data being sealed, under the same lock as the write,
        and refuses by raising (the console compares the station's digest there)."""
        ...

    # --- anti-rollback
    def security_counter_floor(self) -> int: ...

    def raise_security_counter_floor(self, value: int) -> None:
        """Monotonic: a lower value is refused, the same value is a no-op."""
        ...

    # --- boarding data (validated on write, refused after lock)
    def boarding_data(self) -> BoardingData | None: ...

    def write_boarding_data(self, data: BoardingData) -> None: ...

    # --- installer state, slots, boot
    @property
    def state(self) -> StateStore: ...

    @property
    def boot_env(self) -> BootEnvironment: ...

    def slot(self, name: SlotName) -> Slot: ...

    def active_slot(self) -> SlotName:
        """The slot the board is running (told by the bootloader), not merely the one it boots next."""
        ...

    def open_inactive_slot_for_writing(self) -> BinaryIO:
        """The only way to write a slot. Refused while the other slot is the next boot's target or the
        running slot is on trial (the other is then its fallback). Writes past the slot's size fail.
        Opening forgets the slot's record: a half-written slot must never pass for its old image."""
        ...

    def write_slot_record(self, name: SlotName, record: SlotRecord) -> None:
        """Record the image whose payload the (inactive) slot now holds; its header must fit the slot."""
        ...

    def reboot(self) -> None: ...

"""The board of a real Linux gateway, described by one TOML file, and its configuration.

The simulated board (`board.simboard`) is this same class with a TOML file in its directory that points at
files there: one code path for files and block devices, so what the simulation tests is what runs on a
gateway. Relative paths in the file are relative to the file's directory. Unknown keys are refused (a
misspelt key would otherwise fall back silently to a default).

===========================  ========  =======================================================================
key                          required  meaning
===========================  ========  =======================================================================
identity.serial_number       one of    the board's serial number
identity.serial_number_file  these     or a file holding it (/sys/firmware/devicetree/base/serial-number);
                                       trailing NULs and blanks are dropped
identity.vendor              yes       vendor name; images carry uuid5(DNS, vendor) as UUID_VID
identity.class               yes       hardware model name; images carry its UUID_CID
identity.hardware_revision   no        free text, default ""
storage.state_dir            yes       the installer's state directory (created 0700)
storage.key_store            yes       the emulated OTP file: key slots, lock, security-counter floor,
                                       boarding data (0600; on storage that no slot update replaces)
slots.a.device               yes       slot a: a block device (/dev/mmcblk0p2) or a file
slots.a.size                 no        bytes, an integer or text with a binary unit ("512MiB"); default:
                                       the device's size; larger than the device is an error
slots.a.record               yes       file keeping slot a's record (its image header and TLVs)
slots.b.*                    yes       the same for slot b
boot.fw_env_config           yes       the fw_env.config that fw_printenv/fw_setenv use too
boot.lock_file               no        lock shared with fw_setenv, default /var/lock/fw_printenv.lock
boot.cmdline                 no        kernel command line, default /proc/cmdline
boot.slot_parameter          no        its parameter naming the running slot, default "mers.slot"; U-Boot
                                       must pass it (bootargs ... mers.slot=${boot_slot}); without it no
                                       slot is ever written, since the inactive one cannot be known
reboot.command               no        argument list, default ["systemctl", "reboot"]
reboot.request_file          no        instead of a command, write this file (the simulated board does)
===========================  ========  =======================================================================

See `board/gateway.example.toml`.
"""

from __future__ import annotations

import difflib
import json
import re
import stat
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from signing import SigningError, class_uuid

from . import fw_env_config
from .errors import (
    ActiveSlotWriteError,
    BoardError,
    BootEnvError,
    ConfigError,
    RebootError,
    RunningSlotUnknownError,
)
from .interface import (
    BoardingData,
    BootEnvironment,
    Identity,
    KeySlot,
    LockCheck,
    SlotName,
    SlotRecord,
    StateStore,
)
from .keystore import (
    BoardingSummary,
    KeyStore,
    KeyStoreState,
    validate_boarding_data,
    with_boarding,
    with_floor,
    with_key,
    with_lock,
    with_revoked,
)
from .slots import SlotDevice, writable_slot
from .storage import StateDirectory, read_if_present, write_atomically
from .ubootenv import UBootEnv

DEFAULT_REBOOT_COMMAND = ("systemctl", "reboot")
DEFAULT_ENV_LOCK_FILE = Path("/var/lock/fw_printenv.lock")
DEFAULT_CMDLINE = Path("/proc/cmdline")
DEFAULT_SLOT_PARAMETER = "mers.slot"

_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s*(K|Ki|KiB|M|Mi|MiB|G|Gi|GiB|)")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_PARAMETER_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class SlotConfig:
    device: Path
    record: Path
    size: int | None = None


@dataclass(frozen=True)
class GatewayConfig:
    """The parsed TOML file (the module docstring lists its keys)."""

    identity: Identity
    state_dir: Path
    key_store: Path
    slot_a: SlotConfig
    slot_b: SlotConfig
    fw_env_config: Path
    env_lock_file: Path = DEFAULT_ENV_LOCK_FILE
    cmdline: Path = DEFAULT_CMDLINE
    slot_parameter: str = DEFAULT_SLOT_PARAMETER
    reboot_command: tuple[str, ...] = DEFAULT_REBOOT_COMMAND
    reboot_request_file: Path | None = None

    def slot(self, name: SlotName) -> SlotConfig:
        return self.slot_a if name is SlotName.A else self.slot_b


_MAX_SIZE = 1 << 50


def parse_size(value: object, field: str) -> int:
    """A size in bytes: an integer, or text such as `4096`, `0x1000`, `64MiB`, `64M` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        number = int(match.group(1), 0) * _SIZE_UNITS[match.group(2)[:1]]
    else:
        raise ConfigError(f"{field} {value!r} is not a size (bytes, or e.g. 64MiB)", field=field)
    if number <= 0:
        raise ConfigError(f"{field} must be positive, not {number}", field=field)
    if number > _MAX_SIZE:
        raise ConfigError(f"{field} {number} is larger than any device (at most 1 PiB)", field=field)
    return number


# --- reading the TOML file -------------------------------------------------------------------------

T = TypeVar("T")


#: every key name of the file, at any level: a key left unread that is one of them is read later, not a
#: misspelling of the key found missing (a missing [boot] is not a misspelt [reboot])
KNOWN_KEYS = frozenset(
    {
        "identity", "serial_number", "serial_number_file", "vendor", "class", "hardware_revision",
        "storage", "state_dir", "key_store",
        "slots", "a", "b", "device", "record", "size",
        "boot", "fw_env_config", "lock_file", "cmdline", "slot_parameter",
        "reboot", "command", "request_file",
    }
)  # fmt: skip


class _Table:
    """One TOML table, read key by key with typed errors naming the dotted key; `done` refuses leftovers."""

    def __init__(self, data: dict[str, Any], prefix: str, base: Path) -> None:
        self._data = dict(data)
        self._prefix = prefix
        self._base = base

    def _key(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def missing(self, key: str, message: str | None = None) -> ConfigError:
        """The error for a required `key` that is absent, naming a key left in the table that looks like
        a misspelling of it: that key is the fault, not the one the reader never saw."""
        message = message or f"{self._key(key)} is missing"
        unread = [name for name in self._data if isinstance(name, str) and name not in KNOWN_KEYS]
        near = difflib.get_close_matches(key, unread, n=1, cutoff=0.6)
        if not near:
            return ConfigError(message, field=self._key(key))
        misspelt = self._key(near[0])
        return ConfigError(
            f"unknown key {misspelt}: is it {self._key(key)} misspelt? ({message})", field=misspelt
        )

    def _take(self, key: str, kind: type[T], what: str) -> T | None:
        value = self._data.pop(key, None)
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"{self._key(key)} must be {what}", field=self._key(key))
        return value

    def text(self, key: str, default: str | None = None, *, empty: bool = False) -> str:
        """A required string (or `default` when absent); printable, and non-empty unless `empty`."""
        value = self.optional_text(key, empty=empty)
        if value is not None:
            return value
        if default is None:
            raise self.missing(key)
        return default

    def optional_text(self, key: str, *, empty: bool = False) -> str | None:
        value = self._take(key, str, "a string")
        if value is not None and (not (value.strip() or empty) or not value.isprintable()):
            raise ConfigError(f"{self._key(key)} must be printable, non-empty text", field=self._key(key))
        return value

    def path(self, key: str, default: Path | None = None) -> Path:
        """A required path (or `default`), relative to the configuration file's directory."""
        return self._base / self.text(key, None if default is None else str(default))

    def optional_path(self, key: str) -> Path | None:
        value = self.optional_text(key)
        return None if value is None else self._base / value

    def size(self, key: str) -> int | None:
        value = self._data.pop(key, None)
        return None if value is None else parse_size(value, self._key(key))

    def words(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._take(key, list, "a list of strings")
        if value is None:
            return default
        if not value or not all(isinstance(word, str) and word for word in value):
            raise ConfigError(f"{self._key(key)} must be a non-empty list of strings", field=self._key(key))
        return tuple(value)

    def table(self, key: str) -> _Table:
        value = self._take(key, dict, "a table")
        if value is None:
            raise self.missing(key, f"[{self._key(key)}] is missing")
        return _Table(value, self._key(key), self._base)

    def done(self) -> None:
        if self._data:
            key = self._key(sorted(self._data)[0])
            raise ConfigError(f"unknown key {key}", field=key)


def load_config(path: Path) -> GatewayConfig:
    """Read and check the board's TOML file; a `ConfigError` names the key that is wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read board configuration {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not TOML: {exc}") from exc
    return parse_config(document, path.parent)


def parse_config(document: dict[str, Any], base: Path) -> GatewayConfig:
    root = _Table(document, "", base)
    identity = _identity(root.table("identity"))
    storage, boot, slots = root.table("storage"), root.table("boot"), root.table("slots")
    reboot = root.table("reboot") if "reboot" in document else _Table({}, "reboot", base)
    config = GatewayConfig(
        identity=identity,
        state_dir=storage.path("state_dir"),
        key_store=storage.path("key_store"),
        slot_a=_slot(slots.table("a")),
        slot_b=_slot(slots.table("b")),
        fw_env_config=boot.path("fw_env_config"),
        env_lock_file=boot.path("lock_file", DEFAULT_ENV_LOCK_FILE),
        cmdline=boot.path("cmdline", DEFAULT_CMDLINE),
        slot_parameter=boot.text("slot_parameter", DEFAULT_SLOT_PARAMETER),
        reboot_command=reboot.words("command", DEFAULT_REBOOT_COMMAND),
        reboot_request_file=reboot.optional_path("request_file"),
    )
    for table in (storage, boot, slots, reboot, root):
        table.done()
    if not _PARAMETER_RE.fullmatch(config.slot_parameter):
        raise ConfigError("boot.slot_parameter is not a kernel parameter name", field="boot.slot_parameter")
    if _same_storage(config.slot_a.device, config.slot_b.device) or _same_storage(
        config.slot_a.record, config.slot_b.record
    ):
        raise ConfigError("slots a and b must use different devices and records", field="slots.b")
    _refuse_files_in_state_dir(config)
    return config


def _same_storage(first: Path, second: Path) -> bool:
    """Whether two configured paths reach the same bytes: equal once resolved (`/dev/../dev/mmcblk0p2`,
    a `/dev/disk/by-partlabel/` symlink), the same block device (two nodes of one major:minor) or the same
    file (a hard link). Slots a and b on one device would make the "inactive" slot the running rootfs,
    and the installer would overwrite the system under its own feet."""
    try:
        if first.resolve() == second.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: the stat below fails on it too
        pass
    try:
        one, other = first.stat(), second.stat()
    except OSError:  # one is not there (yet): its resolved path decided
        return False
    if stat.S_ISBLK(one.st_mode) and stat.S_ISBLK(other.st_mode):
        return one.st_rdev == other.st_rdev
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def _refuse_files_in_state_dir(config: GatewayConfig) -> None:
    """The installer may write and delete anything in its state directory: the key store, the slot
    records or the environment configuration in there could be forged or reset through it."""
    guarded = {
        "storage.key_store": config.key_store,
        "slots.a.record": config.slot_a.record,
        "slots.b.record": config.slot_b.record,
        "boot.fw_env_config": config.fw_env_config,
    }
    state_dir = config.state_dir.resolve()
    for field, path in guarded.items():
        if path.resolve().is_relative_to(state_dir):
            raise ConfigError(
                f"{field} must not be inside storage.state_dir ({config.state_dir})", field=field
            )


def _identity(table: _Table) -> Identity:
    serial = table.optional_text("serial_number")
    serial_file = table.optional_path("serial_number_file")
    if serial_file is not None and serial is None:
        serial = _read_serial(serial_file)
    elif serial is None and serial_file is None:
        raise table.missing(
            "serial_number", "give exactly one of identity.serial_number and identity.serial_number_file"
        )
    elif serial is not None and serial_file is not None:
        raise ConfigError(
            "give exactly one of identity.serial_number and identity.serial_number_file",
            field="identity.serial_number",
        )
    identity = Identity(
        serial_number=serial or "",
        vendor=table.text("vendor"),
        image_class=table.text("class"),
        hardware_revision=table.text("hardware_revision", "", empty=True),
    )
    table.done()
    return check_identity(identity)


def check_identity(identity: Identity) -> Identity:
    """Refuse an identity that could not be reported or matched against images: empty or unprintable
    fields, or names with no UUID_VID/UUID_CID."""
    for key, value in (
        ("serial_number", identity.serial_number),
        ("vendor", identity.vendor),
        ("class", identity.image_class),
    ):
        if not value.strip() or not value.isprintable():
            raise ConfigError(
                f"identity.{key} {value!r} is not printable, non-empty text", field=f"identity.{key}"
            )
    if not identity.hardware_revision.isprintable():
        raise ConfigError("identity.hardware_revision is not printable", field="identity.hardware_revision")
    try:
        class_uuid(identity.vendor, identity.image_class)
    except SigningError as exc:
        raise ConfigError(f"identity: {exc}", field="identity.vendor") from exc
    return identity


def _read_serial(path: Path) -> str:
    data = read_if_present(path)
    serial = (data or b"").rstrip(b"\x00 \t\r\n").decode("utf-8", "replace")
    if not serial or not serial.isprintable():
        raise ConfigError(f"{path} holds no printable serial number", field="identity.serial_number_file")
    return serial


def _slot(table: _Table) -> SlotConfig:
    config = SlotConfig(device=table.path("device"), record=table.path("record"), size=table.size("size"))
    table.done()
    return config


def render_config(config: GatewayConfig, base: Path) -> str:
    """The TOML text of `config`, with paths under `base` written relative to it (the file lives there)."""

    def path(value: Path) -> str:
        return json.dumps(str(value.relative_to(base)) if value.is_relative_to(base) else str(value))

    def slot(name: str, slot_config: SlotConfig) -> list[str]:
        lines = [
            f"\n[slots.{name}]",
            f"device = {path(slot_config.device)}",
            f"record = {path(slot_config.record)}",
        ]
        if slot_config.size is not None:
            lines.append(f"size = {slot_config.size}")
        return lines

    identity = config.identity
    lines = [
        "# mers board configuration; the keys are described in board/gateway.py",
        "[identity]",
        f"serial_number = {json.dumps(identity.serial_number)}",
        f"vendor = {json.dumps(identity.vendor)}",
        f"class = {json.dumps(identity.image_class)}",
        f"hardware_revision = {json.dumps(identity.hardware_revision)}",
        "\n[storage]",
        f"state_dir = {path(config.state_dir)}",
        f"key_store = {path(config.key_store)}",
        *slot("a", config.slot_a),
        *slot("b", config.slot_b),
        "\n[boot]",
        f"fw_env_config = {path(config.fw_env_config)}",
        f"lock_file = {path(config.env_lock_file)}",
        f"cmdline = {path(config.cmdline)}",
        f"slot_parameter = {json.dumps(config.slot_parameter)}",
        "\n[reboot]",
    ]
    if config.reboot_request_file is not None:
        lines.append(f"request_file = {path(config.reboot_request_file)}")
    else:
        lines.append(f"command = [{', '.join(json.dumps(word) for word in config.reboot_command)}]")
    return "\n".join(lines) + "\n"


# --- the board -------------------------------------------------------------------------------------


class GatewayBoard:
    """`board.interface.Board` over the files and devices its `GatewayConfig` names."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._key_store = KeyStore(config.key_store)
        self._state = StateDirectory(config.state_dir)
        self._slots = {
            name: SlotDevice(name, c.device, c.record, c.size)
            for name in SlotName
            for c in [config.slot(name)]
        }
        self._boot_env: BootEnvironment | None = None

    @classmethod
    def from_toml(cls, path: Path) -> GatewayBoard:
        return cls(load_config(path))

    def initialise(self) -> bool:
        """Give a new gateway its empty key store, once (its first boot, or the image build). True when
        it was created now; an existing store, locked or not, is left exactly as it is."""
        existed = self._key_store.exists()
        self._key_store.initialise()
        return not existed

    @property
    def identity(self) -> Identity:
        return self.config.identity

    # --- the emulated OTP --------------------------------------------------------------------------

    def key_slots(self) -> tuple[KeySlot, ...]:
        return self._key_store.read().key_slots

    def write_key(self, index: int, public_key_der: bytes) -> KeySlot:
        return self._update(lambda state: with_key(state, index, public_key_der)).key_slots[index]

    def revoke_key(self, index: int) -> KeySlot:
        return self._update(lambda state: with_revoked(state, index)).key_slots[index]

    def is_locked(self) -> bool:
        return self._key_store.read().locked

    def lock(self, check: LockCheck | None = None) -> None:
        self._update(lambda state: with_lock(state, check))

    def security_counter_floor(self) -> int:
        return self._key_store.read().security_counter_floor

    def raise_security_counter_floor(self, value: int) -> None:
        self._update(lambda state: with_floor(state, value))

    def boarding_data(self) -> BoardingData | None:
        return self._key_store.read().boarding

    def write_boarding_data(self, data: BoardingData) -> None:
        self._update(lambda state: with_boarding(state, data))

    def boarding_summary(self) -> BoardingSummary | None:
        """The checked fields and hashes of the boarding data, as the console's `info` reports them."""
        data = self.boarding_data()
        return None if data is None else validate_boarding_data(data)

    def _update(self, transition: Callable[[KeyStoreState], KeyStoreState]) -> KeyStoreState:
        return self._key_store.update(transition)

    # --- installer state, slots, boot ---------------------------------------------------------------

    @property
    def state(self) -> StateStore:
        return self._state

    @property
    def boot_env(self) -> BootEnvironment:
        if self._boot_env is None:
            self._boot_env = _open_boot_env(self.config)
        return self._boot_env

    def slot(self, name: SlotName) -> SlotDevice:
        return self._slots[SlotName(name)]

    def running_slot(self) -> SlotName | None:
        """The slot the bootloader booted, from the kernel command line; None if it does not say."""
        data = read_if_present(self.config.cmdline)
        prefix = f"{self.config.slot_parameter}="
        for word in (data or b"").decode("utf-8", "replace").split():
            if word.startswith(prefix):
                value = word.removeprefix(prefix)
                if value in (SlotName.A, SlotName.B):
                    return SlotName(value)
        return None

    def active_slot(self) -> SlotName:
        running = self.running_slot()
        if running is None:
            raise RunningSlotUnknownError(
                f"{self.config.cmdline} has no {self.config.slot_parameter}=a|b: the bootloader must "
                "pass the slot it booted, or the inactive slot cannot be known"
            )
        return running

    def inactive_slot(self) -> SlotName:
        """The slot the installer may write now (`board.slots.writable_slot` says when there is none)."""
        return writable_slot(self.active_slot(), self.boot_env.read())

    def open_inactive_slot_for_writing(self) -> BinaryIO:
        return self.slot(self.inactive_slot())._open_for_writing()

    def write_slot_record(self, name: SlotName, record: SlotRecord) -> None:
        writable = self.inactive_slot()
        if SlotName(name) is not writable:
            raise ActiveSlotWriteError(
                f"slot {name} is not the inactive slot ({writable}); its record stays", field=f"slots.{name}"
            )
        self.slot(writable)._write_record(record)

    def reboot(self) -> None:
        request = self.config.reboot_request_file
        if request is not None:
            write_atomically(request, json.dumps({"requested_at": time.time()}).encode() + b"\n")
            return
        try:
            completed = subprocess.run(
                self.config.reboot_command, capture_output=True, check=False, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RebootError(f"cannot run {' '.join(self.config.reboot_command)}: {exc}") from exc
        if completed.returncode != 0:
            message = completed.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RebootError(
                f"{' '.join(self.config.reboot_command)} exited with {completed.returncode}"
                + (f": {message[-1]}" if message else "")
            )


def _open_boot_env(config: GatewayConfig) -> BootEnvironment:
    try:
        env_config = fw_env_config.load(config.fw_env_config)
        return UBootEnv(env_config, lock_path=config.env_lock_file)
    except BoardError as exc:
        raise BootEnvError(f"{config.fw_env_config}: {exc}", field="boot.fw_env_config") from exc

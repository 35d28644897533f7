"""The U-Boot environment, read and written so that U-Boot and Debian's fw_printenv/fw_setenv agree.

Layout (docs/design.md §4, checked against libubootenv-tool 0.3.2): every copy is `crc32 | data` (single)
or `crc32 | flags | data` (redundant), the CRC being zlib's CRC-32 over the entire data area, padding
included, stored little-endian. The data area holds `name=value\\0` entries and one more `\\0`; what
follows is padding. libubootenv pads with whatever its buffer held (in practice the bytes of the copy it
read, so stale entries can sit after the end marker); U-Boot's own `saveenv` pads with zeros, and so do
we. Only the parsed variables and the CRC mean anything: nothing here compares raw bytes.

Power-cut safety is the reason for two copies: a write goes to the copy that is *not* current, with
flags = current + 1 (a byte; 255 wraps to 0), so a write torn by a power cut leaves a copy with a bad CRC
and the previous environment still readable in the other. The current copy is the only one with a valid
CRC, or, if both are valid, the one with the higher flags, except that 0 beats 255 (the wrap); equal flags
pick copy 0. With no valid copy we raise `NoValidEnvironmentError` and write nothing: fw_printenv and
fw_setenv carry on with a default environment file (/etc/u-boot-initial-env), and fw_setenv then writes
it, which on a gateway silently forgets the boot slot.

Every transition of the boot state changes several variables at once (`boot_slot`, `upgrade_available`,
`bootcount`), so `write` applies all of them in ONE copy write: a power cut can never leave half a
transition. Readers and writers take the advisory `flock` that fw_printenv and fw_setenv take
(`/var/lock/fw_printenv.lock` unless told otherwise), so a concurrent fw_setenv cannot write the same
non-current copy between our read and our write and lose an update.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import stat
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from construct import (
    Bytes,
    Computed,
    ConstructError,
    FixedSized,
    GreedyBytes,
    Int8ul,
    Int32ul,
    NullTerminated,
    Rebuild,
    RepeatUntil,
    Struct,
)

from .errors import BootEnvError
from .fw_env_config import EnvDevice, FwEnvConfig

#: the lock file libubootenv 0.3.2 hard-codes (U-Boot's fw_printenv used the same name)
DEFAULT_LOCK_PATH = Path("/var/lock/fw_printenv.lock")
#: device prefixes libubootenv treats as raw MTD flash or UBI volumes (erase blocks, obsolete flags)
UNSUPPORTED_DEVICE_PREFIXES = ("/dev/mtd", "/dev/ubi")
FLAGS_MODULUS = 0x100
#: the flags of a fresh environment's copies: copy 0 is current without relying on the tie rule
INITIAL_FLAGS = (1, 0)

# Variables are bytes in the environment; surrogateescape keeps any byte U-Boot stored round-trippable.
_ENCODING = "utf-8"
_ENCODING_ERRORS = "surrogateescape"


# --- errors ----------------------------------------------------------------------------------------


class UBootEnvError(BootEnvError):
    """Base of every error this module raises on purpose; `field` names the variable, device or step."""


class NoValidEnvironmentError(UBootEnvError):
    """No copy has a valid CRC. Nothing is written: a default environment would forget the boot slot."""

    field = "crc"


class EnvFormatError(UBootEnvError):
    """The current copy's CRC is valid but its last entry has no NUL (libubootenv cannot read it either)."""

    field = "data"


class InvalidVariableError(UBootEnvError):
    """A name or value that U-Boot cannot store or read back as given; `field` is the variable name."""

    field = "name"


class EnvTooLargeError(UBootEnvError):
    """The variables do not fit the data area of a copy."""

    field = "size"


class EnvLayoutError(UBootEnvError):
    """The configured copy is too small to hold its own header and an empty environment."""

    field = "size"


class EnvDeviceError(UBootEnvError):
    """A device or file holding a copy cannot be opened or read, or is shorter than the copy."""

    field = "device"


class UnsupportedDeviceError(EnvDeviceError):
    """Raw MTD flash, UBI volumes and negative offsets on regular files are not handled here."""


class EnvWriteError(EnvDeviceError):
    """Writing a copy failed; that copy may be torn, the other one still holds the previous environment."""


class EnvLockError(UBootEnvError):
    """The lock file shared with fw_printenv/fw_setenv cannot be created or locked."""

    field = "lock"


# --- the format ------------------------------------------------------------------------------------

_CRC = "crc" / Rebuild(Int32ul, lambda ctx: zlib.crc32(ctx.data))
_FLAGS = "flags" / Int8ul

SingleCopyHeader = Struct(_CRC)
RedundantCopyHeader = Struct(_CRC, _FLAGS)

#: the data area: NUL-terminated `name=value` entries up to the empty entry that ends the list
EnvEntries = RepeatUntil(lambda entry, _entries, _ctx: entry == b"", NullTerminated(GreedyBytes))


def copy_header(redundant: bool) -> Struct:
    return RedundantCopyHeader if redundant else SingleCopyHeader


def data_size(copy_size: int, redundant: bool) -> int:
    """How many bytes of a `copy_size` copy hold variables: everything after the CRC (and flags)."""
    return copy_size - int(copy_header(redundant).sizeof())


@functools.cache
def copy_format(copy_size: int, redundant: bool) -> Struct:
    """One whole copy, `copy_size` bytes as fw_env.config states it, parsed and built by construct."""
    return Struct(
        *copy_header(redundant).subcons,
        "data" / Bytes(data_size(copy_size, redundant)),
        "crc_valid" / Computed(lambda ctx: zlib.crc32(ctx.data) == ctx.crc),
    )


@functools.cache
def data_format(size: int) -> FixedSized:
    """The data area of `size` bytes: the entries, then zero padding (U-Boot's, and ours)."""
    return FixedSized(size, EnvEntries)


# --- pure functions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCopy:
    """One copy as read: whether its CRC holds, its flags (None for a single copy) and its data area."""

    crc_valid: bool
    flags: int | None
    data: bytes


def parse_copy(blob: bytes, redundant: bool) -> ParsedCopy:
    """Split a copy into CRC validity, flags and data; any bytes of the right length are a copy."""
    parsed = copy_format(len(blob), redundant).parse(blob)
    return ParsedCopy(bool(parsed.crc_valid), parsed.flags if redundant else None, bytes(parsed.data))


def choose_current(copies: Sequence[ParsedCopy]) -> int | None:
    """The index of the current copy as U-Boot and libubootenv choose it, or None if no CRC is valid."""
    valid = [index for index, copy in enumerate(copies) if copy.crc_valid]
    if len(valid) <= 1:
        return valid[0] if valid else None
    first, second = (copy.flags for copy in copies)
    if first == FLAGS_MODULUS - 1 and second == 0:
        return 1  # the counter wrapped: 0 was written after 255
    if second == FLAGS_MODULUS - 1 and first == 0:
        return 0
    return 1 if (second or 0) > (first or 0) else 0


def parse_variables(data: bytes) -> dict[str, str]:
    """The variables of a data area, read as libubootenv reads them.

    Entries without `=` are skipped and a repeated name keeps its last value, as in libubootenv. The end
    of the area also ends the list when the last entry's NUL is its final byte: fw_setenv 0.3.2 writes
    such areas (its size check is one byte short, the end marker falls just past the copy). An entry
    without its NUL raises `EnvFormatError` (libubootenv reports "Cannot read environment").
    """
    try:
        entries = EnvEntries.parse(data + b"\0")
    except ConstructError as exc:
        raise EnvFormatError(
            "the current copy has a valid CRC but its entries run past the end of the data area"
        ) from exc
    variables: dict[str, str] = {}
    for entry in entries[:-1]:
        name, separator, value = bytes(entry).partition(b"=")
        if separator:
            variables[_decode(name)] = _decode(value)
    return variables


def build_data(variables: Mapping[str, str], size: int) -> bytes:
    """A data area of `size` bytes: the entries sorted by name (as libubootenv writes them), the end
    marker, zero padding. Raises `EnvTooLargeError` if they do not fit."""
    entries = [_encode(name) + b"=" + _encode(value) for name, value in variables.items()]
    entries.sort(key=lambda entry: entry.partition(b"=")[0])  # strcmp order of the names
    needed = sum(len(entry) + 1 for entry in entries) + 1
    if needed > size:
        raise EnvTooLargeError(
            f"the variables need {needed} bytes (entries, their NULs and the end marker) but the data "
            f"area of a copy holds {size}"
        )
    return bytes(data_format(size).build([*entries, b""]))


def build_copy(variables: Mapping[str, str], copy_size: int, *, flags: int | None) -> bytes:
    """A whole copy holding `variables`; `flags` is None for a single copy."""
    redundant = flags is not None
    data = build_data(variables, data_size(copy_size, redundant))
    fields: dict[str, object] = {"data": data}
    if redundant:
        fields["flags"] = flags
    return bytes(copy_format(copy_size, redundant).build(fields))


def validate_changes(changes: Mapping[str, str | None]) -> None:
    """Refuse, before anything is written, what U-Boot could not store or would read back differently.

    A name must be non-empty and hold no `=` (U-Boot splits the entry at the first one) and no NUL (the
    entry separator); a value must be non-empty (U-Boot's setenv and fw_setenv scripts take an empty
    value as a deletion: pass None for that) and hold no NUL. Text that cannot be encoded as bytes is
    refused too.
    """
    for name, value in changes.items():
        _check_text(name, name, "name")
        if "=" in name:
            raise InvalidVariableError(f"variable name {name!r} contains '='", field=name)
        if value is not None:
            if value == "":
                raise InvalidVariableError(
                    f"variable {name!r} has an empty value; use None to delete a variable", field=name
                )
            _check_text(value, name, "value")


def _check_text(text: str, name: str, what: str) -> None:
    if not isinstance(text, str) or text == "":
        raise InvalidVariableError(f"variable {what} {text!r} is not a non-empty string", field=name)
    if "\0" in text:
        raise InvalidVariableError(f"variable {what} {text!r} contains a NUL byte", field=name)
    try:
        _encode(text)
    except UnicodeEncodeError as exc:
        raise InvalidVariableError(f"variable {what} {text!r} cannot be encoded: {exc}", field=name) from exc


def _encode(text: str) -> bytes:
    return text.encode(_ENCODING, _ENCODING_ERRORS)


def _decode(raw: bytes) -> str:
    return raw.decode(_ENCODING, _ENCODING_ERRORS)


# --- the environment on its devices ---------------------------------------------------------------


@dataclass(frozen=True)
class EnvCopy:
    """Diagnostic view of one copy (`mers status`, tests): where it is and whether it would be used."""

    index: int
    device: Path
    offset: int
    crc_valid: bool
    flags: int | None
    current: bool


class UBootEnv:
    """The environment described by a `fw_env.config`, on files or block devices.

    `lock_path` is the advisory lock shared with fw_printenv/fw_setenv; leave it None on a gateway (the
    tools' own `/var/lock/fw_printenv.lock`) and give another path only where no tool runs (tests).
    """

    def __init__(self, config: FwEnvConfig, lock_path: Path | None = None) -> None:
        for device in config.devices:
            # libubootenv classifies the resolved path, so a symlink to /dev/mtd3 is raw flash too
            if os.path.realpath(device.device).startswith(UNSUPPORTED_DEVICE_PREFIXES):
                raise UnsupportedDeviceError(
                    f"{device.device} is raw MTD flash or a UBI volume, which this module does not write",
                    field=str(device.device),
                )
        if data_size(config.copy_size, config.redundant) < 1:
            raise EnvLayoutError(f"a copy of {config.copy_size} bytes cannot hold an environment")
        self._config = config
        self._lock_path = DEFAULT_LOCK_PATH if lock_path is None else lock_path

    @property
    def config(self) -> FwEnvConfig:
        return self._config

    @property
    def lock_path(self) -> Path:
        return self._lock_path

    @property
    def data_size(self) -> int:
        """The bytes available to entries, their NULs and the end marker."""
        return data_size(self._config.copy_size, self._config.redundant)

    def read(self) -> dict[str, str]:
        """All variables of the current copy; `NoValidEnvironmentError` if no copy is valid."""
        with self._locked(exclusive=False):
            copies = self._read_copies()
        return parse_variables(copies[self._current(copies)].data)

    def write(self, changes: Mapping[str, str | None]) -> None:
        """Set (or, with None, delete) every variable in `changes` in ONE write of one copy.

        Redundant: the non-current copy is written with flags = current + 1, so a torn write leaves the
        previous environment current. Single copy: rewritten in place (no protection against power cuts,
        which is why gateways use two). Nothing is written if a change is invalid, the result does not
        fit, or no copy is valid.
        """
        validate_changes(changes)
        with self._locked(exclusive=True):
            copies = self._read_copies()
            current = self._current(copies)
            variables = parse_variables(copies[current].data)
            for name, value in changes.items():
                if value is None:
                    variables.pop(name, None)
                else:
                    variables[name] = value
            if self._config.redundant:
                target = 1 - current
                flags: int | None = ((copies[current].flags or 0) + 1) % FLAGS_MODULUS
            else:
                target, flags = 0, None
            blob = build_copy(variables, self._config.copy_size, flags=flags)
            self._write_copy(self._config.devices[target], blob, create=False)

    def copies(self) -> tuple[EnvCopy, ...]:
        """Each copy's CRC validity and flags, and which one is current (none, if no CRC is valid)."""
        with self._locked(exclusive=False):
            copies = self._read_copies()
        current = choose_current(copies)
        return tuple(
            EnvCopy(index, device.device, device.offset, copy.crc_valid, copy.flags, index == current)
            for index, (device, copy) in enumerate(zip(self._config.devices, copies, strict=True))
        )

    def initialise(self, variables: Mapping[str, str]) -> None:
        """Write every copy afresh with `variables` (creating missing files), copy 0 current."""
        validate_changes(variables)
        with self._locked(exclusive=True):
            for index, device in enumerate(self._config.devices):
                flags = INITIAL_FLAGS[index] if self._config.redundant else None
                self._write_copy(
                    device, build_copy(variables, self._config.copy_size, flags=flags), create=True
                )

    # --- I/O ---------------------------------------------------------------------------------------

    def _current(self, copies: Sequence[ParsedCopy]) -> int:
        current = choose_current(copies)
        if current is None:
            names = ", ".join(f"{device.device}@{device.offset}" for device in self._config.devices)
            raise NoValidEnvironmentError(
                f"no copy of the U-Boot environment has a valid CRC ({names}); refusing to use or write "
                f"a default environment (a new board's first one is written by `mers-board env init`)"
            )
        return current

    def _read_copies(self) -> list[ParsedCopy]:
        return [
            parse_copy(self._read_copy(device), self._config.redundant) for device in self._config.devices
        ]

    def _read_copy(self, device: EnvDevice) -> bytes:
        try:
            fd = os.open(device.device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise EnvDeviceError(
                f"cannot open {device.device}: {exc.strerror}", field=str(device.device)
            ) from exc
        try:
            offset = _resolve_offset(fd, device)
            chunks = []
            remaining = device.size
            while remaining:
                chunk = os.pread(fd, remaining, offset + device.size - remaining)
                if not chunk:
                    raise EnvDeviceError(
                        f"{device.device} ends before the {device.size}-byte environment copy "
                        f"at offset {offset}",
                        field=str(device.device),
                    )
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise EnvDeviceError(
                f"cannot read {device.device}: {exc.strerror}", field=str(device.device)
            ) from exc
        finally:
            os.close(fd)

    def _write_copy(self, device: EnvDevice, blob: bytes, *, create: bool) -> None:
        """pwrite the whole copy at its offset and fsync; never truncate (other data shares the device)."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(device.device, flags, 0o644)
        except OSError as exc:
            raise EnvWriteError(
                f"cannot open {device.device}: {exc.strerror}", field=str(device.device)
            ) from exc
        try:
            offset = _resolve_offset(fd, device)
            view = memoryview(blob)
            while view:
                written = os.pwrite(fd, view, offset + len(blob) - len(view))
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            raise EnvWriteError(
                f"writing the environment copy at offset {device.offset} of {device.device} failed "
                f"({exc.strerror}); that copy may be torn",
                field=str(device.device),
            ) from exc
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the lock fw_printenv/fw_setenv take: shared to read (they take it exclusively even to
        read, so a shared lock still keeps them out), exclusive for a read-modify-write.

        libubootenv ignores a lock it cannot take; we refuse to go on, since an unlocked read-modify-write
        can silently lose a concurrent fw_setenv's update.
        """
        try:
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise EnvLockError(f"cannot open the lock file {self._lock_path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as exc:
                raise EnvLockError(f"cannot lock {self._lock_path}: {exc.strerror}") from exc
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def create(config: FwEnvConfig, variables: Mapping[str, str], *, lock_path: Path | None = None) -> UBootEnv:
    """A fresh environment: every copy written with `variables` (copy 0 current), files created if
    missing. Used to set up the simulated board; it overwrites whatever environment was there."""
    env = UBootEnv(config, lock_path)
    env.initialise(variables)
    return env


def _resolve_offset(fd: int, device: EnvDevice) -> int:
    """The absolute offset of a copy; a negative one counts back from the end of a block device."""
    if device.offset >= 0:
        return device.offset
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        raise UnsupportedDeviceError(
            f"offset {device.offset} counts back from the end of a block device, "
            f"and {device.device} is not one",
            field=str(device.device),
        )
    offset = os.lseek(fd, 0, os.SEEK_END) + device.offset
    if offset < 0:
        raise UnsupportedDeviceError(
            f"offset {device.offset} lies before the start of {device.device}", field=str(device.device)
        )
    return offset

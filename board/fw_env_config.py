"""`fw_env.config`: where the copies of the U-Boot environment live, read as libubootenv reads it.

The file is the one `fw_printenv -c` / `fw_setenv -c` (Debian's libubootenv-tool 0.3.2) take, so the
installer, the simulated board and the stock tools always agree on which bytes are the environment. One
line per copy, `device offset size [sector_size [sectors]]`; one line is a single copy, two lines a
redundant pair. libubootenv reads each line with `sscanf("%ms %lli %zx %zx %lx")`, which decides the
number syntax: the offset is a C integer (`0x` hex, leading `0` octal, else decimal, optionally signed; a
negative offset counts back from the end of a block device), while size, sector size and sector count
are always hexadecimal, `0x` or not (`4000` is 16 KiB). Only a `#` in the first column makes a comment
line; an indented `#` begins a device name.

libubootenv silently skips a line it cannot read and ignores everything after the second copy, so a typo
can move the environment without a word. We accept every well-formed file it accepts and refuse the rest
with a `FwEnvConfigError` that names the line: a config that two programs could read differently is
exactly the failure this parser exists to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BoardError

MAX_COPIES = 2

_HEX_RE = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)")
_C_INT_RE = re.compile(r"([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_FIELD_NAMES = ("device", "offset", "size", "sector_size", "sectors")


class FwEnvConfigError(BoardError):
    """Base of every error this module raises on purpose; `field` names the value, `line` its line."""

    line: int | None = None

    def __init__(self, message: str, *, field: str = "", line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message, field=field)
        self.line = line


class MalformedLineError(FwEnvConfigError):
    """A line is not `device offset size [sector_size [sectors]]` with numbers in the expected syntax."""


class InvalidLayoutError(FwEnvConfigError):
    """The lines are well formed but do not describe one or two usable, non-overlapping copies."""

    field = "layout"


class ConfigFileError(FwEnvConfigError):
    """The config file cannot be read."""

    field = "config"


@dataclass(frozen=True)
class EnvDevice:
    """One copy of the environment: `size` bytes at `offset` in `device` (a file or block device).

    `sector_size` and `sectors` matter to libubootenv only on raw MTD flash (erase blocks); they are kept
    so a config survives a parse/render round trip unchanged.
    """

    device: Path
    offset: int
    size: int
    sector_size: int | None = None
    sectors: int | None = None

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise InvalidLayoutError(f"copy size {self.size} is not positive", field="size")
        if self.sectors is not None and self.sector_size is None:
            raise InvalidLayoutError("a sector count needs a sector size before it", field="sectors")
        for name in ("sector_size", "sectors"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidLayoutError(f"{name} {value} is negative", field=name)

    def overlaps(self, other: EnvDevice) -> bool:
        """Whether both copies claim a common byte (same device spelling, ranges intersecting).

        Two copies that overlap would each destroy the other on every write, leaving nothing to fall
        back to after a power cut.
        """
        if self.device != other.device or (self.offset < 0) != (other.offset < 0):
            return False
        return self.offset < other.offset + other.size and other.offset < self.offset + self.size


@dataclass(frozen=True)
class FwEnvConfig:
    """One copy (`redundant` is False) or two copies of the same size (the redundant, flags scheme)."""

    devices: tuple[EnvDevice, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.devices) <= MAX_COPIES:
            raise InvalidLayoutError(
                f"{len(self.devices)} environment copies; fw_env.config describes one or two"
            )
        if len(self.devices) == MAX_COPIES:
            first, second = self.devices
            if first.size != second.size:
                # libubootenv refuses this too: both copies must be interchangeable
                raise InvalidLayoutError(
                    f"the copies differ in size (0x{first.size:x} and 0x{second.size:x})", field="size"
                )
            if first.overlaps(second):
                raise InvalidLayoutError(
                    f"the two copies overlap in {first.device} (offsets {first.offset} and {second.offset})",
                    field="offset",
                )

    @property
    def redundant(self) -> bool:
        return len(self.devices) == MAX_COPIES

    @property
    def copy_size(self) -> int:
        """The size of one whole copy, CRC (and flags) included, as the config's size field says."""
        return self.devices[0].size


def parse(text: str) -> FwEnvConfig:
    """The config in `text`; raises a `FwEnvConfigError` naming the line of anything malformed."""
    devices: list[EnvDevice] = []
    last_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = _fields(raw)
        if not fields:
            continue
        if len(devices) == MAX_COPIES:
            # libubootenv stops reading after two copies; a third line means the author expected otherwise
            raise InvalidLayoutError(
                f"a third environment copy ({fields[0]}); fw_env.config describes one or two", line=number
            )
        devices.append(_device(fields, number))
        last_line = number
    if not devices:
        raise InvalidLayoutError("no environment copy is configured")
    try:
        return FwEnvConfig(tuple(devices))
    except FwEnvConfigError as exc:
        raise type(exc)(str(exc), field=exc.field, line=last_line) from exc


def load(path: Path) -> FwEnvConfig:
    """Read and parse the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from exc
    return parse(text)


def render(config: FwEnvConfig) -> str:
    """The `fw_env.config` text for `config`, which `parse` and libubootenv both read back unchanged."""
    lines = ["# device offset size [sector_size [sectors]]; sizes are hexadecimal"]
    for device in config.devices:
        name = str(device.device)
        if not name or name.startswith("#") or any(char.isspace() for char in name):
            # libubootenv reads the device with %ms: a blank or a leading '#' would change its meaning
            raise InvalidLayoutError(
                f"device path {name!r} cannot be written in fw_env.config", field="device"
            )
        sign = "-" if device.offset < 0 else ""
        fields = [name, f"{sign}0x{abs(device.offset):x}", f"0x{device.size:x}"]
        if device.sector_size is not None:
            fields.append(f"0x{device.sector_size:x}")
        if device.sectors is not None:
            fields.append(f"0x{device.sectors:x}")
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def _fields(line: str) -> list[str]:
    """The whitespace-separated fields of a line, up to a later field that starts with `#`.

    libubootenv skips only a line whose very first character is `#`; after leading blanks, a `#` is
    the first character of the device name (`%ms`), so `  #env 0 0x4000` is a copy on `#env` for it.
    A later field starting with `#` ends the line, since sscanf stops at the first it cannot convert.
    """
    if line.startswith("#"):
        return []
    fields = line.split()
    for index, token in enumerate(fields[1:], start=1):
        if token.startswith("#"):
            return fields[:index]
    return fields


def _device(fields: list[str], line: int) -> EnvDevice:
    if len(fields) < 3:
        raise MalformedLineError(
            f"{len(fields)} field(s); expected 'device offset size [sector_size [sectors]]'",
            field=_FIELD_NAMES[len(fields)],
            line=line,
        )
    if len(fields) > len(_FIELD_NAMES):
        raise MalformedLineError(
            f"unexpected field {fields[len(_FIELD_NAMES)]!r} after the sector count",
            field="sectors",
            line=line,
        )
    numbers = [_hex(value, name, line) for value, name in zip(fields[2:], _FIELD_NAMES[2:], strict=False)]
    try:
        return EnvDevice(
            device=Path(fields[0]),
            offset=_c_integer(fields[1], line),
            size=numbers[0],
            sector_size=numbers[1] if len(numbers) > 1 else None,
            sectors=numbers[2] if len(numbers) > 2 else None,
        )
    except FwEnvConfigError as exc:
        raise type(exc)(str(exc), field=exc.field, line=line) from exc


def _c_integer(text: str, line: int) -> int:
    """An integer as `strtoll(text, NULL, 0)` reads it, refusing what strtoll would read only in part
    (`08` is octal 0 followed by a stray 8 there, which sscanf would then take as the size)."""
    match = _C_INT_RE.fullmatch(text)
    if not match:
        raise MalformedLineError(
            f"offset {text!r} is not a C integer (0x... hex, 0... octal, or decimal)",
            field="offset",
            line=line,
        )
    sign, hex_digits, octal_digits, decimal_digits = match.groups()
    if hex_digits is not None:
        value = int(hex_digits, 16)
    elif octal_digits is not None:
        value = int(octal_digits, 8)
    else:
        value = int(decimal_digits, 10)
    return -value if sign == "-" else value


def _hex(text: str, name: str, line: int) -> int:
    """A size field: always hexadecimal, with or without `0x` (libubootenv's `%zx`/`%lx`)."""
    match = _HEX_RE.fullmatch(text)
    if not match:
        raise MalformedLineError(f"{name} {text!r} is not a hexadecimal number", field=name, line=line)
    return int(match.group(1), 16)

"""A board's first U-Boot environment (`mers-board env init`).

A new gateway's boot medium holds no valid environment: U-Boot then boots from its built-in default, and
mers refuses to use or write an environment it cannot read (a default written over a damaged one could
switch the running slot). The integrator writes the first one once, both copies, from a defaults file in
the text form `mkenvimage` reads: `name=value` lines, blank lines and lines with `#` in the first column
skipped, a backslash just before a line's end keeping that newline in the value. Usually that is U-Boot's
own default environment (`u-boot-initial-env`, made by the U-Boot build), then `uboot/mers-env.txt` with
the boot commands, its values replacing the first file's: an environment read from the medium replaces
U-Boot's built-in one whole, so it must hold what the built-in one had (`kernel_addr_r`, say).

mers's four variables are added where the file does not set them, and must be ones the bootloader and
the installer agree on where it does: `boot_slot` a or b, `upgrade_available` 0 (no trial can be armed by
a first environment: nothing was installed), and a `bootlimit` U-Boot keeps (as `mers install` requires
of the limit it finds when it arms a trial).
A valid environment is never replaced without `force`: on a board in the field it holds the slot that
runs and a trial's count.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import BoardError, ConfigError
from .interface import (
    DEFAULT_BOOTLIMIT,
    ENV_BOOT_SLOT,
    ENV_BOOTCOUNT,
    ENV_BOOTLIMIT,
    ENV_UPGRADE_AVAILABLE,
    SlotName,
    uboot_number,
)
from .ubootenv import UBootEnv, validate_changes

#: what a first environment holds for mers where the defaults file says nothing
MERS_DEFAULTS: Mapping[str, str] = {
    ENV_BOOT_SLOT: SlotName.A.value,
    ENV_UPGRADE_AVAILABLE: "0",
    ENV_BOOTCOUNT: "0",
    ENV_BOOTLIMIT: str(DEFAULT_BOOTLIMIT),
}


_ULONG32_MAX = 0xFFFF_FFFF


class EnvironmentExistsError(BoardError):
    """The board already has a valid environment; `env init` replaces it only when forced."""


def parse_defaults(text: str, source: str) -> dict[str, str]:
    """The variables of a defaults file, as `mkenvimage` reads it, a name set again taking the later value
    as U-Boot does; what mkenvimage would pass on but U-Boot would drop or misread (a line without `=`, a
    name with blanks) is refused, naming its line."""
    variables: dict[str, str] = {}
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        first = number + 1
        entry = lines[number]
        while entry.endswith("\\") and number + 1 < len(lines):  # an escaped newline stays in the value
            number += 1
            entry = entry[:-1] + "\n" + lines[number]
        number += 1
        if entry == "" or entry.startswith("#"):
            continue
        name, equals, value = entry.partition("=")
        where = f"{source}:{first}"
        if not equals:
            raise ConfigError(f"{where}: {entry[:60]!r} is not name=value", field="defaults")
        if name != name.strip() or any(blank in name for blank in " \t\r\n"):
            raise ConfigError(f"{where}: the variable name {name!r} holds blanks", field="defaults")
        variables.pop(name, None)
        variables[name] = value  # a later line wins, as U-Boot and fw_printenv read duplicates
    return {name: value for name, value in variables.items() if value != ""}  # empty: unset, as U-Boot


def first_environment(defaults: Mapping[str, str]) -> dict[str, str]:
    """`defaults` with mers's variables added where absent, checked where present."""
    variables = {**MERS_DEFAULTS, **defaults}
    if variables[ENV_BOOT_SLOT] not in (SlotName.A, SlotName.B):
        raise ConfigError(f"boot_slot is {variables[ENV_BOOT_SLOT]!r}, not a or b", field=ENV_BOOT_SLOT)
    if variables[ENV_UPGRADE_AVAILABLE] != "0":
        raise ConfigError(
            "upgrade_available must be 0 in a first environment: no trial was armed",
            field=ENV_UPGRADE_AVAILABLE,
        )
    if not 0 < uboot_number(variables[ENV_BOOTLIMIT]) <= _ULONG32_MAX:
        raise ConfigError(
            f"bootlimit {variables[ENV_BOOTLIMIT]!r} is no limit U-Boot keeps (0 or no digits: none, a "
            f"failed trial is never rolled back; past 32 bits: a 32-bit U-Boot wraps it)",
            field=ENV_BOOTLIMIT,
        )
    validate_changes(variables)
    return variables


def initialise_environment(env: UBootEnv, variables: Mapping[str, str], *, force: bool = False) -> None:
    """Write every copy of `env` with `variables`, unless a copy is valid already and not `force`."""
    valid = [copy for copy in env.copies() if copy.crc_valid]
    if valid and not force:
        where = ", ".join(f"{copy.device}@{copy.offset}" for copy in valid)
        raise EnvironmentExistsError(
            f"the board has a valid U-Boot environment ({where}); it holds the running slot and any "
            f"trial's count, so it is replaced only with --force",
            field="boot_env",
        )
    env.initialise(variables)

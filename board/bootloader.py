"""The simulated bootloader: U-Boot's bootcount logic over the boot environment and the slot checks.

The model, one call of `boot` per power-on:

1. Read the environment. `bootcount` and `bootlimit` are read as U-Boot reads them (`uboot_number`:
   missing or no digits is 0, ``0x`` is hexadecimal); a missing `upgrade_available` is 0. A `bootlimit`
   of 0, as in U-Boot (`bootlimit && bootcount > bootlimit`), turns the limit off: a trial is then booted
   for ever, never rolled back (the installer sets `bootlimit` when it arms a trial for that reason). A
   missing or unknown `boot_slot`, or an `upgrade_available` other than 0 or 1, stops the boot with an
   error (U-Boot would boot something undefined).
2. `upgrade_available=0`: the committed slot `boot_slot` is booted and the environment is not written
   (U-Boot counts the boot in memory, but saves `bootcount` only while an upgrade is on trial).
3. `upgrade_available=1`: `bootcount` is incremented. While it is at most `bootlimit` (or the limit is
   off), this is trial boot number `bootcount` of `boot_slot`. Once it passes a positive `bootlimit`, the
   boot rolls back as U-Boot's `altbootcmd` does: `boot_slot` becomes the other slot and
   `upgrade_available` 0 (`bootcount` keeps its value, telling `mers confirm` why). As in real U-Boot,
   that is two environment writes, both before a kernel is loaded: `bootcount_store` saves the count,
   then `altbootcmd` switches and saves again. A power cut between them leaves the count past the limit
   with the trial still armed, so the next power-on counts once more and rolls back then. A trial within
   its limit is the one write of the count.
4. The chosen slot boots if its content matches its record (or it has none: factory content). If not, the
   boot attempt fails: nothing runs, and what U-Boot does next is up to the watchdog, which resets the
   board, so the caller simply boots again. On trial, the failed attempts count towards `bootlimit` and
   end in a rollback (never, with the limit off); on a committed slot nothing counts, so every attempt
   fails alike (a bricked board stays visibly bricked rather than booting something it was not told to).

`decide_boot` is that model as a pure function; `boot` is the thin layer that reads and writes the board.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BootEnvError
from .interface import (
    ENV_BOOT_SLOT,
    ENV_BOOTCOUNT,
    ENV_BOOTLIMIT,
    ENV_UPGRADE_AVAILABLE,
    SlotCheck,
    SlotName,
    uboot_number,
)
from .simboard import SimBoard

#: a `bootlimit` of 0, or none at all, is U-Boot's "no limit": a trial is never rolled back
NO_BOOTLIMIT = 0


class BootOutcome(enum.StrEnum):
    BOOTED = "booted"
    FAILED = "failed"  # the attempt failed; boot again


class BootReason(enum.StrEnum):
    """Why the slot was chosen."""

    COMMITTED = "committed"  # no upgrade on trial
    TRIAL = "trial"  # an upgrade on trial, within bootlimit
    ROLLBACK = "rollback"  # the trial passed bootlimit: back to the other slot


@dataclass(frozen=True)
class BootDecision:
    slot: SlotName  # the slot the attempt boots
    outcome: BootOutcome
    reason: BootReason
    bootcount: int  # after this boot
    bootlimit: int  # NO_BOOTLIMIT: the limit is off
    upgrade_available: bool  # after this boot
    #: the environment writes of this boot, in U-Boot's order (each one save); empty: nothing written
    env_writes: tuple[Mapping[str, str], ...] = ()

    @property
    def env_changes(self) -> dict[str, str]:
        """Every variable this boot changes, its writes taken together."""
        return {name: value for write in self.env_writes for name, value in write.items()}


def decide_boot(env: Mapping[str, str], slot_bootable: Mapping[SlotName, bool]) -> BootDecision:
    """One boot attempt of the model in the module docstring. `slot_bootable` is consulted only for the
    slot chosen, so a caller can check slots lazily."""
    boot_slot = _slot(env)
    bootcount = _number(env, ENV_BOOTCOUNT)
    bootlimit = _number(env, ENV_BOOTLIMIT)  # NO_BOOTLIMIT when missing or no number
    on_trial = _flag(env)
    writes: list[Mapping[str, str]] = []
    reason = BootReason.COMMITTED
    if on_trial:
        bootcount += 1
        writes.append({ENV_BOOTCOUNT: str(bootcount)})  # bootcount_store
        reason = BootReason.TRIAL
        if bootlimit != NO_BOOTLIMIT and bootcount > bootlimit:
            boot_slot = boot_slot.other
            on_trial = False
            writes.append({ENV_BOOT_SLOT: boot_slot.value, ENV_UPGRADE_AVAILABLE: "0"})  # altbootcmd
            reason = BootReason.ROLLBACK
    outcome = BootOutcome.BOOTED if slot_bootable[boot_slot] else BootOutcome.FAILED
    return BootDecision(boot_slot, outcome, reason, bootcount, bootlimit, on_trial, tuple(writes))


def _slot(env: Mapping[str, str]) -> SlotName:
    value = env.get(ENV_BOOT_SLOT)
    if value not in (SlotName.A, SlotName.B):
        raise BootEnvError(f"boot_slot is {value!r}, not a or b: nothing to boot", field=ENV_BOOT_SLOT)
    return SlotName(value)


def _number(env: Mapping[str, str], name: str) -> int:
    """As U-Boot reads the counters (`uboot_number`: ``0x5`` is 5, ``three`` is 0), so the simulated board
    honours exactly the limits the installer leaves in place."""
    return uboot_number(env.get(name))


def _flag(env: Mapping[str, str]) -> bool:
    value = env.get(ENV_UPGRADE_AVAILABLE, "0")
    if value not in ("0", "1"):
        raise BootEnvError(f"upgrade_available is {value!r}, not 0 or 1", field=ENV_UPGRADE_AVAILABLE)
    return value == "1"


# --- the I/O layer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootResult:
    decision: BootDecision
    check: SlotCheck  # of the slot the attempt booted

    @property
    def message(self) -> str:
        """One line: which slot booted (or failed to), and why."""
        decision = self.decision
        slot = decision.slot
        if decision.reason is BootReason.COMMITTED:
            why = "committed"
        elif decision.reason is BootReason.TRIAL and decision.bootlimit == NO_BOOTLIMIT:
            why = f"trial boot {decision.bootcount}, no bootlimit: never rolled back"
        elif decision.reason is BootReason.TRIAL:
            why = f"trial boot {decision.bootcount} of {decision.bootlimit}"
        else:
            why = (
                f"rolled back from slot {slot.other} (bootcount {decision.bootcount} > "
                f"bootlimit {decision.bootlimit})"
            )
        if decision.outcome is BootOutcome.BOOTED:
            return f"booted slot {slot}: {why}; {self.check.detail}"
        if decision.upgrade_available:
            then = "boot again"
        else:
            then = f"nothing is on trial, so every boot will try slot {slot} again"
        return f"boot of slot {slot} failed ({why}): {self.check.detail}; {then}"

    def as_json(self) -> dict[str, Any]:
        decision = self.decision
        return {
            "outcome": decision.outcome.value,
            "slot": decision.slot.value,
            "reason": decision.reason.value,
            "bootcount": decision.bootcount,
            "bootlimit": decision.bootlimit,
            "upgrade_available": decision.upgrade_available,
            "env_changes": decision.env_changes,
            "env_writes": [dict(write) for write in decision.env_writes],
            "slot_status": self.check.status.value,
            "detail": self.check.detail,
            "message": self.message,
        }


def boot(board: SimBoard) -> BootResult:
    """Power the simulated board on once: decide, make the environment writes U-Boot makes (none, one, or
    two on a rollback), then record what runs (the kernel command line) and clear the reboot request."""
    env = board.boot_env.read()
    checks = _SlotChecks(board)
    decision = decide_boot(env, checks)
    for write in decision.env_writes:
        board.boot_env.write(write)
    board.record_boot(decision.slot if decision.outcome is BootOutcome.BOOTED else None)
    return BootResult(decision, checks.check(decision.slot))


class _SlotChecks(Mapping[SlotName, bool]):
    """Slot bootability computed on first use: checking hashes the whole slot, and only one is needed."""

    def __init__(self, board: SimBoard) -> None:
        self._board = board
        self._checks: dict[SlotName, SlotCheck] = {}

    def check(self, name: SlotName) -> SlotCheck:
        if name not in self._checks:
            self._checks[name] = self._board.slot(name).check()
        return self._checks[name]

    def __getitem__(self, name: SlotName) -> bool:
        return self.check(name).status.bootable

    def __iter__(self) -> Iterator[SlotName]:
        return iter(SlotName)

    def __len__(self) -> int:
        return len(SlotName)

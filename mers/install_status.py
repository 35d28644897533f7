"""What `mers status` adds about firmware: the slots and their images, the running and next slot, the
security-counter floor, the boot environment and the install journal (with its task).

Local only (no network), and nothing secret: the journal's URL is left out. Slot contents are checked
against their records only on request (`check_slots`), since that hashes whole slots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from board.errors import BoardError
from board.interface import Board, SlotName

from .errors import MersError
from .journal import load_journal


@dataclass(frozen=True)
class SlotStatusLine:
    name: str
    size: int | None  # None when the slot cannot be measured (see `problem`)
    version: str | None  # the recorded image, or None (factory content or being written)
    check: str | None  # valid | unrecorded | incomplete | mismatch, when checked
    problem: str | None = None  # what could not be read of this slot


@dataclass(frozen=True)
class FirmwareStatus:
    """Each part is read on its own: a damaged journal or a missing slot device is shown where its value
    would be (`error`, `problem`), and the rest still printed, since that is what diagnoses the board."""

    running_slot: str | None
    slots: tuple[SlotStatusLine, ...]
    security_counter_floor: int | None  # None when the key store cannot be read (see `problems`)
    boot_env: dict[str, str]
    install: dict[str, Any]
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        lines = [f"running slot: {self.running_slot or 'unknown'}"]
        for slot in self.slots:
            size = f"{slot.size} bytes" if slot.size is not None else "size unknown"
            checked = f", {slot.check}" if slot.check else ""
            problem = f"; {slot.problem}" if slot.problem else ""
            version = slot.version or "no recorded image"
            lines.append(f"slot {slot.name}: {version} ({size}{checked}){problem}")
        floor = self.security_counter_floor
        lines.append(f"security counter floor: {floor if floor is not None else 'unknown'}")
        lines.append("boot env: " + " ".join(f"{k}={v}" for k, v in sorted(self.boot_env.items())))
        install = {k: v for k, v in self.install.items() if v is not None}
        lines.append("install: " + ", ".join(f"{k}={v}" for k, v in install.items()))
        lines += [f"problem: {problem}" for problem in self.problems]
        return lines


def firmware_status(board: Board, *, check_slots: bool = False) -> FirmwareStatus:
    problems: list[str] = []
    try:
        running: str | None = board.active_slot().value
    except BoardError as exc:
        running = None
        problems.append(str(exc))
    slots = [_slot_status(board, name, check_slots) for name in SlotName]
    try:
        env = board.boot_env.read()
    except BoardError as exc:
        env = {"error": str(exc)}
    try:
        floor: int | None = board.security_counter_floor()
    except BoardError as exc:
        floor = None
        problems.append(str(exc))
    try:
        install = load_journal(board.state).public_view()
    except MersError as exc:
        install = {"error": str(exc)}
    return FirmwareStatus(running, tuple(slots), floor, env, install, tuple(problems))


def _slot_status(board: Board, name: SlotName, check_slots: bool) -> SlotStatusLine:
    slot = board.slot(name)
    size: int | None = None
    version: str | None = None
    check: str | None = None
    try:
        size = slot.size
        record = slot.record()
        version = record.version if record is not None else None
        if check_slots:
            check = slot.check().status.value
    except BoardError as exc:
        return SlotStatusLine(name.value, size, version, check, str(exc))
    return SlotStatusLine(name.value, size, version, check)

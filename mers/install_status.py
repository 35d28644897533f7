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

from .journal import load_journal


@dataclass(frozen=True)
class SlotStatusLine:
    name: str
    size: int
    version: str | None  # the recorded image, or None (factory content or being written)
    check: str | None  # valid | unrecorded | incomplete | mismatch, when checked


@dataclass(frozen=True)
class FirmwareStatus:
    running_slot: str | None
    slots: tuple[SlotStatusLine, ...]
    security_counter_floor: int
    boot_env: dict[str, str]
    install: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        lines = [f"running slot: {self.running_slot or 'unknown'}"]
        for slot in self.slots:
            checked = f", {slot.check}" if slot.check else ""
            lines.append(
                f"slot {slot.name}: {slot.version or 'no recorded image'} ({slot.size} bytes{checked})"
            )
        lines.append(f"security counter floor: {self.security_counter_floor}")
        lines.append("boot env: " + " ".join(f"{k}={v}" for k, v in sorted(self.boot_env.items())))
        install = {k: v for k, v in self.install.items() if v is not None}
        lines.append("install: " + ", ".join(f"{k}={v}" for k, v in install.items()))
        return lines


def firmware_status(board: Board, *, check_slots: bool = False) -> FirmwareStatus:
    try:
        running: str | None = board.active_slot().value
    except BoardError:
        running = None
    slots = []
    for name in SlotName:
        slot = board.slot(name)
        try:
            record = slot.record()
            version = record.version if record is not None else None
        except BoardError:
            version = None
        check = slot.check().status.value if check_slots else None
        slots.append(SlotStatusLine(name.value, slot.size, version, check))
    try:
        env = board.boot_env.read()
    except BoardError as exc:
        env = {"error": str(exc)}
    return FirmwareStatus(
        running_slot=running,
        slots=tuple(slots),
        security_counter_floor=board.security_counter_floor(),
        boot_env=env,
        install=load_journal(board.state).public_view(),
    )

"""Power cuts: the installer and the confirm step run as processes of their own and are SIGKILLed at 30 points
drawn at random (seeded) from the whole install: header check, download checkpoints, verification, slot
record, environment switch, reboot request, health check, commit, floor, report. After each cut the
simulated bootloader powers the board on and must boot a good slot; restarting finishes the install."""

from __future__ import annotations

import random
import signal
from pathlib import Path

from board.interface import SlotName
from mers.journal import Phase, load_journal
from tests.forked_process import Finished, run_driver
from tests.hub_helpers import RunningHub
from tests.installer_helpers import Rig, make_rig

INSTALL_POINTS = [
    "checked",
    "started",
    "checkpoint:1",
    "checkpoint:2",
    "checkpoint:3",
    "downloaded",
    "verified",
    "recorded",
    "switched",
    "rebooting",
]
CONFIRM_POINTS = ["confirming", "healthy", "committed", "floor-raised", "reported"]
CUTS_PER_INSTALL = 10
INSTALLS = 3


def drive(rig: Rig, action: str, *args: str) -> Finished:
    """`installer_helpers.install_driver BOARD ACTION ARGS` in a process of its own."""
    return run_driver("tests.installer_helpers:install_driver", [str(rig.gateway.path), action, *args])


def run_to(rig: Rig, action: str, args: list[str], point: str | None) -> bool:
    """Run the step, killed at `point` (if it gets there); then, after a cut or a requested reboot,
    power the board on. True when the process was killed."""
    completed = drive(rig, action, *args, *(["--kill-at", point] if point else []))
    killed = completed.returncode == -signal.SIGKILL
    assert killed or completed.returncode == 0, completed.stderr
    if killed or rig.board.reboot_requested():
        rig.boot()  # asserts that something boots
    return killed


def test_sigkill_at_30_random_points_always_leaves_a_bootable_board_and_restarts_finish(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    generator = random.Random(2026)
    everything = INSTALL_POINTS + CONFIRM_POINTS
    kills = 0
    for number in range(INSTALLS):
        counter = number + 2
        version = f"2.{number}.0"
        task_id = rig.task_for(rig.image(version, counter=counter))
        target = rig.board.active_slot().other
        points = sorted(generator.sample(everything, CUTS_PER_INSTALL), key=everything.index)

        for point in [p for p in points if p in INSTALL_POINTS]:
            kills += run_to(rig, "install", [task_id], point)
        run_to(rig, "install", [task_id], None)  # the restart: finishes or finds the trial running
        assert rig.board.active_slot() is target
        for point in [p for p in points if p in CONFIRM_POINTS]:
            kills += run_to(rig, "confirm", [], point)
        finished = drive(rig, "confirm")
        assert finished.returncode == 0, finished.stderr

        board = rig.board
        task = rig.task(task_id)
        assert task["state"] == "ACTIVATED", task["history"]
        assert board.active_slot() is target
        assert board.slot(target).record().version == f"{version}+0"  # type: ignore[union-attr]
        assert board.security_counter_floor() == counter
        assert board.boot_env.read()["upgrade_available"] == "0"
        assert load_journal(board.state).phase is Phase.IDLE
        assert rig.boot().decision.slot is target, "committed: it boots again"
    assert kills >= 25, f"only {kills} of the drawn points were reached"
    assert rig.board.slot(SlotName.A).check().status.bootable

"""The installer end to end through the real CLIs: a task on a real hub over TLS, `mers install`, the
simulated bootloader (`mers-board boot`), `mers confirm`; and the health check that fails until the
bootloader rolls back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from board.interface import SlotName, uboot_number
from mers.errors import EXIT_NOT_CONFIRMED
from mers.install import trial_env_changes
from mers.journal import Phase, load_journal
from tests.conftest import run_cli
from tests.hub_helpers import RunningHub
from tests.installer_helpers import make_rig


def test_task_is_downloaded_verified_switched_booted_confirmed_and_activated(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("2.1.0", counter=4))

    installed = rig.mers("install", "--task", task_id)
    assert installed.returncode == 0, installed.stderr
    assert "rebooting" in installed.stdout
    assert "https://" not in installed.stdout + installed.stderr, "no URL is ever printed"
    board = rig.board
    assert board.reboot_requested()
    env = board.boot_env.read()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "1", "0")
    assert board.active_slot() is SlotName.A, "still running the old slot until the reboot"
    assert rig.task(task_id)["state"] == "ACTIVATING"
    assert load_journal(board.state).phase is Phase.REBOOTING

    booted = run_cli("mers-board", "boot", rig.gateway.path)
    assert booted.returncode == 0, booted.stderr
    assert board.active_slot() is SlotName.B

    confirmed = rig.mers("confirm")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "2.1.0" in confirmed.stdout
    task = rig.task(task_id)
    assert task["state"] == "ACTIVATED"
    states = [entry["to"] for entry in task["history"]]
    assert states == [
        "CREATED",
        "DOWNLOADING",
        *[s for s in states[2:] if s == "DOWNLOADING"],
        "DOWNLOADED",
        "INSTALLING",
        "INSTALLED",
        "ACTIVATING",
        "ACTIVATED",
    ]
    env = board.boot_env.read()
    assert (env["boot_slot"], env["upgrade_available"]) == ("b", "0")
    assert board.security_counter_floor() == 4
    assert load_journal(board.state).phase is Phase.IDLE

    status = rig.mers("status", "--json", "--check-slots")
    assert status.returncode == 0, status.stderr
    firmware = json.loads(status.stdout)["firmware"]
    assert firmware["running_slot"] == "b" and firmware["security_counter_floor"] == 4
    assert [(s["name"], s["version"], s["check"]) for s in firmware["slots"]] == [
        ("a", "1.0.0+0", "valid"),
        ("b", "2.1.0+0", "valid"),
    ]
    assert firmware["install"]["phase"] == "IDLE" and "ACTIVATED" in firmware["install"]["message"]
    assert "sig=" not in status.stdout

    again = run_cli("mers-board", "boot", rig.gateway.path)
    assert again.returncode == 0 and rig.board.active_slot() is SlotName.B, "committed: no rollback"


def test_failed_health_check_is_rolled_back_by_the_bootloader_and_reported_failed(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("3.0.0", counter=2))
    assert rig.mers("install", "--task", task_id).returncode == 0

    for trial in (1, 2, 3):
        result = rig.boot()
        assert result.decision.slot is SlotName.B and result.decision.bootcount == trial
        refused = rig.mers("confirm", "--health-hook", "sh -c 'echo disk check failed >&2; exit 3'")
        assert refused.returncode == EXIT_NOT_CONFIRMED, refused.stderr
        assert "disk check failed" in refused.error_line
        assert rig.board.reboot_requested(), "an unhealthy trial reboots so the next attempt counts"
        assert rig.task(task_id)["state"] == "ACTIVATING"

    rolled_back = rig.boot()
    assert rolled_back.decision.slot is SlotName.A and rolled_back.decision.reason.value == "rollback"
    reported = rig.mers("confirm")
    assert reported.returncode == EXIT_NOT_CONFIRMED
    assert "rolled back to slot a" in reported.error_line
    task = rig.task(task_id)
    assert task["state"] == "FAILED"
    assert "rolled back" in task["message"] and "disk check failed" in task["message"]
    board = rig.board
    assert board.active_slot() is SlotName.A and board.slot(SlotName.A).record().version == "1.0.0+0"  # type: ignore[union-attr]
    assert board.security_counter_floor() == 0, "the floor rises only on a confirmed image"
    assert board.boot_env.read()["upgrade_available"] == "0"
    assert load_journal(board.state).phase is Phase.IDLE
    assert rig.mers("confirm").returncode == 0, "nothing left to confirm"


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (None, 0),
        ("", 0),
        ("0", 0),
        ("00", 0),
        ("three", 0),
        (" 5", 0),
        ("-1", 0),
        ("5", 5),
        ("5abc", 5),
        ("0x5", 5),
        ("0X1f", 31),
        ("0x", 0),
        ("0xg", 0),
        ("012", 12),  # base 10 given: no octal
    ],
)
def test_an_environment_number_is_read_as_u_boot_reads_it(value: str | None, number: int) -> None:
    assert uboot_number(value) == number


@pytest.mark.parametrize(
    ("found", "kept"),
    [
        (None, False),
        ("0", False),
        ("three", False),
        ("5", True),
        ("0x5", True),
        ("4x", True),
        ("4294967295", True),
        ("4294967296", False),  # a 32-bit U-Boot reads 0: no limit
    ],
)
def test_arming_a_trial_keeps_any_bootlimit_u_boot_honours(found: str | None, kept: bool) -> None:
    env = {} if found is None else {"bootlimit": found}
    changes = trial_env_changes(env, SlotName.B)
    assert changes.get("bootlimit", found) == (found if kept else "3")


@pytest.mark.parametrize(
    ("found", "armed"), [(None, "3"), ("0", "3"), ("three", "3"), ("5", "5"), ("0x2", "0x2")]
)
def test_a_trial_is_armed_with_a_bootlimit_so_a_failing_one_is_rolled_back_on_any_board(
    hub: RunningHub, tmp_path: Path, found: str | None, armed: str
) -> None:
    """U-Boot reads a missing, zero or non-numeric bootlimit as "no limit": without the installer setting
    one, this board would boot the unhealthy image for ever. A positive one is the integrator's and stays."""
    rig = make_rig(hub, tmp_path)
    rig.board.boot_env.write({"bootlimit": found})
    task_id = rig.task_for(rig.image("3.0.0", counter=2))
    installed = rig.mers("install", "--task", task_id, "--no-progress")
    assert installed.returncode == 0, installed.stderr
    env = rig.board.boot_env.read()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"], env["bootlimit"]) == (
        "b",
        "1",
        "0",
        armed,
    )

    for trial in range(1, uboot_number(armed) + 1):
        decision = rig.boot().decision
        assert (decision.slot, decision.bootcount) == (SlotName.B, trial)
        refused = rig.mers("confirm", "--health-hook", "false")
        assert refused.returncode == EXIT_NOT_CONFIRMED, refused.stderr
    rolled_back = rig.boot()
    assert rolled_back.decision.slot is SlotName.A and rolled_back.decision.reason.value == "rollback"
    reported = rig.mers("confirm")
    assert reported.returncode == EXIT_NOT_CONFIRMED and "rolled back to slot a" in reported.error_line
    assert rig.task(task_id)["state"] == "FAILED"
    assert rig.board.boot_env.read()["upgrade_available"] == "0"

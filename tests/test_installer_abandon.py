"""`mers abandon`: the operator's way out of an install whose source cannot come back (a USB stick taken
away, a URL expired) or that is not wanted, through the real CLI. Before the switch it ends the journal
and reports the task FAILED, leaving the running firmware and the boot environment as they were; once
the new slot is armed it refuses and changes nothing."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from board.interface import SlotName
from mers.confirm import Confirmer, ConfirmStep
from mers.daemon import Daemon, DaemonSettings
from mers.install import Installer, InstallStep
from mers.journal import JOURNAL_FILE, Phase, journal_owner, load_journal, save_journal
from tests.hub_helpers import FIRMWARE, RunningHub, running_hub
from tests.installer_helpers import (
    TEST_INSTALL,
    PowerCut,
    Rig,
    cut_at,
    install_file_and_confirm,
    interrupted_task_install,
    make_rig,
    slot_files,
)


def untouched_boot(rig: Rig) -> None:
    env = rig.board.boot_env.read()
    assert (env["boot_slot"], env["upgrade_available"]) == ("a", "0")
    assert rig.board.active_slot() is SlotName.A and not rig.board.reboot_requested()


def test_an_install_whose_usb_stick_was_removed_is_abandoned_and_the_next_one_starts(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    stick = tmp_path / "usb"
    stick.mkdir()
    image = stick / "rootfs.signed"
    shutil.copyfile(rig.image("2.0.0", counter=3), image)
    active = slot_files(rig.board, SlotName.A)
    with pytest.raises(PowerCut):
        Installer(rig.board, None, settings=TEST_INSTALL, hook=cut_at(InstallStep.CHECKPOINT)).install_file(
            image
        )
    offset = load_journal(rig.board.state).offset
    assert offset > 0
    shutil.rmtree(stick)  # the stick is gone with the first half of the image
    replacement = rig.image("2.1.0", counter=3)

    assert rig.mers("install", "--file", image, "--no-progress").returncode != 0
    busy = rig.mers("install", "--file", replacement, "--no-progress")
    assert busy.returncode == 6 and "mers abandon" in busy.error_line

    ended = rig.mers("abandon", "--reason", "USB stick removed")
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.strip() == (
        f"abandoned the install of 2.0.0+0 (file {image}, DOWNLOADING at byte {offset})"
    )
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.IDLE and journal.message == "abandoned by the operator: USB stick removed"
    untouched_boot(rig)
    assert slot_files(rig.board, SlotName.A) == active
    assert "abandoned by the operator: USB stick removed" in rig.mers("status").stdout

    install_file_and_confirm(rig, replacement, "2.1.0+0")


def test_an_abandoned_task_is_reported_failed_and_the_daemon_takes_the_next_one(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.VERIFIED)
    assert load_journal(rig.board.state).phase is Phase.VERIFIED

    ended = rig.mers("abandon", "--reason", "release withdrawn")
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.strip() == (
        f"abandoned the install of 2.0.0+0 (task {task_id}, VERIFIED); task {task_id} reported FAILED"
    )
    task = rig.task(task_id)
    assert (task["state"], task["message"]) == ("FAILED", "abandoned by the operator: release withdrawn")
    untouched_boot(rig)
    other = rig.task_for(rig.image("2.1.0", counter=3))
    with rig.client() as client:
        assert Daemon(client, DaemonSettings(install=TEST_INSTALL)).cycle() is True
    assert rig.board.reboot_requested()
    assert (rig.task(other)["state"], rig.task(task_id)["state"]) == ("ACTIVATING", "FAILED")


def test_a_task_already_cancelled_on_the_hub_is_abandoned_without_complaint(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.CHECKPOINT)
    cancelled = hub.request(
        "PATCH",
        f"{FIRMWARE}/installationTasks/{task_id}",
        token=hub.admin_token,
        json={"state": "CANCELED"},
    )
    assert cancelled.status_code == 200, cancelled.text

    ended = rig.mers("abandon")
    assert ended.returncode == 0, ended.stderr
    assert "the hub had already closed it" in ended.stdout and "CANCELED" in ended.stdout
    assert rig.task(task_id)["state"] == "CANCELED"
    assert load_journal(rig.board.state).message == "abandoned by the operator: no reason given"


def test_a_device_that_lost_its_hub_can_still_abandon_and_is_told_the_task_stays_open(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as hub:
        rig = make_rig(hub, tmp_path / "rig")
        task_id = interrupted_task_install(rig, InstallStep.CHECKPOINT)
    # the hub is gone for good

    ended = rig.mers("abandon", "--reason", "site decommissioned")
    assert ended.returncode == 0, ended.stderr
    assert "the hub was not told" in ended.stdout and f"cancel task {task_id} there" in ended.stdout
    assert load_journal(rig.board.state).phase is Phase.IDLE
    untouched_boot(rig)


def switched_then_journalled_verified(rig: Rig) -> str:
    """The environment flipped while the journal still says VERIFIED (as an older mers left it, which
    wrote the environment before journalling SWITCHED)."""
    task_id = interrupted_task_install(rig, InstallStep.SWITCHED)
    journal = load_journal(rig.board.state)
    save_journal(rig.board.state, replace(journal, phase=Phase.VERIFIED))
    return task_id


def on_trial_while_confirming(rig: Rig) -> str:
    """Rebooted into the new slot; `mers confirm` lost power during its health checks."""
    task_id = rig.task_for(rig.image("2.0.0", counter=3))
    with rig.client() as client:
        Installer(rig.board, client, settings=TEST_INSTALL).install_task(task_id)
    rig.boot()

    def cut(step: ConfirmStep) -> None:
        if step is ConfirmStep.CONFIRMING:
            raise PowerCut(step)

    with rig.client() as client, pytest.raises(PowerCut):
        Confirmer(rig.board, client, hook=cut).confirm()
    assert load_journal(rig.board.state).phase is Phase.CONFIRMING
    return task_id


@pytest.mark.parametrize(
    "arm",
    [
        lambda rig: interrupted_task_install(rig, InstallStep.SWITCHED),
        lambda rig: interrupted_task_install(rig, InstallStep.REBOOTING),
        on_trial_while_confirming,
        switched_then_journalled_verified,
    ],
    ids=["switched", "rebooting", "confirming", "verified but the environment flipped"],
)
def test_an_armed_install_is_not_abandoned(
    hub: RunningHub, tmp_path: Path, arm: Callable[[Rig], str]
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = arm(rig)
    journal = rig.board.state.read(JOURNAL_FILE)
    env = rig.board.boot_env.read()
    task_state = rig.task(task_id)["state"]

    refused = rig.mers("abandon")
    assert refused.returncode == 6
    assert "the bootloader and `mers confirm` decide" in refused.error_line
    assert rig.board.state.read(JOURNAL_FILE) == journal
    assert rig.board.boot_env.read() == env and env["boot_slot"] == "b" and env["upgrade_available"] == "1"
    assert rig.task(task_id)["state"] == task_state != "FAILED"


def test_nothing_to_abandon_is_said_and_changes_nothing(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    before = load_journal(rig.board.state)
    ended = rig.mers("abandon")
    assert ended.returncode == 0 and ended.stdout.strip() == "no install in progress: nothing to abandon"
    assert load_journal(rig.board.state) == before


def test_an_install_another_process_is_driving_is_left_alone(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    interrupted_task_install(rig, InstallStep.CHECKPOINT)
    before = load_journal(rig.board.state)
    with journal_owner(rig.board.state):  # the daemon, in the middle of a retry
        refused = rig.mers("abandon")
    assert refused.returncode == 6 and "another mers process" in refused.error_line
    assert load_journal(rig.board.state) == before

"""The installer's recovery at the edges a review found: a crash or a hub error right after the switch, a
task cancelled once the image is verified, a power cut around the environment write followed by a
rollback, and a trial that lost its hub. In each case the board ends booting a good slot, the journal
ends, and nothing is armed twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from board.interface import SlotName
from mers.confirm import Confirmer
from mers.daemon import Daemon, DaemonSettings
from mers.errors import (
    EXIT_STORAGE,
    ImageRejectedError,
    InputError,
    NotConfirmedError,
    SlotStorageError,
    TaskClosedError,
)
from mers.install import Installer, InstallOutcome, InstallStep
from mers.journal import Phase, load_journal, save_journal
from tests.conftest import grow_filesystem, small_filesystem
from tests.hub_helpers import FIRMWARE, RunningHub, running_hub
from tests.installer_helpers import (
    PAYLOAD_SIZE,
    TEST_INSTALL,
    Rig,
    install_file_and_confirm,
    interrupted_task_install,
    make_rig,
    mers_with_file_size_limit,
    slot_files,
    start_mers_with_file_size_limit,
)


def cancel(hub: RunningHub, task_id: str) -> None:
    answer = hub.request(
        "PATCH", f"{FIRMWARE}/installationTasks/{task_id}", token=hub.admin_token, json={"state": "CANCELED"}
    )
    assert answer.status_code == 200, answer.text


def boot_until_rollback(rig: Rig) -> None:
    """Power the board on until the bootloader gives up on the trial (the new image never gets as far as
    `mers confirm`: a kernel panic, a watchdog reset)."""
    for _ in range(10):
        if rig.boot().decision.slot is SlotName.A:
            return
    raise AssertionError("the bootloader never rolled back")


def test_the_daemon_reboots_an_install_that_stopped_between_the_switch_and_the_reboot(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.SWITCHED)
    with rig.client() as client:
        assert rig.board.boot_env.read()["boot_slot"] == "b"
        assert not rig.board.reboot_requested()
        assert Daemon(client, DaemonSettings(install=TEST_INSTALL)).cycle() is True
        assert rig.board.reboot_requested()
    rig.boot()
    with rig.client() as client:
        Confirmer(rig.board, client).confirm()
    assert rig.task(task_id)["state"] == "ACTIVATED"


@pytest.mark.parametrize("when", ["killed at VERIFIED, then cancelled", "cancelled as the last bytes arrive"])
def test_a_task_cancelled_after_verification_ends_the_journal_and_frees_the_installer(
    hub: RunningHub, tmp_path: Path, when: str
) -> None:
    rig = make_rig(hub, tmp_path)
    if when.startswith("killed"):
        task_id = interrupted_task_install(rig, InstallStep.VERIFIED)
    else:
        task_id = rig.task_for(rig.image("2.0.0", counter=3))
    with rig.client() as client:
        if when.startswith("killed"):
            cancel(hub, task_id)
            with pytest.raises(TaskClosedError):
                Daemon(client, DaemonSettings(install=TEST_INSTALL)).cycle()
        else:

            def cancel_now(step: InstallStep) -> None:
                if step is InstallStep.DOWNLOADED:
                    cancel(hub, task_id)

            with pytest.raises(TaskClosedError):
                Installer(rig.board, client, settings=TEST_INSTALL, hook=cancel_now).install_task(task_id)
        journal = load_journal(rig.board.state)
        assert journal.phase is Phase.IDLE and "abandoned" in journal.message
        env = rig.board.boot_env.read()
        assert env["boot_slot"] == "a" and env["upgrade_available"] == "0"
        other = rig.task_for(rig.image("2.1.0", counter=3))
        result = Installer(rig.board, client, settings=TEST_INSTALL).install_task(other)
        assert result.outcome is InstallOutcome.REBOOTING


def test_a_rolled_back_image_is_reported_failed_and_never_armed_again(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.SWITCHED)
    boot_until_rollback(rig)
    with rig.client() as client:
        with pytest.raises(NotConfirmedError, match="rolled back"):
            Confirmer(rig.board, client).confirm()
        assert Installer(rig.board, client, settings=TEST_INSTALL).resume() is None
    env = rig.board.boot_env.read()
    assert env["boot_slot"] == "a" and env["upgrade_available"] == "0"
    assert rig.task(task_id)["state"] == "FAILED"


def test_a_power_cut_between_journalling_the_switch_and_the_env_write_is_reported_not_rearmed(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.RECORDED)
    with rig.client() as client:
        # the state the installer leaves when the power goes after it journalled SWITCHED, before the env
        save_journal(rig.board.state, load_journal(rig.board.state).advanced(Phase.SWITCHED))
        assert Installer(rig.board, client, settings=TEST_INSTALL).resume() is not None
        assert rig.board.boot_env.read()["boot_slot"] == "a", "armed without a verified switch"
        with pytest.raises(NotConfirmedError, match="interrupted before the boot environment was written"):
            Confirmer(rig.board, client).confirm()
    assert load_journal(rig.board.state).phase is Phase.IDLE
    assert rig.task(task_id)["state"] == "FAILED"
    assert rig.boot().decision.slot is SlotName.A


def test_a_trial_that_lost_its_hub_is_refused_by_the_daemon_so_the_bootloader_can_roll_back(
    tmp_path: Path,
) -> None:
    with running_hub(tmp_path / "hub") as hub:
        rig = make_rig(hub, tmp_path / "rig")
        task_id = rig.task_for(rig.image("2.0.0", counter=3))
        with rig.client() as client:
            assert Installer(rig.board, client, settings=TEST_INSTALL).install_task(task_id).outcome is (
                InstallOutcome.REBOOTING
            )
    rig.boot()  # the hub is gone (the new firmware broke the network, say)
    with rig.client() as client, pytest.raises(NotConfirmedError, match="hub is not reachable"):
        Daemon(client, DaemonSettings(install=TEST_INSTALL)).cycle()
    assert rig.board.reboot_requested()
    assert rig.board.boot_env.read()["upgrade_available"] == "1"


def test_a_slot_altered_while_the_device_was_down_is_not_activated(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = interrupted_task_install(rig, InstallStep.VERIFIED)
    with rig.client() as client:
        with (rig.gateway.path / "slot-b.img").open("r+b") as slot:  # someone with the flash in hand
            slot.seek(1000)
            byte = slot.read(1)
            slot.seek(1000)
            slot.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(ImageRejectedError, match="no longer holds the verified image"):
            Installer(rig.board, client, settings=TEST_INSTALL).resume()
    env = rig.board.boot_env.read()
    assert env["boot_slot"] == "a" and env["upgrade_available"] == "0"
    assert load_journal(rig.board.state).phase is Phase.IDLE
    assert rig.task(task_id)["state"] == "FAILED"


def test_a_slot_that_stops_taking_writes_is_one_storage_error_and_the_install_resumes_once_it_does(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A write error of the slot (here EFBIG from the kernel's file-size limit; EIO on worn flash) is
    exit 4 with one line, from `mers install` and from the daemon alike (it used to escape as a traceback
    and crash the daemon), nothing is armed, and the journal still resumes."""
    rig = make_rig(hub, tmp_path)
    image = rig.image("2.0.0", counter=3)
    active, env = slot_files(rig.board, SlotName.A), rig.board.boot_env.read()
    limit = 512 << 10

    failed = mers_with_file_size_limit(rig, limit, "install", "--file", image, "--no-progress")
    assert failed.returncode == EXIT_STORAGE, failed.stderr
    assert "cannot write slot b" in failed.error_line and "File too large" in failed.error_line
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.DOWNLOADING and journal.offset <= limit
    daemon = mers_with_file_size_limit(rig, limit, "run", "--once")
    assert daemon.returncode == EXIT_STORAGE, daemon.stderr
    assert "cannot write slot b" in daemon.error_line
    assert rig.board.boot_env.read() == env and slot_files(rig.board, SlotName.A) == active

    install_file_and_confirm(rig, image, "2.0.0+0")  # resumed


def test_a_slot_whose_filesystem_lacks_room_for_the_image_is_refused_before_a_byte_is_written(
    hub: RunningHub, tmp_path: Path
) -> None:
    """Slot b is a sparse file on a filesystem with room for half the payload: the install stops with one
    `SlotStorageError` before writing any of it (not with ENOSPC halfway), nothing is armed, and once the
    filesystem has room the same install goes through."""
    rig = make_rig(hub, tmp_path)
    image = rig.image("2.0.0", counter=3)
    active, env = slot_files(rig.board, SlotName.A), rig.board.boot_env.read()
    slot_b = rig.board.config.slot(SlotName.B).device
    with small_filesystem(tmp_path / "small", PAYLOAD_SIZE // 2) as small:
        moved = small / slot_b.name
        with moved.open("wb") as sparse:
            sparse.truncate(slot_b.stat().st_size)
        slot_b.unlink()
        slot_b.symlink_to(moved)

        with pytest.raises(SlotStorageError, match=r"slot b is a file on a filesystem with \d+ bytes free"):
            Installer(rig.board, None, settings=TEST_INSTALL).install_file(image)
        assert moved.stat().st_blocks == 0, "not a byte of the payload was written"
        assert rig.board.boot_env.read() == env and slot_files(rig.board, SlotName.A) == active
        journal = load_journal(rig.board.state)
        assert journal.phase is Phase.DOWNLOADING and journal.offset == 0

        grow_filesystem(small, 2 * PAYLOAD_SIZE)
        result = Installer(rig.board, None, settings=TEST_INSTALL).install_file(image)
        assert result.outcome is InstallOutcome.REBOOTING


def test_the_daemon_retries_a_failing_slot_with_its_backoff_instead_of_exiting(
    hub: RunningHub, tmp_path: Path
) -> None:
    """Left running, the daemon logs each failed attempt on one line and waits longer each time (here 2 s,
    then 4 s: a 1 s poll interval doubled); it does not exit into systemd's restart loop. SIGTERM still
    stops it cleanly, and the install resumes once the slot takes writes again."""
    rig = make_rig(hub, tmp_path)
    image = rig.image("2.0.0", counter=3)
    limit = 512 << 10
    failed = mers_with_file_size_limit(rig, limit, "install", "--file", image, "--no-progress")
    assert failed.returncode == EXIT_STORAGE, failed.stderr
    daemon = start_mers_with_file_size_limit(rig, limit, "run", "-v", "--poll-interval", "1")
    try:
        assert daemon.stderr is not None
        attempts: list[float] = []
        deadline = time.monotonic() + 120
        while len(attempts) < 2:
            assert time.monotonic() < deadline, "the daemon did not retry the slot"
            line = daemon.stderr.readline()
            assert line, f"the daemon exited with {daemon.wait(timeout=30)}"
            if "cannot write slot b" in line:
                assert "retrying later" in line and "Traceback" not in line, line
                attempts.append(time.monotonic())
        assert 1.5 <= attempts[1] - attempts[0] <= 60, "the retry waits out the backoff"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:  # a failed assertion above: the daemon, which now retries, must not stay
            daemon.kill()
            daemon.wait()
    assert load_journal(rig.board.state).phase is Phase.DOWNLOADING

    install_file_and_confirm(rig, image, "2.0.0+0")


def test_an_image_file_that_fails_to_read_mid_install_is_an_input_error_and_the_install_resumes(
    hub: RunningHub, tmp_path: Path
) -> None:
    """The stick fails under the installer: from the first checkpoint on, the descriptor it reads the
    image through is a directory's, so every read fails in the kernel (EISDIR, as EIO would from a pulled
    stick). That is the operator's input failing: `InputError`, the journal kept at a durable offset."""
    rig = make_rig(hub, tmp_path)
    image = rig.image("2.0.0", counter=3)
    env = rig.board.boot_env.read()
    directory = tmp_path / "not-an-image"
    directory.mkdir()
    failed: list[int] = []

    def stick_fails(step: InstallStep) -> None:
        if step is InstallStep.CHECKPOINT and not failed:
            descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
            held = [fd for fd in descriptors if _target(fd) == str(image)]
            assert len(held) == 1, held
            replacement = os.open(directory, os.O_RDONLY)
            os.dup2(replacement, held[0])
            os.close(replacement)
            failed.append(held[0])

    with pytest.raises(InputError, match=r"cannot read the image .* at byte"):
        Installer(rig.board, None, settings=TEST_INSTALL, hook=stick_fails).install_file(image)
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.DOWNLOADING and journal.offset > 0
    assert rig.board.boot_env.read() == env

    result = Installer(rig.board, None, settings=TEST_INSTALL).install_file(image)
    assert result.outcome is InstallOutcome.REBOOTING


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir itself used, closed since
        return ""

"""The other ways in: an image file (USB stick) and a signed URL given by the operator, through the real
CLIs; and a task the operator cancels in the middle of its download."""

from __future__ import annotations

from pathlib import Path

import pytest

from board.interface import SlotName
from board.storage import StateDirectory
from mers.errors import InstallBusyError, TaskClosedError
from mers.install import Installer, InstallOutcome, InstallStep
from mers.journal import Phase, journal_owner, load_journal
from tests.board_helpers import record_fsyncs
from tests.hub_helpers import FIRMWARE, RunningHub
from tests.installer_helpers import (
    TEST_INSTALL,
    PowerCut,
    Rig,
    cut_at,
    make_rig,
    mers_peak_rss_kib,
    slot_files,
)


def test_image_file_from_a_usb_stick_is_installed_booted_and_confirmed(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    image = rig.image("4.0.0", counter=6)

    installed = rig.mers("install", "--file", image)
    assert installed.returncode == 0, installed.stderr
    assert "downloading" in installed.stderr, "a progress bar"
    rig.boot()
    confirmed = rig.mers("confirm")
    assert confirmed.returncode == 0, confirmed.stderr
    board = rig.board
    assert board.active_slot() is SlotName.B and board.security_counter_floor() == 6
    text = rig.mers("status").stdout
    assert "slot b: 4.0.0+0" in text and "security counter floor: 6" in text and "phase=IDLE" in text


def test_signed_url_from_the_operator_is_installed_and_never_printed(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("4.1.0", counter=2))
    url = rig.task(task_id)["artifacts"][0]["uri"]

    installed = rig.mers("install", "--url", url, "--no-progress")
    assert installed.returncode == 0, installed.stderr
    signature = url.rpartition("sig=")[2]
    assert signature not in installed.stdout + installed.stderr
    status = rig.mers("status", "--json")
    assert signature not in status.stdout and '"source": "url"' in status.stdout
    rig.boot()
    assert rig.mers("confirm").returncode == 0
    assert rig.board.slot(SlotName.B).record().version == "4.1.0+0"  # type: ignore[union-attr]
    assert rig.task(task_id)["state"] == "CREATED", "an operator's URL reports no task"

    tampered = url[: url.index("sig=") + 4] + "0" * 64
    refused = rig.mers("install", "--url", tampered, "--no-progress")
    assert refused.returncode == 6 and "403" in refused.error_line and "0" * 64 not in refused.stderr


def test_a_url_of_another_image_is_refused_while_a_url_install_is_under_way(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A new URL resumes an interrupted URL install only if it names the same image: the URL of another
    image is another install, refused while this one is under way, and the download keeps its journal."""
    rig = make_rig(hub, tmp_path, onboard=False)
    first_task = rig.task_for(rig.image("4.2.0", counter=2))
    first = rig.task(first_task)["artifacts"][0]["uri"]
    closed = hub.admin("PATCH", f"{FIRMWARE}/installationTasks/{first_task}", json={"state": "CANCELED"})
    assert closed.status_code == 200, "the hub takes one open task an agent: the URL stays signed"
    other = rig.task(rig.task_for(rig.image("4.3.0", counter=2)))["artifacts"][0]["uri"]
    with pytest.raises(PowerCut):
        Installer(rig.board, None, settings=TEST_INSTALL, hook=cut_at(InstallStep.CHECKPOINT)).install_url(
            first
        )
    interrupted = load_journal(rig.board.state)
    assert interrupted.phase is Phase.DOWNLOADING and interrupted.offset > 0

    with pytest.raises(InstallBusyError, match="another install is in progress"):
        Installer(rig.board, None, settings=TEST_INSTALL).install_url(other)
    assert load_journal(rig.board.state) == interrupted, "the install under way keeps its journal"
    result = Installer(rig.board, None, settings=TEST_INSTALL).install_url(first)
    assert result.outcome is InstallOutcome.REBOOTING and result.journal.version == "4.2.0+0"


def test_task_cancelled_mid_download_is_abandoned_and_nothing_is_switched(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("5.0.0", counter=2))
    active = slot_files(rig.board, SlotName.A)
    env = rig.board.boot_env.read()

    def cancel(step: InstallStep) -> None:
        if step is InstallStep.CHECKPOINT:
            response = hub.admin(
                "PATCH", f"{FIRMWARE}/installationTasks/{task_id}", json={"state": "CANCELED"}
            )
            assert response.status_code in (200, 409), response.text

    with rig.client() as client:
        installer = Installer(rig.board, client, settings=TEST_INSTALL, hook=cancel)
        try:
            installer.install_task(task_id)
        except TaskClosedError as error:
            assert "CANCELED" in str(error)
        else:
            raise AssertionError("a cancelled task must stop the install")
    board = rig.board
    journal = load_journal(board.state)
    assert journal.phase is Phase.IDLE and "abandoned" in journal.message
    assert slot_files(board, SlotName.A) == active and board.boot_env.read() == env
    assert rig.boot().decision.slot is SlotName.A


def signed_url_only(rig: Rig, image: Path) -> str:
    """A signed URL of `image`, through a task cancelled at once (a device has one open task at a time,
    and the URL stays valid whatever becomes of its task)."""
    task_id = rig.task_for(image)
    uri: str = rig.task(task_id)["artifacts"][0]["uri"]
    response = rig.hub.admin("PATCH", f"{FIRMWARE}/installationTasks/{task_id}", json={"state": "CANCELED"})
    assert response.status_code == 200, response.text
    return uri


def test_memory_does_not_grow_with_the_image(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path, slot_size=80 << 20)
    small = signed_url_only(rig, rig.image("6.0.0", counter=2, size=2 << 20))
    large = signed_url_only(rig, rig.image("6.1.0", counter=2, size=64 << 20))

    small_kib = mers_peak_rss_kib(rig, "install", "--url", small, "--no-progress")
    rig.boot()
    assert rig.mers("confirm").returncode == 0
    large_kib = mers_peak_rss_kib(rig, "install", "--url", large, "--no-progress")

    assert rig.boot().decision.slot is SlotName.A
    assert large_kib - small_kib < 8 * 1024, (small_kib, large_kib)


def test_a_second_process_never_drives_the_same_journal(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("7.0.0", counter=2))
    with journal_owner(rig.board.state):  # as the daemon holds it during a download
        busy = rig.mers("install", "--task", task_id, "--no-progress")
        confirm = rig.mers("confirm")
    assert busy.returncode == 6 and "another mers process" in busy.error_line
    assert confirm.returncode == 6 and "another mers process" in confirm.error_line
    assert rig.task(task_id)["state"] == "CREATED"
    assert rig.mers("install", "--task", task_id, "--no-progress").returncode == 0, "free again"


def test_the_state_directory_the_journal_lock_creates_survives_a_power_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = record_fsyncs(monkeypatch)
    with journal_owner(StateDirectory(tmp_path / "var" / "state")):
        pass
    root = tmp_path.resolve()
    assert root in synced and root / "var" in synced, "each new directory's entry in its parent"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://[::1/rootfs.signed?sig=5ec4e7", "not a URL"),
        ("https://127.0.0.1:99x/rootfs.signed?sig=5ec4e7", "not a URL"),
        ("https://127.0.0.1:70000/rootfs.signed?sig=5ec4e7", "not a URL"),
        ("https:///rootfs.signed?sig=5ec4e7", "names no host"),
        ("http://127.0.0.1/rootfs.signed?sig=5ec4e7", "must be https"),
    ],
    ids=["unclosed bracket", "port not a number", "port out of range", "no host", "not https"],
)
def test_an_image_url_that_cannot_be_used_is_bad_input_at_once_and_changes_nothing(
    hub: RunningHub, tmp_path: Path, url: str, says: str
) -> None:
    rig = make_rig(hub, tmp_path)
    before = (slot_files(rig.board, SlotName.B), rig.board.boot_env.read())
    refused = rig.mers("install", "--url", url, "--no-progress")
    # exit 2, not the 5 of a download whose retries ran out: no network can cure a URL, none was tried
    assert refused.returncode == 2, refused.stderr
    assert says in refused.error_line and "5ec4e7" not in refused.stderr
    assert (slot_files(rig.board, SlotName.B), rig.board.boot_env.read()) == before
    assert load_journal(rig.board.state).phase is Phase.IDLE

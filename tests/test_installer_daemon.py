"""`mers run`, the daemon, as a real process: it installs an open task and reboots, confirms after the
boot, and stops cleanly on SIGTERM; a stop in the middle of a download leaves a journal that resumes
where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from board.interface import SlotName
from mers.credentials import load_credentials
from mers.daemon import Daemon, DaemonSettings, backoff_delay
from mers.errors import EXIT_REFUSED
from mers.install import Installer, InstallOutcome, InstallStep
from mers.journal import Phase, load_journal
from tests.conftest import BIN_DIR, run_cli
from tests.device_helpers import DAY, bundle_file, make_gateway
from tests.hub_helpers import RunningHub, create_agent
from tests.installer_helpers import PAYLOAD_SIZE, TEST_INSTALL, Rig, make_rig


def test_daemon_installs_an_open_task_then_confirms_it_after_the_boot(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("2.0.0", counter=3))

    first = rig.mers("run", "--once", "-v")
    assert first.returncode == 0, first.stderr
    assert "installing task" in first.stderr and "https://" not in first.stderr
    assert rig.board.reboot_requested()
    rig.boot()
    second = rig.mers("run", "--once", "-v")
    assert second.returncode == 0, second.stderr
    assert rig.task(task_id)["state"] == "ACTIVATED"
    assert rig.board.active_slot() is SlotName.B and rig.board.security_counter_floor() == 3


def test_daemon_stops_cleanly_on_sigterm(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    process = subprocess.Popen(
        [str(BIN_DIR / "mers"), "run", "-v", "--poll-interval", "3600", "--board", str(rig.gateway.path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    line = ""
    while "no open installation task" not in line:
        assert time.monotonic() < deadline and process.poll() is None, "the daemon did not poll"
        line = process.stderr.readline()
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - started < 10, "SIGTERM ends the wait at once"


def test_the_poll_interval_comes_from_the_environment_the_unit_reads(hub: RunningHub, tmp_path: Path) -> None:
    """`mers.service` passes no options: MERS_POLL_INTERVAL in /etc/mers/mers.env sets how soon a task
    created after a poll is found."""
    rig = make_rig(hub, tmp_path)
    process = subprocess.Popen(
        [str(BIN_DIR / "mers"), "run", "-v", "--board", str(rig.gateway.path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MERS_POLL_INTERVAL": "1"},
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "no open installation task" not in line:
            assert time.monotonic() < deadline and process.poll() is None, "the daemon did not poll"
            line = process.stderr.readline()
        rig.task_for(rig.image("2.0.0", counter=2))
        while "installing task" not in line:  # 300 s away with the default interval
            assert time.monotonic() < deadline and process.poll() is None, "the task was not found"
            line = process.stderr.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    refused = run_cli("mers", "run", "--once", env={"MERS_POLL_INTERVAL": "0"})
    assert refused.returncode == 2 and "--poll-interval" in refused.stderr, refused.stderr


def test_stop_request_mid_download_journals_the_offset_and_resume_finishes(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("2.0.0", counter=2))
    steps: list[InstallStep] = []

    with rig.client() as client:
        stopped = Installer(
            rig.board, client, settings=TEST_INSTALL, hook=steps.append, should_stop=lambda: bool(steps[2:])
        ).install_task(task_id)
        assert stopped.outcome is InstallOutcome.STOPPED
        journal = load_journal(rig.board.state)
        assert journal.phase is Phase.DOWNLOADING and 0 < journal.offset < PAYLOAD_SIZE
        assert journal.offset == stopped.journal.offset
        assert rig.task(task_id)["state"] == "DOWNLOADING"

        resumed = Installer(rig.board, client, settings=TEST_INSTALL).resume()
    assert resumed is not None and resumed.outcome is InstallOutcome.REBOOTING
    assert resumed.stats.received == PAYLOAD_SIZE - journal.offset, "resumed at the journalled offset"
    assert rig.boot().decision.slot is SlotName.B


def test_a_device_never_onboarded_commits_a_healthy_trial_from_a_file_instead_of_blaming_the_hub(
    hub: RunningHub, tmp_path: Path
) -> None:
    """Installed from a USB stick before onboarding, the device has no credentials to reach the hub
    with: that is no failed health check (as `mers confirm` already knew), so the daemon commits."""
    rig = make_rig(hub, tmp_path, onboard=False)
    assert Installer(rig.board, None, settings=TEST_INSTALL).install_file(rig.image("2.0.0", counter=3))
    rig.boot()
    with rig.client() as client:
        assert Daemon(client, DaemonSettings(install=TEST_INSTALL)).cycle() is False
    board = rig.board
    assert board.boot_env.read()["upgrade_available"] == "0" and not board.reboot_requested()
    assert board.active_slot() is SlotName.B and board.security_counter_floor() == 3
    assert load_journal(board.state).message.startswith("ACTIVATED")
    assert load_credentials(board.state) is not None, "then it onboarded, in the same pass"


def refused_bundle(rig: Rig, tmp_path: Path, reason: str) -> Path:
    """An import bundle whose IAT the hub refuses for good: used by another board, or expired."""
    if reason == "used":
        other = make_gateway(rig.hub, tmp_path / "other")
        with other.client() as client:
            client.onboard()
        return bundle_file(tmp_path / "used.json", rig.hub, other.agent_id)
    bundle = bundle_file(tmp_path / "late.json", rig.hub, create_agent(rig.hub, "gw-late")["id"])
    rig.hub.clock.advance(8 * DAY)  # the IAT lives 7 days; the gateway's RAT still renews its credentials
    return bundle


@pytest.mark.parametrize("reason", ["used", "expired"])
def test_a_pending_import_refused_for_good_is_set_aside_and_the_daemon_goes_on_with_its_credentials(
    hub: RunningHub, tmp_path: Path, reason: str
) -> None:
    """systemd does not restart a daemon that exits 6: a stale USB stick must not take down a gateway
    whose credentials still work. The import is tried (and refused) once, then left alone."""
    rig = make_rig(hub, tmp_path)
    before = load_credentials(rig.board.state)
    imported = rig.mers("boarding", "import", refused_bundle(rig, tmp_path, reason))
    assert imported.returncode == EXIT_REFUSED, imported.stderr

    first = rig.mers("run", "--once", "-v")
    assert first.returncode == 0, first.stderr
    assert "set aside" in first.stderr and "no open installation task" in first.stderr
    second = rig.mers("run", "--once", "-v")
    assert second.returncode == 0, second.stderr
    assert "IAT" not in second.stderr and "no open installation task" in second.stderr
    after = load_credentials(rig.board.state)
    assert before is not None and after is not None and after.iat_id == before.iat_id
    status = json.loads(rig.mers("status", "--json").stdout)
    assert status["state"] == "onboarded-new-boarding-refused"


def test_a_refused_import_still_stops_a_daemon_that_has_no_credentials(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path, onboard=False)
    imported = rig.mers("boarding", "import", refused_bundle(rig, tmp_path, "used"), "--no-onboard")
    assert imported.returncode == 0, imported.stderr
    run = rig.mers("run", "--once")
    assert run.returncode == EXIT_REFUSED and "IAT works once" in run.error_line
    assert load_credentials(rig.board.state) is None


@pytest.mark.parametrize("failures", [0, 1, 3, 4, 1023, 1024, 5000, 10**9])
def test_the_backoff_stays_within_its_cap_however_long_the_hub_is_gone(failures: int) -> None:
    """1024 failures in a row is 42 days without the hub at a 1 h cap: the delay must still be one."""
    settings = DaemonSettings(poll_interval=300.0, backoff_max=3600.0)
    expected = min(300.0 * 2 ** min(failures, 4), 3600.0)
    delay = backoff_delay(settings, failures)
    assert 0.8 * expected <= delay <= 1.2 * expected

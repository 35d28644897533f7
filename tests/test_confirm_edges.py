"""`mers confirm` and `mers status` at their edges: health hooks that misbehave, a hub that answers but
refuses, report texts the hub would refuse, damaged state. Each of these once left a healthy trial rolled
back, a journal no command could end, or a status that printed nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from board.interface import SlotName
from hub import tasks as hub_tasks
from mers import health_hook
from mers.confirm import Confirmer, ConfirmOutcome
from mers.errors import CorruptStateError, HealthCheckStoppedError, HubRefusedError, NotConfirmedError
from mers.health_hook import run_health_hook
from mers.install import Installer, InstallOutcome
from mers.journal import JOURNAL_FILE, Phase, load_journal
from mers.tasks import MAX_MESSAGE, reportable
from tests.conftest import BIN_DIR
from tests.device_helpers import bundle_file
from tests.hub_helpers import RunningHub, create_agent, join_stopping_hubs
from tests.installer_helpers import TEST_INSTALL, Rig, make_rig, mers_peak_rss_kib


def armed_task(rig: Rig) -> str:
    """A task's release installed, and the board booted into it for its trial; the task id."""
    task_id = rig.task_for(rig.image("2.0.0", counter=3))
    with rig.client() as client:
        assert Installer(rig.board, client, settings=TEST_INSTALL).install_task(task_id).outcome is (
            InstallOutcome.REBOOTING
        )
    rig.boot()
    assert rig.board.active_slot() is SlotName.B
    return task_id


def hook_script(directory: Path, body: str) -> Path:
    path = directory / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# --- the health hook ---------------------------------------------------------------------------------


def test_a_hook_that_leaves_a_process_behind_is_judged_by_its_own_exit(
    hub: RunningHub, tmp_path: Path
) -> None:
    """The background process holds the hook's stdout and stderr open for 30 s: `confirm` does not wait
    for it (it used to wait out the timeout and refuse the trial)."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    hook = hook_script(tmp_path, "( sleep 30 ) &\nexit 0\n")
    started = time.monotonic()
    with rig.client() as client:
        result = Confirmer(rig.board, client, health_command=str(hook), health_timeout=20).confirm()
    assert result.outcome is ConfirmOutcome.ACTIVATED
    assert time.monotonic() - started < 10
    assert rig.task(task_id)["state"] == "ACTIVATED"


@pytest.mark.parametrize(
    "child",
    [
        "sleep 60",
        # `timeout 60 check`, a common hook, puts `check` in a process group of its own: killing the
        # hook's group missed it
        "timeout 60 sleep 60",
    ],
)
def test_a_hook_past_its_timeout_is_killed_with_what_it_started(
    hub: RunningHub, tmp_path: Path, child: str
) -> None:
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    pid_file = tmp_path / "child.pid"
    hook = hook_script(tmp_path, f"{child} &\necho $! > {pid_file}\nwait\n")
    with rig.client() as client, pytest.raises(NotConfirmedError, match="did not finish in 2 s"):
        Confirmer(rig.board, client, health_command=str(hook), health_timeout=2).confirm()
    started = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(started):
        assert time.monotonic() < deadline, "the hook's child outlived the hook's timeout"
        time.sleep(0.05)
    assert rig.board.reboot_requested() and rig.board.boot_env.read()["upgrade_available"] == "1"


def test_a_hook_that_sigkill_cannot_end_at_once_does_not_hold_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook stuck in uninterruptible I/O (a dead NFS server) dies of SIGKILL only when the I/O ends:
    the kill is made to miss here, the one way to keep a process alive through it on any machine."""
    monkeypatch.setattr(health_hook, "_kill_session", lambda session: None)
    monkeypatch.setattr(health_hook, "_REAP_S", 0.5)
    pid_file = tmp_path / "hook.pid"
    hook = hook_script(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60\n")
    started = time.monotonic()
    try:
        assert run_health_hook([str(hook)], 1) == f"health hook {hook} did not finish in 1 s"
        assert time.monotonic() - started < 5
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_reason_of_a_hook_whose_last_line_outgrows_the_tail_starts_on_a_whole_character(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    # 3000 two-byte characters, then one byte: the last 4096 bytes start in the middle of a character
    hook = hook_script(
        tmp_path,
        "printf 'first line\\n' >&2\nprintf 'x%.0s' $(seq 3001) >&2\n"
        "i=0; while [ $i -lt 3000 ]; do printf '\\303\\251' >&2; i=$((i+1)); done\n"
        "printf '!' >&2\nexit 3\n",
    )
    with rig.client() as client, pytest.raises(NotConfirmedError) as refused:
        Confirmer(rig.board, client, health_command=str(hook), health_timeout=20).confirm()
    assert "health hook exited with 3: " + "é" * 200 in str(refused.value)


def test_a_stop_during_the_health_check_gives_no_verdict(hub: RunningHub, tmp_path: Path) -> None:
    """The daemon is asked to stop while the hook runs: the hook's session is killed and nothing is
    decided (no failure recorded or reported, no reboot, no boot of the bootlimit spent)."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    hook = hook_script(tmp_path, "sleep 30\n")
    asked = time.monotonic() + 0.5
    with rig.client() as client, pytest.raises(HealthCheckStoppedError, match="no verdict"):
        Confirmer(
            rig.board, client, health_command=str(hook), should_stop=lambda: time.monotonic() > asked
        ).confirm()
    assert time.monotonic() - asked < 5
    assert_no_verdict(rig, task_id)


def test_a_hook_killed_by_a_stop_signal_gives_no_verdict(hub: RunningHub, tmp_path: Path) -> None:
    """systemd stops a service by signalling every process in it: the hook dies of the SIGTERM meant for
    the whole service, which says nothing about the firmware."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    hook = hook_script(tmp_path, "echo 'going down' >&2\nkill -TERM $$\nsleep 30\n")
    with rig.client() as client, pytest.raises(HealthCheckStoppedError, match="signal 15"):
        Confirmer(rig.board, client, health_command=str(hook)).confirm()
    assert_no_verdict(rig, task_id)


def assert_no_verdict(rig: Rig, task_id: str) -> None:
    assert not rig.board.reboot_requested()
    assert rig.board.boot_env.read()["upgrade_available"] == "1"
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.CONFIRMING and not journal.message
    assert rig.task(task_id)["state"] == "ACTIVATING"


def test_sigterm_to_the_daemon_during_the_health_check_stops_it_without_a_verdict(
    hub: RunningHub, tmp_path: Path
) -> None:
    """As systemd stops `mers.service`: SIGTERM to the daemon, then to the hook it runs."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    started = tmp_path / "hook-started"
    hook = hook_script(tmp_path, f"touch {started}\nsleep 30\n")
    daemon = subprocess.Popen(
        [str(BIN_DIR / "mers"), "run", "--health-hook", str(hook), "--board", str(rig.gateway.path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline and daemon.poll() is None, "the hook did not start"
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert_no_verdict(rig, task_id)
    with rig.client() as client:
        assert Confirmer(rig.board, client).confirm().outcome is ConfirmOutcome.ACTIVATED  # asked again


def test_hooks_that_leave_a_writer_behind_leave_no_thread_or_descriptor(tmp_path: Path) -> None:
    """Each check stops reading the hook's stderr once it has judged: a background process the hook left
    writing there held a thread and a descriptor of the daemon for as long as it lived."""
    hook = hook_script(tmp_path, "( while :; do echo tick >&2; sleep 0.1; done ) &\nexit 1\n")
    join_stopping_hubs()
    threads_before, descriptors_before = set(threading.enumerate()), _open_descriptors()
    try:
        for _ in range(5):
            assert run_health_hook([str(hook)], 20) == "health hook exited with 1: tick"
        # Compared as sets of what is new, not as counts: a thread or descriptor of an earlier test in this
        # worker may end during the checks, and a count would then hide a leak or report one that is not.
        assert set(threading.enumerate()) - threads_before == set()
        assert _open_descriptors() - descriptors_before == set()
    finally:
        subprocess.run(["pkill", "-f", str(hook)], check=False)


def _open_descriptors() -> set[tuple[str, str]]:
    """Each open descriptor with what it points at: a leaked pipe shows as a new pipe even where it took the
    number of a descriptor that closed meanwhile."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, waiting for init to reap it


def test_a_hook_that_prints_hundreds_of_megabytes_costs_no_memory(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    hook = hook_script(tmp_path, "head -c 300000000 /dev/zero\nhead -c 300000000 /dev/zero >&2\nexit 0\n")
    peak_kib = mers_peak_rss_kib(rig, "confirm", "--health-hook", str(hook))
    assert peak_kib < 150_000, f"{peak_kib} KiB"  # the interpreter and its imports; it held 800 MB before
    assert load_journal(rig.board.state).phase is Phase.IDLE  # committed


def test_a_hook_command_that_cannot_be_parsed_refuses_the_trial(hub: RunningHub, tmp_path: Path) -> None:
    """An unbalanced quote: nothing vouches for the new firmware, so the trial is refused (the bootloader
    rolls back after bootlimit) instead of a traceback that left it neither committed nor refused."""
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    refused = rig.mers("confirm", "--health-hook", "/bin/true it's")
    assert refused.returncode == 8, refused.stderr
    assert "cannot be split into words" in refused.error_line
    assert rig.board.reboot_requested() and rig.board.boot_env.read()["upgrade_available"] == "1"


# --- reports the hub refuses -----------------------------------------------------------------------------


def test_a_nul_in_the_hooks_error_still_reaches_the_hub_and_the_rollback_ends(
    hub: RunningHub, tmp_path: Path
) -> None:
    """The failing hook's last stderr line, a NUL in it, is the reason the rollback reports: the hub
    refuses NUL, which used to keep the journal CONFIRMING for good."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    hook = hook_script(tmp_path, "printf 'sensor\\000fault\\n' >&2\nexit 1\n")
    for _ in range(5):
        if rig.board.active_slot() is SlotName.A:
            break
        assert rig.mers("confirm", "--health-hook", hook).returncode == 8
        rig.boot()
    assert rig.board.active_slot() is SlotName.A, "the bootloader rolled back"
    reported = rig.mers("confirm")
    assert reported.returncode == 8, reported.stderr
    assert load_journal(rig.board.state).phase is Phase.IDLE
    task = rig.task(task_id)
    assert task["state"] == "FAILED" and "sensor\\x00fault" in task["message"]


def test_a_trial_of_a_task_the_hub_no_longer_knows_is_committed_and_the_journal_ends(
    hub: RunningHub, tmp_path: Path
) -> None:
    """The device was onboarded again as another agent during its trial: the hub answers 404 for the old
    task. It answers, so it is reachable (the healthy trial used to be rolled back as "hub unreachable"),
    and the ACTIVATED report it refuses for good is logged, not retried for ever."""
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    second = create_agent(hub, "gw-second")
    imported = rig.mers("boarding", "import", bundle_file(tmp_path / "bundle.json", hub, second["id"]))
    assert imported.returncode == 0, imported.stderr
    confirmed = rig.mers("confirm")
    assert confirmed.returncode == 0, confirmed.stderr
    assert rig.board.boot_env.read()["upgrade_available"] == "0"
    assert load_journal(rig.board.state).phase is Phase.IDLE
    assert rig.board.security_counter_floor() == 3


def test_a_report_that_loses_a_race_on_the_hub_is_retried_not_given_up(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub answers 409 "try again" to a report that keeps losing its race with other writers. That
    is no final refusal: the journal stays for the next confirm (ending it left the task open, and the
    daemon installed the same release again over the fallback slot)."""
    rig = make_rig(hub, tmp_path)
    task_id = armed_task(rig)
    monkeypatch.setattr(hub_tasks, "_store_change", lambda *_arguments, **_options: False)
    with rig.client() as client, pytest.raises(HubRefusedError) as refused:
        Confirmer(rig.board, client).confirm()
    assert refused.value.status == 409
    assert load_journal(rig.board.state).phase is Phase.CONFIRMING
    monkeypatch.undo()
    with rig.client() as client:
        assert Confirmer(rig.board, client).confirm().outcome is ConfirmOutcome.ACTIVATED
    assert rig.task(task_id)["state"] == "ACTIVATED"
    assert load_journal(rig.board.state).phase is Phase.IDLE


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        ("plain text, ünïcode", "plain text, ünïcode"),
        ("nul\x00here", "nul\\x00here"),
        ("two\nlines", "two\\nlines"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("x" * (MAX_MESSAGE + 10), "x" * (MAX_MESSAGE - 1) + "…"),
        ("typed \\n, real \n", "typed \\\\n, real \\n"),
        ("x" * (MAX_MESSAGE - 3) + "\x00tail", "x" * (MAX_MESSAGE - 3) + "…"),
    ],
)
def test_a_report_text_is_made_one_the_hub_stores(message: str, sent: str) -> None:
    assert reportable(message) == sent
    assert len(reportable(message)) <= MAX_MESSAGE


# --- damaged state and `mers status` ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"null\n", b'"x"\n', b"42\n", b"[]\n"])
def test_a_journal_that_is_not_an_object_is_reported_damaged(
    hub: RunningHub, tmp_path: Path, content: bytes
) -> None:
    rig = make_rig(hub, tmp_path, onboard=False)
    (rig.board.state.directory / JOURNAL_FILE).write_bytes(content)
    with pytest.raises(CorruptStateError, match="is damaged"):
        load_journal(rig.board.state)


def test_status_shows_a_damaged_journal_in_its_place_and_everything_else(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    armed_task(rig)
    path = rig.board.state.directory / JOURNAL_FILE
    body = json.loads(path.read_text())
    path.write_text(json.dumps(body).replace(f'"image_size": {body["image_size"]}', '"image_size": Infinity'))
    shown = rig.mers("status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert "is damaged" in status["firmware"]["install"]["error"]
    assert status["state"] == "onboarded" and status["firmware"]["boot_env"]["boot_slot"] == "b"


def test_status_shows_a_missing_slot_device_on_that_slots_line(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    rig.board.config.slot(SlotName.B).device.unlink()
    shown = rig.mers("status")
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("slot b:"))
    assert "size unknown" in line and "slot-b" in line
    assert any(line.startswith("slot a: 1.0.0") for line in shown.stdout.splitlines())


def test_status_shows_damaged_credentials_instead_of_failing(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    credentials = next(path for path in rig.board.state.directory.iterdir() if "credentials" in path.name)
    credentials.write_bytes(b"{damaged")
    os.sync()
    shown = rig.mers("status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "credentials-unreadable" and status["credentials_problem"]

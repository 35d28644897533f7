"""`mers`: the device's command line, a thin layer over `mers.client`.

Every command finds its board through `--board PATH` or `MERS_BOARD` (a simulated board directory or a
gateway TOML file; default /etc/mers/board.toml). Errors are one line on stderr and an exit code:
2 bad input, 3 not onboarded / no boarding data, 4 board or state storage, 5 hub unreachable (retry
later), 6 refused by the hub or by the install's state (the operator must act), 7 image rejected
(signature, hash, hardware, downgrade, size), 8 the new firmware was not confirmed (health check failed,
or rolled back). No secret is ever printed, and no image URL (a signed URL is a credential).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from board.errors import BoardError

from .abandon import abandon_install
from .boarding import BoardingSource, parse_boarding, read_import_file, store_imported
from .client import ClientSettings, DeviceClient, OnboardOutcome
from .confirm import HEALTH_TIMEOUT, Confirmer
from .credentials import load_credentials
from .daemon import Daemon, DaemonSettings
from .download import DownloadSettings
from .errors import EXIT_STORAGE, MersError
from .http import HttpSettings
from .install import Installer, InstallOutcome, InstallSettings, describe_install
from .install_status import firmware_status
from .journal import Phase
from .status import device_status
from .tasks import TaskClient, TaskState

DEFAULT_BOARD = Path("/etc/mers/board.toml")
F = TypeVar("F", bound=Callable[..., Any])


def board_options(command: F) -> F:
    """`--board`, `--timeout`, `--retries`: shared by every command."""
    command = click.option(
        "--retries",
        type=click.IntRange(0, 20),
        default=4,
        show_default=True,
        help="Retries on network errors and 5xx (exponential backoff with jitter).",
    )(command)
    command = click.option(
        "--timeout",
        type=click.FloatRange(0.1, 600),
        default=30.0,
        show_default=True,
        help="Seconds to wait for the hub to connect or answer.",
    )(command)
    return click.option(
        "--board",
        "board_path",
        type=click.Path(path_type=Path),
        envvar="MERS_BOARD",
        default=DEFAULT_BOARD,
        show_default=True,
        help="Simulated board directory or gateway TOML file (env MERS_BOARD).",
    )(command)


@contextmanager
def reported_errors() -> Iterator[None]:
    try:
        yield
    except MersError as error:
        click.echo(f"mers: error: {error}", err=True)
        sys.exit(error.exit_code)
    except BoardError as error:
        click.echo(f"mers: error: board: {error}", err=True)
        sys.exit(EXIT_STORAGE)


@contextmanager
def device(board_path: Path, timeout: float, retries: int) -> Iterator[DeviceClient]:
    http = replace(HttpSettings(), connect_timeout=min(timeout, 10.0), read_timeout=timeout, retries=retries)
    with reported_errors(), DeviceClient.open(board_path, settings=ClientSettings(http=http)) as client:
        yield client


def emit(document: dict[str, Any] | list[Any]) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: MERS_BOARD=./gw1 mers onboard && mers status --json",
)
@click.version_option(package_name="mers")
def main() -> None:
    """The device's cloud client: onboarding, credentials, tasks.

    Exit codes: 2 bad input, 3 not onboarded or no boarding data, 4 board storage, 5 hub unreachable
    (retry later), 6 refused by the hub or by the install's state (operator action needed), 7 image
    rejected, 8 new firmware not confirmed (health check failed or rolled back), 130 interrupted.
    """


@main.command()
@board_options
def onboard(board_path: Path, timeout: float, retries: int) -> None:
    """Register with the hub using the boarding data's IAT (again: no-op)."""
    with device(board_path, timeout, retries) as client:
        result = client.onboard()
    if result.outcome is OnboardOutcome.ALREADY_ONBOARDED:
        click.echo(f"already onboarded as {result.client_id} ({result.profile}); nothing to do")
    else:
        click.echo(
            f"onboarded as {result.client_id} ({result.profile}, {result.boarding_source} boarding data)"
        )


@main.command()
@click.option("--force", is_flag=True, help="Renew even if the credentials are not due.")
@board_options
def renew(force: bool, board_path: Path, timeout: float, retries: int) -> None:
    """Renew the credentials through the RAT when less than 25 h remain (or with --force)."""
    with device(board_path, timeout, retries) as client:
        renewed = client.renew(force=force)
    click.echo("credentials renewed" if renewed else "credentials are not due for renewal")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--check-slots", is_flag=True, help="Also hash each slot against its record (reads them).")
@board_options
def status(as_json: bool, check_slots: bool, board_path: Path, timeout: float, retries: int) -> None:
    """Boarding state, credential and token expiry, last error; slots, versions, security counter floor,
    boot env, install journal and current task (no secrets, no network)."""
    with device(board_path, timeout, retries) as client:
        current = device_status(client.board)
        firmware = firmware_status(client.board, check_slots=check_slots)
    if as_json:
        emit({**current.to_json(), "firmware": firmware.to_json()})
    else:
        for line in current.lines() + firmware.lines():
            click.echo(line)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the default is JSON too, indented).")
@board_options
def datasources(as_json: bool, board_path: Path, timeout: float, retries: int) -> None:
    """Print the agent's data source configuration from the hub."""
    with device(board_path, timeout, retries) as client:
        configuration = client.data_source_configuration()
    if as_json:
        click.echo(json.dumps(configuration, sort_keys=True))
    else:
        emit(configuration)


@main.group()
def boarding() -> None:
    """Boarding data that arrives after the factory (USB stick)."""


@boarding.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--ca", "ca_path", type=click.Path(path_type=Path), help="CA PEM, for a plain configuration.")
@click.option("--network", "network_path", type=click.Path(path_type=Path), help="Network JSON (proxy).")
@click.option("--no-onboard", is_flag=True, help="Only store it; onboard later with `mers onboard`.")
@board_options
def import_boarding(
    file: Path,
    ca_path: Path | None,
    network_path: Path | None,
    no_onboard: bool,
    board_path: Path,
    timeout: float,
    retries: int,
) -> None:
    """Validate and store boarding data, then onboard with it. The stored credentials are replaced only
    after the new registration succeeded.

    FILE is {"boardingConfiguration": {...}, "ca": "<PEM>", "network": {...}} or the plain boarding
    configuration JSON with --ca (and --network).
    """
    with device(board_path, timeout, retries) as client:
        parsed = parse_boarding(read_import_file(file, ca_path, network_path), BoardingSource.IMPORTED)
        where = store_imported(client.board, parsed)
        place = "on the board" if where is BoardingSource.BOARD else "in the state directory (board locked)"
        click.echo(f"boarding data for {parsed.client_id} stored {place}")
        if no_onboard:
            return
        result = client.onboard()
    verb = "already onboarded" if result.outcome is OnboardOutcome.ALREADY_ONBOARDED else "onboarded"
    click.echo(f"{verb} as {result.client_id} ({result.profile})")


@main.group()
def tasks() -> None:
    """Installation tasks of this agent."""


@tasks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@board_options
def list_tasks(as_json: bool, board_path: Path, timeout: float, retries: int) -> None:
    """The agent's open installation tasks."""
    with device(board_path, timeout, retries) as client:
        found = TaskClient(client).open_tasks()
    if as_json:
        emit([task.to_json() for task in found])
    elif not found:
        click.echo("no open installation task")
    else:
        for task in found:
            click.echo(f"{task.id} {task.state} {task.progress:.0%} {task.version} {task.message}".rstrip())


@tasks.command("show")
@click.argument("task_id")
@board_options
def show_task(task_id: str, board_path: Path, timeout: float, retries: int) -> None:
    """One task as JSON (artifact URLs are credentials and are not printed)."""
    with device(board_path, timeout, retries) as client:
        emit(TaskClient(client).task(task_id).to_json())


@tasks.command("report")
@click.argument("task_id")
@click.option("--state", type=click.Choice([s.value for s in TaskState]), help="New task state.")
@click.option("--progress", type=click.FloatRange(0.0, 1.0), help="Progress, 0 to 1.")
@click.option("--message", help="Message for the operator.")
@board_options
def report_task(
    task_id: str,
    state: str | None,
    progress: float | None,
    message: str | None,
    board_path: Path,
    timeout: float,
    retries: int,
) -> None:
    """Report a task's state, progress and message."""
    with device(board_path, timeout, retries) as client:
        task = TaskClient(client).report(
            task_id, state=None if state is None else TaskState(state), progress=progress, message=message
        )
    click.echo(f"{task.id} {task.state} {task.progress:.0%}")


# --- the installer -------------------------------------------------------------------------------------


@main.command(epilog="Example: mers install --task 3f2c9a  (or --file /media/usb/rootfs.signed)")
@click.option("--task", "task_id", help="Install this installation task of the hub (reports its state).")
@click.option("--url", help="Install from this signed URL (the hub's CA is the boarding CA).")
@click.option(
    "--file", "file_path", type=click.Path(path_type=Path, dir_okay=False), help="Install a local image."
)
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@board_options
def install(
    task_id: str | None,
    url: str | None,
    file_path: Path | None,
    no_progress: bool,
    board_path: Path,
    timeout: float,
    retries: int,
) -> None:
    """Download, verify and activate one image in the inactive slot, then reboot into it for a trial.

    Run it again with the same source after an interruption: it resumes where the journal stands.
    After the reboot, `mers confirm` commits the new firmware or reports why it failed.
    """
    if sum(x is not None for x in (task_id, url, file_path)) != 1:
        raise click.UsageError("give exactly one of --task, --url and --file")
    download = replace(
        DownloadSettings(), connect_timeout=min(timeout, 10.0), read_timeout=timeout, retries=retries
    )
    settings = InstallSettings(download=download)
    with device(board_path, timeout, retries) as client, _ProgressBar(enabled=not no_progress) as bar:
        installer = Installer(
            client.board,
            client if task_id is not None or url is not None else None,
            settings=settings,
            progress=bar.update,
        )
        if task_id is not None:
            result = installer.install_task(task_id)
        elif url is not None:
            result = installer.install_url(url)
        else:
            assert file_path is not None
            result = installer.install_file(file_path)
    journal = result.journal
    if result.outcome is InstallOutcome.REBOOTING:
        click.echo(f"{journal.version} is in slot {journal.slot}; rebooting for a trial boot")
    elif result.outcome is InstallOutcome.AWAITING_CONFIRM:
        click.echo(f"{journal.version} runs from slot {journal.slot} on trial: run `mers confirm`")
    else:
        click.echo(f"stopped at byte {journal.offset}; run the same command again to resume")


@main.command(epilog="Example: MERS_HEALTH_HOOK=/usr/libexec/gateway-health mers confirm")
@click.option(
    "--health-hook",
    envvar="MERS_HEALTH_HOOK",
    help="Command that must exit 0 for the new firmware to be committed (env MERS_HEALTH_HOOK).",
)
@click.option("--health-timeout", type=click.FloatRange(1, 3600), default=HEALTH_TIMEOUT, show_default=True)
@board_options
def confirm(
    health_hook: str | None, health_timeout: float, board_path: Path, timeout: float, retries: int
) -> None:
    """After boot: commit the slot on trial if healthy (hook command and hub reachable), or report the
    bootloader's rollback as FAILED. Exit 8 when the new firmware is not confirmed."""
    with device(board_path, timeout, retries) as client:
        onboarded = load_credentials(client.board.state) is not None
        confirmer = Confirmer(
            client.board,
            client if onboarded else None,
            health_command=health_hook,
            health_timeout=health_timeout,
        )
        result = confirmer.confirm()
    click.echo(result.message)


@main.command(epilog='Example: mers abandon --reason "USB stick removed"')
@click.option(
    "--reason",
    default="no reason given",
    show_default=True,
    help="Why; journalled, and sent with a task's FAILED report.",
)
@board_options
def abandon(reason: str, board_path: Path, timeout: float, retries: int) -> None:
    """End an install that cannot or should not finish, before it is armed: its file is gone, its URL
    expired, it is not wanted. A task is reported FAILED; the running firmware and the boot environment
    are untouched, and the next install can start.

    Refused once the new slot is armed (SWITCHED, REBOOTING, CONFIRMING): the bootloader and `mers
    confirm` decide then. Stop `mers run` first if it is retrying the install (exit 6 while it holds the
    journal)."""
    with device(board_path, timeout, retries) as client:
        onboarded = load_credentials(client.board.state) is not None
        ended = abandon_install(client.board, client if onboarded else None, reason)
    if ended is None:
        click.echo("no install in progress: nothing to abandon")
        return
    journal = ended.journal
    where = f" at byte {journal.offset}" if journal.phase is Phase.DOWNLOADING else ""
    click.echo(
        f"abandoned the install of {journal.version} ({describe_install(journal)}, {journal.phase}{where})"
        + (f"; {ended.hub_note}" if ended.hub_note else "")
    )


@main.command(epilog="Example: mers run --poll-interval 600 -v   (systemd: systemd/mers.service)")
@click.option(
    "--poll-interval",
    envvar="MERS_POLL_INTERVAL",
    type=click.FloatRange(1, 86400),
    default=300.0,
    show_default=True,
    help="Seconds between polls for installation tasks while all is well (env MERS_POLL_INTERVAL).",
)
@click.option("--health-hook", envvar="MERS_HEALTH_HOOK", help="Passed to the confirm step.")
@click.option(
    "--health-timeout",
    type=click.FloatRange(1, 3600),
    default=HEALTH_TIMEOUT,
    show_default=True,
    help="Passed to the confirm step.",
)
@click.option("--once", is_flag=True, help="One pass (confirm, resume, one poll), then exit.")
@click.option("--verbose", "-v", is_flag=True, help="Log each step (to stderr).")
@board_options
def run(
    poll_interval: float,
    health_hook: str | None,
    health_timeout: float,
    once: bool,
    verbose: bool,
    board_path: Path,
    timeout: float,
    retries: int,
) -> None:
    """The daemon: onboard if needed, keep credentials fresh, confirm after boot, poll installation tasks
    with backoff and install them. SIGTERM stops it cleanly (the journal keeps the download's offset)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="mers: %(message)s")
    settings = DaemonSettings(
        poll_interval=poll_interval, health_command=health_hook, health_timeout=health_timeout
    )
    with device(board_path, timeout, retries) as client:
        daemon = Daemon(client, settings)
        daemon.install_signal_handlers()
        daemon.run(once=once)


class _ProgressBar:
    """click's progress bar over the payload bytes, with the amount, the rate and the ETA."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None
        self._done = 0
        self._started = 0.0

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def update(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            self._bar = click.progressbar(
                length=total,
                label="downloading",
                show_eta=True,
                show_percent=True,
                item_show_func=self._label,
                file=sys.stderr,
            ).__enter__()
            self._done, self._started = done, time.monotonic()
            self._first = done
        self._bar.update(done - self._done, done)
        self._done = done

    def _label(self, done: int | None) -> str:
        if done is None:
            return ""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (done - self._first) / elapsed
        return f"{done / 2**20:.1f} MiB, {rate / 2**20:.1f} MiB/s"


EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended


def script() -> None:
    """The `mers` console script: `main`, with Ctrl-C ending it in exit 130 (`main` itself is left
    without a signal handler for tests and library users who call it in-process)."""
    signal.signal(signal.SIGINT, _interrupted)
    main()


def _interrupted(signum: int, frame: object) -> NoReturn:
    """Ctrl-C: unwind as KeyboardInterrupt would (context managers close, files stay whole), but end in
    the shell's code for it, 130, rather than click's "Aborted!" and 1, which means something else here.
    A SIGTERM is not caught: it ends the command as the signal does (143 in a shell)."""
    click.echo("mers: interrupted", err=True)
    raise SystemExit(EXIT_INTERRUPTED)

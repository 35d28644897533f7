"""`mers`: the device's command line, a thin layer over `mers.client`.

Every command finds its board through `--board PATH` or `MERS_BOARD` (a simulated board directory or a
gateway TOML file; default /etc/mers/board.toml). Errors are one line on stderr and an exit code:
2 bad input, 3 not onboarded / no boarding data, 4 board or state storage, 5 hub unreachable (retry
later), 6 hub refused (the operator must act). No secret is ever printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click

from board.errors import BoardError

from .boarding import BoardingSource, parse_boarding, read_import_file, store_imported
from .client import ClientSettings, DeviceClient, OnboardOutcome
from .errors import EXIT_STORAGE, MersError
from .http import HttpSettings
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
    (retry later), 6 hub refused (operator action needed).
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
@board_options
def status(as_json: bool, board_path: Path, timeout: float, retries: int) -> None:
    """Boarding state, profile, credential and token expiry, last error (no secrets, no network)."""
    with device(board_path, timeout, retries) as client:
        current = device_status(client.board)
    if as_json:
        emit(current.to_json())
    else:
        for line in current.lines():
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

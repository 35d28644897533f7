"""`mers-board console` and `mers-board sim serve`: the provisioning console from the command line.

Two standalone click commands for `board.cli` to register (``main.add_command(console)``,
``sim.add_command(sim_serve)``); ``python -m board.console_cli`` runs them without it. Each opens the
board and the port, serves until SIGTERM or SIGINT, and closes the port whatever happens. Errors are one
line on stderr, ``mers-board: error: [field] message``, with the exit codes of `board.cli`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import click

from .console import (
    ConsolePortError,
    PtyPort,
    SerialPort,
    impaired,
    serve,
    write_timeout_for,
)
from .errors import BoardError, BootEnvError, ConfigError, ConsoleBusyError, StorageError
from .interface import Board
from .line import LineConditions, Port
from .opening import open_board
from .simboard import SimBoard
from .storage import ensure_directory

EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3
EXIT_STORAGE: Final = 4


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors as one line on stderr and the exit codes of `board.cli`."""
    try:
        yield
    except BoardError as error:
        field = f"[{error.field}] " if error.field else ""
        click.echo(f"mers-board: error: {field}{error}", err=True)
        if isinstance(error, ConfigError):
            sys.exit(EXIT_USAGE)
        sys.exit(
            EXIT_STORAGE
            if isinstance(error, StorageError | BootEnvError | ConsolePortError)
            else EXIT_REFUSED
        )


_RATE: Final = click.FloatRange(0.0, 1.0, max_open=True)


def _realism_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The line damage options both commands take (see `board.line`)."""
    options = [
        click.option("--corrupt-rate", type=_RATE, default=0.0, help="Probability a byte arrives changed."),
        click.option("--drop-rate", type=_RATE, default=0.0, help="Probability a byte is lost."),
        click.option(
            "--cut-after",
            type=click.IntRange(min=0),
            default=None,
            help="Bytes (both ways together) after which the line goes dead for good.",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the line damage."),
        click.option("-v", "--verbose", is_flag=True, help="Log every request error and dropped frame."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _serve_until_stopped(board: Board, port: Port, announce: Callable[[], None] = lambda: None) -> None:
    """Serve `port` until a signal; the port is closed on every way out, a failure included."""
    try:
        with _the_only_console(board):
            stop = _stop_on_signals()  # before announcing: whoever reads the announcement may signal at once
            announce()
            serve(board, port, stop)
    finally:
        port.close()


@contextmanager
def _the_only_console(board: Board) -> Iterator[None]:
    """One console per board: two would let two stations provision one board at once, each reading back
    what the other wrote. Held as a lock on the board's state directory, which the kernel releases with
    the process, however it ends."""
    directory = board.state.directory
    ensure_directory(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConsoleBusyError(
                f"another console already serves this board (its state directory {directory} is locked)"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="mers-board console: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@click.command("console", epilog="Example: mers-board console /etc/mers/board.toml --port /dev/ttyS1")
@click.argument("board_path", metavar="BOARD", type=click.Path(exists=True, path_type=Path))
@click.option("--port", "device", required=True, help="Serial device to serve, opened exclusively.")
@click.option("--baud", type=click.IntRange(min=1), default=115200, show_default=True, help="Line speed.")
@_realism_options
def console(
    board_path: Path,
    device: str,
    baud: int,
    corrupt_rate: float,
    drop_rate: float,
    cut_after: int | None,
    seed: int,
    verbose: bool,
) -> None:
    """Serve the provisioning console of BOARD (a gateway's TOML file or a simulated board's directory)
    on a serial device until SIGTERM or SIGINT. Once the device is open, one line on stderr says so."""
    _configure_logging(verbose)
    with reported_errors():
        conditions = LineConditions(
            corrupt_rate=corrupt_rate, drop_rate=drop_rate, cut_after=cut_after, seed=seed
        )
        board = open_board(board_path)  # before the port: a wrong board never touches the device

        def announce() -> None:  # on stderr, so a service's log (and a script) knows it can be reached
            click.echo(f"mers-board: serving the provisioning console on {device} at {baud} baud", err=True)

        _serve_until_stopped(board, impaired(SerialPort.open(device, baud), conditions), announce)


@click.command("serve", epilog="Example: mers-board sim serve ./gw1 --json --baud 115200 --corrupt-rate 1e-3")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='Print {"port": PATH, "pid": N, ...} as one JSON line.')
@click.option("--baud", type=click.IntRange(min=1), default=None, help="Pace the pty at this line speed.")
@_realism_options
def sim_serve(
    directory: Path,
    as_json: bool,
    baud: int | None,
    corrupt_rate: float,
    drop_rate: float,
    cut_after: int | None,
    seed: int,
    verbose: bool,
) -> None:
    """Serve the simulated board in DIRECTORY on a new pseudo-terminal until SIGTERM or SIGINT.

    The first line on stdout is the device to open (the pty's slave path), or with --json one JSON
    object; nothing else is printed there."""
    _configure_logging(verbose)
    with reported_errors():
        conditions = LineConditions(
            baud=baud, corrupt_rate=corrupt_rate, drop_rate=drop_rate, cut_after=cut_after, seed=seed
        )
        board = SimBoard.open(directory)  # a wrong directory fails before a pty is made
        pty = PtyPort.open(write_timeout_for(baud))

        def announce() -> None:
            if as_json:
                click.echo(
                    json.dumps({"port": pty.path, "pid": os.getpid(), "board": str(directory.absolute())})
                )
            else:
                click.echo(pty.path)
            sys.stdout.flush()

        _serve_until_stopped(board, impaired(pty, conditions), announce)


@click.group(help="The provisioning console without the rest of mers-board (for tests and debugging).")
def standalone() -> None:
    pass


standalone.add_command(console)
standalone.add_command(sim_serve)

if __name__ == "__main__":
    standalone()

"""Each console script as a real process agrees with the in-process run the other tests use (`run_cli`):
the installed entry point reaches its command, and the process ends with the same exit code and prints
the same lines, one error line and no traceback for an error. Every one tells its version, and ends in
130 on Ctrl-C and by the signal on SIGTERM."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from board.interface import Identity
from board.simboard import SimBoard
from hub.tls import create_tls_material
from tests.conftest import BIN_DIR, IN_PROCESS, run_cli

CASES = [
    ("mers-sign", ["--version"]),
    ("mers-sign", ["info", "/nonexistent/image"]),
    ("mers-sign", ["verify"]),
    ("mers-board", ["--version"]),
    ("mers-board", ["info", "/nonexistent/board"]),
    ("mers-hub", ["--version"]),
    ("mers-hub", ["agent", "list", "--dir", "/nonexistent/hub"]),
    ("mers-factory", ["--version"]),
    ("mers-factory", ["records", "verify", "--records", "/nonexistent/records.db"]),
    ("mers-factory", ["provision"]),
    ("mers", ["--version"]),
    ("mers", ["status", "--board", "/nonexistent/board"]),
]


def test_every_console_script_is_covered_and_tells_its_version() -> None:
    assert {program for program, _ in CASES} == set(IN_PROCESS)
    assert {program for program, args in CASES if args == ["--version"]} == set(IN_PROCESS)


@pytest.mark.parametrize(("program", "args"), CASES, ids=[" ".join([p, *a]) for p, a in CASES])
def test_the_process_and_the_in_process_run_agree(program: str, args: list[str]) -> None:
    in_process = run_cli(program, *args)
    process = run_cli(program, *args, process=True)
    assert process == in_process
    assert "Traceback" not in process.stderr
    if process.returncode != 0:
        assert process.stdout == ""
        assert process.stderr.startswith(("Usage:", f"{program}: error:")), process.stderr


def blocked_on_a_fifo(tmp_path: Path, program: str) -> tuple[list[str], Path]:
    """A command line of `program` that blocks reading a named pipe nobody writes to, and that pipe."""
    fifo = tmp_path / "input.pipe"
    os.mkfifo(fifo)
    board = tmp_path / "board"
    ca = tmp_path / "ca.pem"
    ca.write_bytes(create_tls_material(()).ca_certificate_pem)
    token = tmp_path / "token"
    token.write_text("not-a-token\n")
    commands = {
        "mers-sign": ["getpub", str(fifo)],
        "mers-board": ["env", "init", str(board), "--defaults", str(fifo)],
        "mers-hub": [
            "agent", "list", "--url", "https://127.0.0.1:1", "--token-file", str(fifo), "--ca", str(ca),
        ],
        "mers-factory": [
            "batch", "export", "--serials-file", str(fifo), "-o", str(tmp_path / "batch.jsonl"),
            "--hub", "https://127.0.0.1:1", "--hub-token-file", str(token), "--hub-ca", str(ca),
        ],
        "mers": ["boarding", "import", str(fifo), "--board", str(board)],
    }  # fmt: skip
    if program in ("mers-board", "mers"):
        SimBoard.create(board, Identity("GW-1", "Acme", "gw-100", "B"), slot_size=64 << 10)
    return commands[program], fifo


@pytest.mark.parametrize("program", sorted(IN_PROCESS))
@pytest.mark.parametrize(
    ("signal_number", "returncode"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)]
)
def test_ctrl_c_ends_every_cli_in_130_and_sigterm_as_the_signal_does(
    tmp_path: Path, program: str, signal_number: int, returncode: int
) -> None:
    """Not click's "Aborted!" and 1, a code that means something else in each CLI. The signal is sent
    once the command is reading the pipe (a writer's non-blocking open succeeds only then)."""
    args, fifo = blocked_on_a_fifo(tmp_path, program)
    process = subprocess.Popen(
        [str(BIN_DIR / program), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    writer = None
    deadline = time.monotonic() + 60
    while writer is None:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command never opened the pipe"
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            assert error.errno == errno.ENXIO  # no reader yet
            time.sleep(0.01)
    try:
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=60)
    finally:
        os.close(writer)
    assert process.returncode == returncode, err
    assert b"Traceback" not in err and b"Aborted" not in err
    if signal_number == signal.SIGINT:
        assert err.decode().strip() == f"{program}: interrupted"

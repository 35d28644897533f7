"""Each console script as a real process agrees with the in-process run the other tests use (`run_cli`):
the installed entry point reaches its command, and the process ends with the same exit code and prints
the same lines, one error line and no traceback for an error."""

from __future__ import annotations

import pytest

from tests.conftest import IN_PROCESS, run_cli

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

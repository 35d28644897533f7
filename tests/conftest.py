"""Shared fixtures: system-tool gating, test hubs, and our CLIs run in-process or as processes."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from hub.home import HubSettings
from tests.hub_helpers import RunningHub, fresh_postgres_database, join_stopping_hubs, running_hub

BIN_DIR = Path(sys.executable).parent

# CI runs the same examples every time (a failure there reproduces on a rerun; developers' runs explore),
# and judges no example by its time: two workers share two cores. `HYPOTHESIS_PROFILE` chooses another.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI") or os.environ.get("MERS_REQUIRE_ALL") == "1" else "default")
)


def require_tool(name: str, reason: str = "") -> str:
    """The path of system tool `name`; skips the test where it is absent, but fails under
    MERS_REQUIRE_ALL=1 (CI), where every test must really run."""
    found = shutil.which(name) or shutil.which(name, path=f"{BIN_DIR}:/usr/sbin:/sbin")
    if found:
        return found
    unavailable(f"{name} is not installed{': ' + reason if reason else ''}")


def require_file(path: str, reason: str = "") -> Path:
    """Like `require_tool`, for a file such as a PKCS#11 module."""
    if Path(path).exists():
        return Path(path)
    unavailable(f"{path} is absent{': ' + reason if reason else ''}")


def unavailable(message: str) -> NoReturn:
    """Skip for a missing system resource, or fail under MERS_REQUIRE_ALL=1 (CI must run every test)."""
    if os.environ.get("MERS_REQUIRE_ALL") == "1":
        pytest.fail(f"MERS_REQUIRE_ALL=1 but {message}")
    pytest.skip(message)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The single line a failing command printed on stderr (asserting there is exactly one)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one error line, got: {self.stderr!r}"
        assert "Traceback" not in self.stderr
        return lines[0]


#: our console scripts as the tests call them in-process: `mers-sign`'s script only adds process-wide
#: tuning and a fast exit around its click group, so the group itself is called
IN_PROCESS = {
    "mers-sign": "signing.cli:main",
    "mers-board": "board.cli:main",
    "mers-hub": "hub.cli:main",
    "mers-factory": "factory.cli:main",
    "mers": "mers.cli:main",
}


def run_cli(
    program: str,
    *args: str | Path,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    env: dict[str, str] | None = None,
    process: bool = False,
) -> CliResult:
    """Run one of our console scripts: in this process by default (what a command prints and its exit
    code, without a Python start-up each), as a real subprocess with `process` (what only a process
    shows: its own exit path, closed descriptors, memory) and always for a peer such as imgtool."""
    if not process and program in IN_PROCESS:
        return _run_in_process(program, [str(arg) for arg in args], cwd, input_bytes, env or {})
    executable = BIN_DIR / program
    assert executable.exists(), f"{program} is not installed in {BIN_DIR} (pip install -e .)"
    completed = subprocess.run(
        [str(executable), *map(str, args)],
        cwd=cwd,
        input=input_bytes,
        capture_output=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return CliResult(
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )


def _run_in_process(
    program: str, args: list[str], cwd: Path | None, input_bytes: bytes | None, env: dict[str, str]
) -> CliResult:
    """The console script's function with `sys.argv`, standard streams (click's test isolation), the
    environment and the working directory of a fresh process, and the process-wide state a command may
    set (logging's root handlers, signal handlers) put back afterwards. An exception that escapes is
    printed as the interpreter would, a traceback and exit code 1, so "no traceback" still holds."""
    module, _, name = IN_PROCESS[program].partition(":")
    command = getattr(importlib.import_module(module), name)
    root = logging.getLogger()
    saved_logging = root.handlers[:], root.level
    saved_signals = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    saved_argv, saved_cwd, saved_main = sys.argv, os.getcwd(), sys.modules["__main__"]
    with CliRunner().isolation(input=input_bytes, env=env) as (stdout, stderr, _):
        root.handlers, root.level = [], logging.WARNING  # as in a new interpreter: basicConfig works
        sys.argv = [program, *args]
        # a console script's __main__, which click reads to name the program (not "python -m pytest")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            if cwd is not None:
                os.chdir(cwd)
            command()
            code = 0
        except SystemExit as done:
            code = _exit_code(done.code)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            sys.modules["__main__"] = saved_main
            root.handlers, root.level = saved_logging
            for number, handler in saved_signals.items():
                signal.signal(number, handler)
        return CliResult(
            code, stdout.getvalue().decode("utf-8", "replace"), stderr.getvalue().decode("utf-8", "replace")
        )


def _exit_code(code: object) -> int:
    """`SystemExit.code` as the interpreter turns it into an exit status (a message is printed, then 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


@pytest.fixture
def mers_sign() -> Callable[..., CliResult]:
    """Call `mers-sign ARGS...` (in-process; `process=True` for a real one)."""

    def call(*args: str | Path, **kwargs: object) -> CliResult:
        return run_cli("mers-sign", *args, **kwargs)  # type: ignore[arg-type]

    return call


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A fresh hub on SQLite, served over TLS on 127.0.0.1; it stops in the background after the test."""
    with running_hub(tmp_path / "hub", wait_for_stop=False) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _stopped_hubs_are_joined() -> Iterator[None]:
    yield
    join_stopping_hubs()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards) on the server named by
    MERS_TEST_POSTGRES_URL, which scripts/test sets after starting Debian's cluster on 127.0.0.1."""
    server_url = os.environ.get("MERS_TEST_POSTGRES_URL")
    if not server_url:
        unavailable("MERS_TEST_POSTGRES_URL is not set (scripts/test starts PostgreSQL and sets it)")
    with fresh_postgres_database(server_url) as url:
        yield url


@pytest.fixture
def postgres_hub(tmp_path: Path, postgres_url: str) -> Iterator[RunningHub]:
    """A fresh hub on PostgreSQL, served over TLS on 127.0.0.1."""
    with running_hub(tmp_path / "hub", HubSettings(database_url=postgres_url)) as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_on_each_database(request: pytest.FixtureRequest) -> RunningHub:
    """The same test on a SQLite hub, then on a PostgreSQL one: for the flows whose correctness rests on
    the database (conditional updates, unique claims, transactions under concurrency)."""
    running: RunningHub = request.getfixturevalue("hub" if request.param == "sqlite" else "postgres_hub")
    return running


@contextmanager
def small_filesystem(mount_point: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `mount_point`, for a real ENOSPC (mounting needs root, as CI
    runs; elsewhere the test is skipped). `grow_filesystem` gives it more room while mounted."""
    mount_point.mkdir()
    command = [require_tool("mount"), "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs (root is needed): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:  # lazily: a failed test may still hold a file open in it, and the mount must not outlive it
        subprocess.run([require_tool("umount"), "-l", str(mount_point)], check=True)  # -l: lazy


def fill_filesystem(mount_point: Path) -> Path:
    """Write a file into `mount_point` until its filesystem has no room left (ENOSPC); the file, which
    frees the room again once removed."""
    filler = mount_point / "filler"
    with filler.open("wb") as output, contextlib.suppress(OSError):
        while True:
            output.write(bytes(64 << 10))
            output.flush()
    return filler


def grow_filesystem(mount_point: Path, size: int) -> None:
    subprocess.run([require_tool("mount"), "-o", f"remount,size={size}", str(mount_point)], check=True)

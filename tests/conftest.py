"""Shared fixtures: system-tool gating, and running the real CLIs as subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from hub.home import HubSettings
from tests.hub_helpers import RunningHub, fresh_postgres_database, running_hub

BIN_DIR = Path(sys.executable).parent


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


def run_cli(
    program: str,
    *args: str | Path,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run one of our console scripts from this environment as a real subprocess."""
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


@pytest.fixture
def mers_sign() -> Callable[..., CliResult]:
    """Call `mers-sign ARGS...` as a subprocess."""

    def call(*args: str | Path, **kwargs: object) -> CliResult:
        return run_cli("mers-sign", *args, **kwargs)  # type: ignore[arg-type]

    return call


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A fresh hub on SQLite, served over TLS on 127.0.0.1."""
    with running_hub(tmp_path / "hub") as running:
        yield running


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

"""Real processes without a Python start-up each: children forked from one server process that imported
the device's code once (multiprocessing's forkserver), for the tests that SIGKILL a process at a chosen
point, dozens of times. What they prove (a power cut leaves a bootable board; a renewal killed at any step
recovers) needs a process of its own whose death the test causes; a fresh interpreter adds only its ~1 s
of imports to each.

The server is started by this process, with no thread of the test process in it, so a child never
inherits a lock another thread held at the fork (which forking pytest itself, with a hub thread running,
would risk). A driver is `module:function`, called with its argument list, its return value the exit
code; its standard output and error go to files that `wait` reads back.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

#: imported by the server before it forks anything: the drivers and everything they run
PRELOAD = ["tests.device_helpers", "tests.installer_helpers", "tests.console_helpers"]


@dataclass(frozen=True)
class Finished:
    """How a forked driver ended: its exit code (negative: the signal that killed it), and its output."""

    returncode: int
    stdout: str
    stderr: str


class ForkedDriver:
    """A driver running in a process of its own."""

    def __init__(self, entry: str, argv: list[str]) -> None:
        directory = Path(tempfile.mkdtemp(prefix="forked-"))
        self._stdout, self._stderr = directory / "stdout", directory / "stderr"
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._process: BaseProcess = context.Process(
            target=_run, args=(entry, argv, str(self._stdout), str(self._stderr)), daemon=True
        )
        self._process.start()

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def running(self) -> bool:
        return self._process.is_alive()

    def kill(self) -> None:
        """SIGKILL, as a power cut ends a process: nothing of its own runs after it."""
        self._process.kill()

    def signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def first_line(self, timeout: float) -> str:
        """The first line the driver printed, polled for until `timeout` seconds pass or the driver
        ends; "" if none came."""
        deadline = time.monotonic() + timeout
        while True:
            text = self._stdout.read_text(errors="replace") if self._stdout.exists() else ""
            if "\n" in text:
                return text.split("\n", 1)[0]
            if not self.running() or time.monotonic() > deadline:
                return ""
            time.sleep(0.01)

    def stderr(self) -> str:
        """What the driver has written to its standard error so far."""
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def wait(self, timeout: float = 120) -> Finished:
        """The driver's end; it must end within `timeout` seconds."""
        self._process.join(timeout)
        code = self._process.exitcode
        assert code is not None, f"the driver did not end within {timeout} s"
        outputs = [path.read_text(errors="replace") if path.exists() else "" for path in self._streams()]
        for path in self._streams():
            path.unlink(missing_ok=True)
        self._stdout.parent.rmdir()
        return Finished(code, *outputs)

    def join(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the driver to end by itself; True if it ended."""
        self._process.join(timeout)
        return not self._process.is_alive()

    def _streams(self) -> tuple[Path, Path]:
        return self._stdout, self._stderr


def run_driver(entry: str, argv: list[str], timeout: float = 120) -> Finished:
    """Run the driver `entry` with `argv` in a forked process to its end."""
    return ForkedDriver(entry, argv).wait(timeout)


def _run(entry: str, argv: list[str], stdout: str, stderr: str) -> None:
    """In the child: output to the files, then the driver; its return value is the exit code."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stream
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    module, _, name = entry.partition(":")
    driver = getattr(importlib.import_module(module), name)
    sys.exit(driver(argv))

"""The virtual gateway's report (a pytest plugin, `scripts/test-vm` loads it): one line per step as it
ends, `vm: STEP: passed (12.3 s)`, and at the end `vm: N steps passed, M failed`. A test is one step,
unless it names its own with `step()`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_counts = {"passed": 0, "failed": 0}
#: the tests that named their own steps: their own line would count them twice
_with_steps: set[str] = set()


@contextmanager
def step(name: str) -> Iterator[None]:
    """A step of a scenario test: its line says whether the block ended without an error."""
    _with_steps.add(os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0])
    started = time.monotonic()
    try:
        yield
    except BaseException:
        _report(name, "failed", time.monotonic() - started)
        raise
    _report(name, "passed", time.monotonic() - started)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid in _with_steps:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "passed" if report.passed else "failed"  # a skip is not a pass (MERS_REQUIRE_ALL)
        _report(report.nodeid.rsplit("::", 1)[-1], outcome, report.duration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"vm: {_counts['passed']} steps passed, {_counts['failed']} failed")


def _report(name: str, outcome: str, seconds: float) -> None:
    _counts[outcome] += 1
    sys.stdout.write(f"\nvm: {name}: {outcome} ({seconds:.1f} s)\n")
    sys.stdout.flush()

"""Running the health hook of `mers confirm`: the operator's command that says whether the firmware on
trial works (exit 0) or not, and why (the last line of its stderr).

A hook is somebody else's program, so its run is bounded every way it can misbehave:
- it runs in a session of its own; what it leaves running (a daemon it started, a `sleep &`) keeps its
  stdout and stderr open, yet the hook is judged by its own exit, not by theirs;
- its stdout is discarded and only the last `STDERR_TAIL` bytes of its stderr are kept, read from a pipe
  by a thread: neither memory nor a temporary file (often RAM on a gateway) grows with what it prints;
- past its timeout, every process of its session is killed, those that moved to a process group of
  their own included (`timeout 60 check` does). Only one that started a session of its own escapes.
  A hook that SIGKILL cannot end at once (stuck in uninterruptible I/O) is waited for `_REAP_S` at most;
- a stop (the daemon's SIGTERM, a Ctrl-C) kills the session as well and gives no verdict
  (`HealthCheckStoppedError`): systemd stops a service by signalling all its processes, the hook among
  them, and a hook killed that way says nothing about the firmware. A trial is never refused, nor a
  boot of its `bootlimit` spent, because the gateway was being shut down;
- once the hook has exited, its stderr is read for `_TAIL_GRACE_S` more at most, then closed: a process
  it left writing there gets EPIPE, as after any pipe's reader has gone, and no thread or descriptor
  outlives the check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import HealthCheckStoppedError

log = logging.getLogger("mers.health_hook")

#: what is kept of the hook's stderr: its last line is the reason given, cut to 200 characters
STDERR_TAIL = 4096
#: how long the tail may take to arrive once the hook has exited (its writes are in the pipe by then)
_TAIL_GRACE_S = 0.5
#: how often a running hook's wait looks at `should_stop`
_STOP_POLL_S = 0.1
#: how long a SIGKILLed hook may take to die: one stuck in uninterruptible I/O (a dead NFS server, a
#: failing flash) dies only when that I/O ends, and the verdict must not wait for it
_REAP_S = 5.0
#: a hook that dies of one of these was stopped, as the service was, not failed
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def run_health_hook(
    command: Sequence[str], timeout: float, should_stop: Callable[[], bool] = lambda: False
) -> str | None:
    """None when `command` exits 0 within `timeout` seconds; otherwise what went wrong, in one line.
    `HealthCheckStoppedError` when a stop came first: `should_stop` turned true (the hook's session is
    killed), or a stop signal killed the hook. Any other exception during the wait (a KeyboardInterrupt)
    kills the hook's session too before it propagates."""
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_end)
        return f"health hook {command[0]} could not run: {exc}"
    finally:
        os.close(write_end)
    tail = _StderrTail(read_end)
    try:
        returncode = _wait(process, timeout, should_stop)
    except BaseException:
        _kill_session(process.pid)
        _reap(process)
        tail.close(0)
        raise
    if returncode is None:
        _kill_session(process.pid)
        _reap(process)
        tail.close(0)
        return f"health hook {command[0]} did not finish in {timeout:g} s"
    if returncode == 0:
        tail.close(0)
        return None
    line = tail.close(_TAIL_GRACE_S)
    if -returncode in _STOP_SIGNALS:
        raise HealthCheckStoppedError(
            f"the health hook was stopped by signal {-returncode} before it could judge: no verdict"
        )
    return f"health hook exited with {returncode}{': ' + line[:200] if line else ''}"


def _wait(process: subprocess.Popen[bytes], timeout: float, should_stop: Callable[[], bool]) -> int | None:
    """The hook's exit status, or None past `timeout`; a stop raises."""
    deadline = time.monotonic() + timeout
    while True:
        if should_stop():
            raise HealthCheckStoppedError("stopping: the health check was cut short, no verdict")
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return process.wait(timeout=min(left, _STOP_POLL_S))
        except subprocess.TimeoutExpired:
            continue


class _StderrTail:
    """Reads a pipe in a daemon thread, keeping only its last `STDERR_TAIL` bytes, until the pipe ends or
    `close` is called; then the thread closes the pipe's read end and ends."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._tail = b""
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="mers-health-hook-stderr", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            while not self._closing.is_set():
                if not poller.poll(_STOP_POLL_S * 1000):
                    continue
                chunk = os.read(self._fd, 1 << 16)
                if not chunk:
                    return
                with self._lock:
                    self._tail = (self._tail + chunk)[-STDERR_TAIL:]
        finally:
            os.close(self._fd)

    def close(self, wait_s: float) -> str:
        """Let the pipe end by itself for `wait_s` at most, stop reading, and return the last non-empty
        line read."""
        self._thread.join(wait_s)
        self._closing.set()
        self._thread.join()
        with self._lock:
            tail = self._tail
        lines = [line for line in tail.splitlines() if line.strip()]
        if not lines:
            return ""
        last = lines[-1]
        if len(lines) == 1 and len(tail) == STDERR_TAIL:  # the middle of a line longer than the tail
            last = last.lstrip(bytes(range(0x80, 0xC0)))  # no half of a UTF-8 character first
        return last.decode("utf-8", "replace").strip()


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait `_REAP_S` at most for a killed hook to die. One that outlives it is left to the kernel (it
    dies when its I/O ends; `subprocess` reaps it later), with a warning: the verdict stands either way."""
    try:
        process.wait(timeout=_REAP_S)
    except subprocess.TimeoutExpired:
        log.warning(
            "health hook (pid %d) still alive %g s after SIGKILL (stuck in uninterruptible I/O?): "
            "going on without it",
            process.pid,
            _REAP_S,
        )


def _kill_session(session: int) -> None:
    """SIGKILL every process of `session` (the hook's pid), its own process group first. A sweep of
    `/proc` finds those that moved to another group; it repeats while it finds any, since one may have
    forked between the look and the kill."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signal.SIGKILL)
    for _ in range(10):
        members = [pid for pid in _session_members(session) if pid != os.getpid()]
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _session_members(session: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the name: state, ppid, pgrp, session; a zombie is dead already, waiting to be reaped
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members

"""Running the health hook of `mers confirm`: the operator's command that says whether the firmware on
trial works (exit 0) or not, and why (the last line of its stderr).

A hook is somebody else's program, so its run is bounded every way it can misbehave:
- it runs in a session of its own; what it leaves running (a daemon it started, a `sleep &`) keeps its
  stdout and stderr open, yet the hook is judged by its own exit, not by theirs;
- its stdout is discarded and only the last `STDERR_TAIL` bytes of its stderr are kept, read from a pipe
  by a thread: neither memory nor a temporary file (often RAM on a gateway) grows with what it prints;
- past its timeout, every process of its session is killed, those that moved to a process group of
  their own included (`timeout 60 check` does). Only one that started a session of its own escapes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

#: what is kept of the hook's stderr: its last line is the reason given, cut to 200 characters
STDERR_TAIL = 4096
#: how long the tail may take to arrive once the hook has exited (its writes are in the pipe by then)
_TAIL_GRACE_S = 0.5


def run_health_hook(command: Sequence[str], timeout: float) -> str | None:
    """None when `command` exits 0 within `timeout` seconds; otherwise what went wrong, in one line."""
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
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        process.wait()
        return f"health hook {command[0]} did not finish in {timeout:g} s"
    if returncode == 0:
        return None
    line = tail.last_line(_TAIL_GRACE_S)
    return f"health hook exited with {returncode}{': ' + line[:200] if line else ''}"


class _StderrTail:
    """Reads a pipe to its end in a daemon thread, keeping only its last `STDERR_TAIL` bytes. It reads on
    after the hook has exited, for as long as something the hook left running writes there: that
    process never blocks on a full pipe nor dies of a closed one."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._tail = b""
        self._lock = threading.Lock()
        self._ended = threading.Event()
        threading.Thread(target=self._read, name="mers-health-hook-stderr", daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := os.read(self._fd, 1 << 16):
                with self._lock:
                    self._tail = (self._tail + chunk)[-STDERR_TAIL:]
        finally:
            os.close(self._fd)
            self._ended.set()

    def last_line(self, wait_s: float) -> str:
        """The last non-empty line read so far, once the pipe has ended or `wait_s` has passed."""
        self._ended.wait(wait_s)
        with self._lock:
            tail = self._tail
        lines = [line for line in tail.splitlines() if line.strip()]
        if not lines:
            return ""
        last = lines[-1]
        if len(lines) == 1 and len(tail) == STDERR_TAIL:  # the middle of a line longer than the tail
            last = last.lstrip(bytes(range(0x80, 0xC0)))  # no half of a UTF-8 character first
        return last.decode("utf-8", "replace").strip()


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

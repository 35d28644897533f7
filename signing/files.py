"""Reading inputs: typed errors for unreadable files, and hashing in fixed chunks so memory never grows
with image size. (Outputs are `output.py`'s job.)"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from .errors import InputFileError

CHUNK_SIZE = 1 << 20


@contextmanager
def open_input(path: Path, what: str = "input") -> Iterator[BinaryIO]:
    """Open `path` for reading, or raise an `InputFileError` that says which file and why.

    Only a regular file is accepted: every reader here takes the input's length from `st_size`, which is
    0 for a pipe, /dev/stdin or a character device and meaningless for a block device, so `sign` would
    wrap an empty payload and exit 0. The file is opened with O_NONBLOCK, so a FIFO is refused at once
    instead of blocking until some writer opens it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InputFileError(f"{what} {path} does not exist", field=what) from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{what} {path} is a directory", field=what) from exc
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror}", field=what) from exc
    try:
        kind = _non_regular_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise InputFileError(
                f"{what} {path} is {kind}, not a regular file: its size cannot be known in advance",
                field=what,
            )
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


#: how each kind of file that is not a regular one is named in the error
_SPECIAL_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _non_regular_kind(mode: int) -> str | None:
    """How to name a file that is not a regular one, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")


def file_size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


#: the unprotected TLV area, which is never hashed, ends the image and holds at most this many bytes
_UNHASHED_TAIL_MAX = 0xFFFF


class PrefixHasher:
    """SHA-256 of a file's first bytes, computed in a background thread from the moment the file is open.

    Verifying is mostly hashing, and hashlib releases the GIL while it hashes, so the caller can meanwhile
    import the verifier, load the trust anchors and parse the TLVs. Before the caller knows where the
    signed range ends, the thread hashes all but the last 64 KiB (an image's unhashed tail is never
    longer); `digest(length)` waits for it and hashes the rest. Memory is one chunk buffer."""

    def __init__(self, handle: BinaryIO) -> None:
        self._fd = handle.fileno()
        self._buffer = bytearray(CHUNK_SIZE)
        self._hash = hashlib.sha256()
        self._done = 0
        self._stop = threading.Event()
        self._error: InputFileError | None = None
        early_limit = max(0, file_size(handle) - _UNHASHED_TAIL_MAX)
        self._thread = threading.Thread(target=self._run, args=(early_limit,), name="mers-hash", daemon=True)
        self._thread.start()

    def digest(self, length: int) -> bytes:
        """The SHA-256 of the first `length` bytes."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if length < self._done:  # not an image whose tail is short; hash again, exactly
            self._hash, self._done = hashlib.sha256(), 0
        self._hash_until(length)
        return self._hash.digest()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.cancel()

    def _run(self, limit: int) -> None:
        try:
            self._hash_until(limit)
        except InputFileError as error:
            self._error = error

    def _hash_until(self, length: int) -> None:
        view = memoryview(self._buffer)
        while self._done < length and not self._stop.is_set():
            got = os.preadv(self._fd, [view[: min(CHUNK_SIZE, length - self._done)]], self._done)
            if got == 0:
                raise InputFileError(f"the input shrank while being read (at byte {self._done})")
            self._hash.update(view[:got])
            self._done += got

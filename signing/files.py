"""File I/O with the guarantees release engineers rely on: typed errors for unreadable inputs, outputs
that appear whole or not at all, and streaming in fixed chunks so memory never grows with image size."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import InputFileError, OutputFileError
from .output import CHUNK_SIZE, SequentialWriter


@contextmanager
def open_input(path: Path, what: str = "input") -> Iterator[BinaryIO]:
    """Open `path` for reading, or raise an `InputFileError` that says which file and why."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as exc:
        raise InputFileError(f"{what} {path} does not exist", field=what) from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{what} {path} is a directory", field=what) from exc
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror}", field=what) from exc
    with handle:
        yield handle


def file_size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


@contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[SequentialWriter]:
    """Write `path` through a temporary file in the same directory, fsync it, rename it into place and
    fsync the directory: a crash or an error leaves the old file or none, never a partial one."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputFileError(f"cannot write in {directory}: {exc.strerror}") from exc
    temp_path = Path(temporary)
    writer = SequentialWriter(fd, temp_path)
    try:
        yield writer
        writer.close()
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        os.replace(temp_path, path)
    except BaseException as exc:
        writer.abort()
        with contextlib.suppress(OSError):
            os.close(fd)
        temp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputFileError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_prefix(handle: BinaryIO, length: int) -> bytes:
    """SHA-256 of the first `length` bytes of `handle`, read in fixed chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(min(CHUNK_SIZE, max(length, 1)))
    view = memoryview(buffer)
    fd = handle.fileno()
    done = 0
    while done < length:
        got = os.preadv(fd, [view[: min(len(buffer), length - done)]], done)
        if got == 0:
            raise InputFileError(f"the input shrank while being read (at byte {done})")
        digest.update(view[:got])
        done += got
    return digest.digest()

"""Files that appear whole or not at all, and the installer's state directory.

Every persistent write of the board goes through `write_atomically`: a temporary file in the same
directory (created 0600, so a secret is never readable by others even for a moment), written, fsynced,
renamed over the old file, and the directory fsynced so the rename itself survives a power cut. A crash
at any point leaves the old file or the new one, never a mix; an error leaves no temporary file behind.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path

from .errors import InvalidNameError, StorageError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIRECTORY_MODE = 0o700

#: a plain file name: no separators, no `..`, no leading dot (temporaries start with one), bounded length
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def write_atomically(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    """Replace `path` with `data` atomically; see the module docstring for the guarantees."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise StorageError(f"cannot write in {directory}: {exc.strerror}", field=path.name) from exc
    temp_path = Path(temporary)
    try:
        try:
            _write_all(fd, data)
            if mode != SECRET_MODE:  # mkstemp created it 0600 already
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path, path)
    except BaseException as exc:
        temp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {path}: {exc.strerror}", field=path.name) from exc
        raise
    try:
        fsync_directory(directory)
    except OSError as exc:
        raise StorageError(
            f"cannot make the rename of {path} durable: {exc.strerror}", field=path.name
        ) from exc


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files `write_atomically` leaves for `path` when a writer dies before its
    rename. Only call this while holding the lock that serialises writers of `path`."""
    try:
        for debris in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            debris.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot clean up beside {path}: {exc.strerror}", field=path.name) from exc


def remove_durably(path: Path) -> None:
    """Delete `path` (absent is fine) and make the deletion survive a power cut."""
    try:
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror}", field=path.name) from exc


def read_if_present(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist; any other failure is a `StorageError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", field=path.name) from exc


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_directory(directory: Path, mode: int = DIRECTORY_MODE) -> None:
    """Create `directory` (and its parents, with the default mode as `mkdir -p` does) if missing; an
    existing one keeps its mode. Each directory created is fsynced in its parent: a new directory is an
    entry there, and without that fsync a power cut can lose it and the fsynced files written into it."""
    if directory.is_dir():
        return
    ensure_directory(directory.parent, 0o777)
    try:
        directory.mkdir(mode=mode, exist_ok=True)
        fsync_directory(directory.parent)
    except OSError as exc:
        raise StorageError(f"cannot create directory {directory}: {exc.strerror}") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def validate_name(name: str) -> str:
    """A state file name, refusing anything that could leave the directory (`../x`, `/etc/x`, `a/b`), hide
    (`.x`) or collide with our temporaries, or that is not a plain portable name."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"{name!r} is not a state file name (letters, digits, '.', '_', '-'; not starting with '.')"
        )
    return name


class StateDirectory:
    """The installer's persistent files (the `StateStore` of the interface), one atomic file per name.

    The directory is created 0700 on first write; secrets are files created 0600 from the start."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        return self._directory

    def read(self, name: str) -> bytes | None:
        return read_if_present(self._directory / validate_name(name))

    def write(self, name: str, data: bytes) -> None:
        path = self._directory / validate_name(name)
        ensure_directory(self._directory)
        # every state file is 0600 (docs/design.md §4): tokens and journals alike say what the device is doing
        write_atomically(path, data, mode=SECRET_MODE)

    def delete(self, name: str) -> None:
        path = self._directory / validate_name(name)
        if self._directory.is_dir():
            remove_durably(path)

"""Atomic files and the installer's state directory: whole or old, secrets never readable, names contained."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from board.errors import BoardError, InvalidNameError, StorageError
from board.storage import StateDirectory, validate_name, write_atomically
from tests.board_helpers import record_fsyncs


class PowerCut(BaseException):
    """A crash: not an Exception, so no handler of ours may swallow it."""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_an_atomic_write_replaces_the_file_with_exactly_the_new_bytes(tmp_path):
    target = tmp_path / "journal"
    target.write_bytes(b"old")
    write_atomically(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == []


def test_a_crash_between_the_temporary_write_and_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "journal"
    target.write_bytes(b"old")
    written: list[bytes] = []

    def crash(source, destination):
        written.append(Path(source).read_bytes())
        raise PowerCut

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PowerCut):
        write_atomically(target, b"new")
    assert written == [b"new"]  # the new bytes were complete in the temporary file
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failing_rename_is_a_storage_error_naming_the_file_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "journal"
    target.write_bytes(b"old")

    def refuse(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError) as caught:
        write_atomically(target, b"new")
    assert caught.value.field == "journal"
    assert "No space left on device" in str(caught.value)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_write_into_a_missing_directory_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError):
        write_atomically(tmp_path / "absent" / "file", b"x")


def test_a_secret_is_0600_from_its_first_byte_to_its_rename(tmp_path, monkeypatch):
    modes_while_written: list[int] = []
    real_write = os.write

    def spying_write(fd, data):
        modes_while_written.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    state = StateDirectory(tmp_path / "state")
    state.write("credentials.json", b'{"client_secret": "s3cret"}')
    assert modes_while_written and set(modes_while_written) == {0o600}
    assert _mode(tmp_path / "state" / "credentials.json") == 0o600


def test_every_state_file_is_0600_whatever_was_there_before(tmp_path):
    (tmp_path / "token").write_bytes(b"left by someone else")
    (tmp_path / "token").chmod(0o644)
    state = StateDirectory(tmp_path)
    state.write("token", b"secret")
    assert _mode(tmp_path / "token") == 0o600


def test_the_state_directory_is_created_0700_on_the_first_write(tmp_path):
    state = StateDirectory(tmp_path / "var" / "state")
    assert state.read("journal") is None
    assert not (tmp_path / "var").exists()
    state.write("journal", b"{}")
    assert _mode(tmp_path / "var" / "state") == 0o700
    assert state.read("journal") == b"{}"


def test_each_directory_the_first_write_creates_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    """A new directory is an entry in its parent: unless the parent is fsynced, a power cut can lose the
    directory and the fsynced files in it."""
    synced = record_fsyncs(monkeypatch)
    StateDirectory(tmp_path / "var" / "state").write("journal", b"{}")
    root = tmp_path.resolve()
    assert root in synced, "the entry of var"
    assert root / "var" in synced, "the entry of state"


def test_a_deleted_state_file_reads_as_absent_and_deleting_twice_is_fine(tmp_path):
    state = StateDirectory(tmp_path)
    state.write("journal", b"x")
    state.delete("journal")
    state.delete("journal")
    assert state.read("journal") is None
    StateDirectory(tmp_path / "never-created").delete("journal")


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "/etc/passwd",
        "a/b",
        "..",
        ".",
        ".hidden",
        ".journal.abc.tmp",
        "",
        "x" * 129,
        "a\x00b",
        "é",
    ],
)
def test_a_state_name_that_could_leave_the_directory_or_hide_is_refused(tmp_path, name):
    state = StateDirectory(tmp_path / "state")
    with pytest.raises(InvalidNameError) as caught:
        state.write(name, b"x")
    assert caught.value.field == "name"
    with pytest.raises(InvalidNameError):
        state.read(name)
    with pytest.raises(InvalidNameError):
        state.delete(name)
    assert not (tmp_path / "state").exists()


@given(name=st.text(max_size=40))
def test_every_accepted_state_name_stays_inside_the_directory(name):
    directory = Path("/var/lib/mers/state")
    try:
        validate_name(name)
    except InvalidNameError:
        return
    resolved = (directory / name).resolve()
    assert resolved.parent == directory.resolve()
    assert not name.startswith(".")


def test_storage_errors_belong_to_the_board_family():
    assert issubclass(StorageError, BoardError)
    assert issubclass(InvalidNameError, StorageError)

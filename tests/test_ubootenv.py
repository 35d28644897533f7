"""The U-Boot environment: interoperable both ways with Debian's fw_printenv/fw_setenv (libubootenv-tool
0.3.2), safe against power cuts, and never falling back to a default environment.

The tools run as real subprocesses with `-c CONFIG`. They always lock `/var/lock/fw_printenv.lock`; where
a private mount namespace is available (`unshare --mount`), each call sees a test directory bound over
/var/lock instead, so the tests leave the machine's lock directory alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from board.fw_env_config import EnvDevice, FwEnvConfig, parse, render
from board.ubootenv import (
    DEFAULT_LOCK_PATH,
    EnvDeviceError,
    EnvEntries,
    EnvFormatError,
    EnvLockError,
    EnvTooLargeError,
    EnvWriteError,
    InvalidVariableError,
    NoValidEnvironmentError,
    UBootEnv,
    UBootEnvError,
    UnsupportedDeviceError,
    build_copy,
    copy_format,
    create,
    data_size,
    parse_copy,
    parse_variables,
)
from tests.conftest import require_tool

SIZES = [0x4000, 0x20000]
LAYOUTS = ["two files", "one file at offsets", "single copy"]
INITIAL = {"boot_slot": "a", "bootlimit": "3", "upgrade_available": "0"}
_SYSTEM_LOCK_DIR = Path(os.path.realpath(DEFAULT_LOCK_PATH.parent))
_PROPERTIES = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- the real tools -------------------------------------------------------------------------------------


@functools.cache
def _lock_dir_can_be_isolated() -> bool:
    """Whether `unshare --mount` can bind a directory over /var/lock here (root, or user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None or not _SYSTEM_LOCK_DIR.is_dir():
        return False
    with tempfile.TemporaryDirectory() as directory:
        probe = subprocess.run(
            [unshare, "--mount", "sh", "-c", 'mount --bind "$0" "$1"', directory, str(_SYSTEM_LOCK_DIR)],
            capture_output=True,
            check=False,
        )
    return probe.returncode == 0


@dataclass(frozen=True)
class FwTools:
    """fw_printenv and fw_setenv on one config file."""

    printenv_path: str
    setenv_path: str
    config_path: Path
    lock_dir: Path | None  # what the tools see as /var/lock; None: the real one

    @property
    def lock_path(self) -> Path:
        """The lock file the tools take, which our `UBootEnv` must share with them."""
        return DEFAULT_LOCK_PATH if self.lock_dir is None else self.lock_dir / DEFAULT_LOCK_PATH.name

    def command(self, tool: str, *args: str | Path) -> list[str]:
        command = [tool, "-c", str(self.config_path), *map(str, args)]
        if self.lock_dir is None:
            return command
        script = 'mount --bind "$0" "$1" && shift && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", script, str(self.lock_dir), str(_SYSTEM_LOCK_DIR), *command]

    def run(self, tool: str, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.command(tool, *args), capture_output=True, timeout=60, check=False)

    def printenv(self) -> dict[str, str]:
        result = self.run(self.printenv_path)
        assert result.returncode == 0, result.stderr
        assert not result.stderr, result.stderr
        variables = {}
        for line in result.stdout.decode("utf-8", "surrogateescape").splitlines():
            name, _, value = line.partition("=")
            variables[name] = value
        return variables

    def setenv(self, *args: str | Path) -> None:
        result = self.run(self.setenv_path, *args)
        assert result.returncode == 0, result.stderr
        assert not result.stderr, result.stderr


@pytest.fixture
def fw_tools(tmp_path) -> Callable[[FwEnvConfig | str], FwTools]:
    """A factory: the tools on a config (rendered by us, or given as raw text)."""
    printenv = require_tool("fw_printenv")
    setenv = require_tool("fw_setenv")
    lock_dir = None
    if _lock_dir_can_be_isolated():
        lock_dir = tmp_path / "var-lock"
        lock_dir.mkdir()
    made = 0

    def make(config: FwEnvConfig | str) -> FwTools:
        nonlocal made
        made += 1
        path = tmp_path / f"fw_env-{made}.config"
        path.write_text(config if isinstance(config, str) else render(config))
        return FwTools(printenv, setenv, path, lock_dir)

    return make


# --- layouts and raw access -------------------------------------------------------------------------------


def _pattern(length: int) -> bytes:
    return bytes(range(256)) * (length // 256) + bytes(length % 256)


def make_config(directory: Path, layout: str, size: int) -> FwEnvConfig:
    """Two files, a single file holding both copies at non-zero offsets (a flash partition), or one copy."""
    devices: tuple[EnvDevice, ...]
    if layout == "two files":
        devices = (EnvDevice(directory / "env0", 0, size), EnvDevice(directory / "env1", 0, size))
    elif layout == "one file at offsets":
        partition = directory / "flash.img"
        partition.write_bytes(_pattern(5 * size))  # other data shares the partition
        devices = (EnvDevice(partition, size, size), EnvDevice(partition, 3 * size, size))
    else:
        devices = (EnvDevice(directory / "env", 0x200, size),)
    return FwEnvConfig(devices)


def outside_copies(config: FwEnvConfig) -> bytes:
    """The bytes of the shared partition that belong to no copy."""
    data = bytearray(config.devices[0].device.read_bytes())
    for device in sorted(config.devices, key=lambda device: -device.offset):
        del data[device.offset : device.offset + device.size]
    return bytes(data)


def raw_copy(device: EnvDevice) -> bytes:
    with open(device.device, "rb") as file:
        file.seek(device.offset)
        return file.read(device.size)


def put_raw(device: EnvDevice, blob: bytes, position: int = 0) -> None:
    with open(device.device, "r+b") as file:
        file.seek(device.offset + position)
        file.write(blob)


def flip_byte(device: EnvDevice, position: int) -> None:
    put_raw(device, bytes([raw_copy(device)[position] ^ 0x5A]), position)


def copy_variables(config: FwEnvConfig, index: int) -> dict[str, str] | None:
    """The variables one copy holds, or None if its CRC is bad."""
    parsed = parse_copy(raw_copy(config.devices[index]), config.redundant)
    return parse_variables(parsed.data) if parsed.crc_valid else None


def snapshot(config: FwEnvConfig) -> dict[Path, bytes]:
    return {device.device: device.device.read_bytes() for device in config.devices}


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "our-lock" / "fw_printenv.lock"


@pytest.fixture
def redundant(tmp_path, lock_path) -> tuple[FwEnvConfig, UBootEnv]:
    """A fresh redundant 16 KiB environment in two files, holding INITIAL."""
    lock_path.parent.mkdir(exist_ok=True)
    config = make_config(tmp_path, "two files", 0x4000)
    return config, create(config, INITIAL, lock_path=lock_path)


# --- interoperability, both ways ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=hex)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_variables_we_write_are_read_by_fw_printenv(tmp_path, fw_tools, lock_path, layout, size):
    config = make_config(tmp_path, layout, size)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)
    assert tools.printenv() == INITIAL

    env.write({"boot_slot": "b", "upgrade_available": "1", "bootcount": "0", "bootlimit": None})

    expected = {"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"}
    assert tools.printenv() == expected
    assert env.read() == expected


@pytest.mark.parametrize("size", SIZES, ids=hex)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_variables_fw_setenv_writes_are_read_by_us(tmp_path, fw_tools, layout, size):
    config = make_config(tmp_path, layout, size)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)

    tools.setenv("boot_slot", "b")
    assert env.read() == {**INITIAL, "boot_slot": "b"}

    script = tmp_path / "transition.txt"
    script.write_text("# one transition\nupgrade_available=1\nbootcount=0\nboot_slot=a\n")
    tools.setenv("-s", script)
    assert env.read() == {**INITIAL, "boot_slot": "a", "upgrade_available": "1", "bootcount": "0"}

    tools.setenv("bootcount")  # a name alone deletes
    script.write_text("upgrade_available=\n")  # so does an empty value in a script
    tools.setenv("-s", script)
    assert env.read() == {"boot_slot": "a", "bootlimit": "3"}
    if config.redundant:
        assert sum(copy.current for copy in env.copies()) == 1


@pytest.mark.parametrize("size", SIZES, ids=hex)
def test_bytes_of_the_partition_outside_the_copies_are_never_touched(tmp_path, fw_tools, size):
    config = make_config(tmp_path, "one file at offsets", size)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)
    before = outside_copies(config)
    assert before == _pattern(3 * size)

    for value in ("b", "a", "b"):
        env.write({"boot_slot": value})
        tools.setenv("bootcount", value)

    assert outside_copies(config) == before
    assert env.read() == tools.printenv() == {**INITIAL, "boot_slot": "b", "bootcount": "b"}


def test_our_entries_are_in_the_order_fw_setenv_writes_them(tmp_path, fw_tools, lock_path):
    names = ["zeta", "Alpha", "boot_slot", "_x", "bootcount", "a.b", "upgrade_available", "0start"]
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours_config = make_config(tmp_path / "ours", "two files", 0x4000)
    theirs_config = make_config(tmp_path / "theirs", "two files", 0x4000)
    tools = fw_tools(theirs_config)
    create(theirs_config, {}, lock_path=tools.lock_path)
    script = tmp_path / "vars.txt"
    script.write_text("".join(f"{name}={index}\n" for index, name in enumerate(names)))
    tools.setenv("-s", script)
    ours = create(ours_config, {}, lock_path=tools.lock_path)
    ours.write({name: str(index) for index, name in enumerate(names)})

    def entry_order(config: FwEnvConfig) -> list[bytes]:
        current = next(copy.index for copy in UBootEnv(config, tools.lock_path).copies() if copy.current)
        data = parse_copy(raw_copy(config.devices[current]), redundant=True).data
        return [bytes(entry) for entry in EnvEntries.parse(data)]

    assert entry_order(ours_config) == entry_order(theirs_config)
    assert entry_order(ours_config)[:-1] == sorted(entry_order(ours_config)[:-1])


@pytest.mark.parametrize(
    "text",
    [
        "{f} 010 4000\n{f} 0x4010 0x4000\n",  # octal offset, hex size without 0x
        "# gateway env\n\n{f}\t16\t0X4000 # first\n \t\n{f} 0x8000 4000 1000 4\n",
        "{f} 0 4000\n",
    ],
    ids=["octal and bare hex", "comments, tabs, sector fields", "single copy"],
)
def test_both_tools_find_the_environment_where_the_config_text_says(tmp_path, fw_tools, text):
    partition = tmp_path / "flash.img"
    partition.write_bytes(bytes(0x10000))
    text = text.format(f=partition)
    tools = fw_tools(text)
    env = create(parse(text), INITIAL, lock_path=tools.lock_path)

    env.write({"bootcount": "2"})
    assert tools.printenv() == {**INITIAL, "bootcount": "2"}
    tools.setenv("bootcount", "3")
    assert env.read() == {**INITIAL, "bootcount": "3"}


def test_an_indented_hash_line_is_a_second_copy_for_both_tools(tmp_path, fw_tools, monkeypatch):
    """libubootenv skips only a line whose first character is '#'; an indented `#name` is a device."""
    monkeypatch.chdir(tmp_path)  # no absolute path starts with '#', so the device is relative
    partition = tmp_path / "flash.img"
    text = f"{partition} 0 4000\n   #flash.img 0 4000\n"
    tools = fw_tools(text)
    env = create(parse(text), INITIAL, lock_path=tools.lock_path)
    assert Path("#flash.img").stat().st_size == 0x4000

    env.write({"bootcount": "2"})
    assert tools.printenv() == {**INITIAL, "bootcount": "2"}
    tools.setenv("bootcount", "3")
    assert env.read() == {**INITIAL, "bootcount": "3"}


# --- choosing the current copy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "current"),
    [
        ((255, 0), 1),  # 0 was written after 255: the wrap
        ((0, 255), 0),
        ((7, 7), 0),  # equal flags pick copy 0
        ((1, 2), 1),
        ((2, 1), 0),
        ((254, 255), 1),
        ((0, 254), 1),  # only 0 against 255 is a wrap
        ((1, 255), 1),
    ],
)
def test_both_tools_pick_the_same_current_copy_from_the_flags(tmp_path, fw_tools, lock_path, flags, current):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    for index, device in enumerate(config.devices):
        device.device.write_bytes(build_copy({"v": f"copy{index}"}, 0x4000, flags=flags[index]))
    env = UBootEnv(config, tools.lock_path)

    assert env.read() == tools.printenv() == {"v": f"copy{current}"}
    assert [copy.current for copy in env.copies()] == [index == current for index in range(2)]


def test_flags_wrap_from_255_to_0_in_our_writes_and_fw_setenv_follows(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    config.devices[0].device.write_bytes(build_copy({"v": "older"}, 0x4000, flags=254))
    config.devices[1].device.write_bytes(build_copy({"v": "newest"}, 0x4000, flags=255))
    env = UBootEnv(config, tools.lock_path)

    env.write({"v": "ours"})
    assert [(copy.flags, copy.current) for copy in env.copies()] == [(0, True), (255, False)]
    assert tools.printenv() == {"v": "ours"}

    tools.setenv("v", "theirs")
    assert [(copy.flags, copy.current) for copy in env.copies()] == [(0, False), (1, True)]
    assert env.read() == {"v": "theirs"}


def test_flags_wrap_from_255_to_0_in_fw_setenv_writes_and_we_follow(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    config.devices[0].device.write_bytes(build_copy({"v": "newest"}, 0x4000, flags=255))
    config.devices[1].device.write_bytes(build_copy({"v": "older"}, 0x4000, flags=254))
    env = UBootEnv(config, tools.lock_path)

    tools.setenv("v", "theirs")
    assert [(copy.flags, copy.current) for copy in env.copies()] == [(255, False), (0, True)]
    assert env.read() == {"v": "theirs"}

    env.write({"v": "ours"})
    assert [(copy.flags, copy.current) for copy in env.copies()] == [(1, True), (0, False)]
    assert tools.printenv() == {"v": "ours"}


# --- one write, power cuts, corruption ---------------------------------------------------------------------


def test_one_write_changes_several_variables_in_the_other_copy_with_flags_plus_one(redundant):
    config, env = redundant
    assert [(copy.flags, copy.current) for copy in env.copies()] == [(1, True), (0, False)]

    env.write({"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"})

    assert [(copy.crc_valid, copy.flags, copy.current) for copy in env.copies()] == [
        (True, 1, False),
        (True, 2, True),
    ]
    assert copy_variables(config, 0) == INITIAL
    assert copy_variables(config, 1) == {
        **INITIAL,
        "boot_slot": "b",
        "upgrade_available": "1",
        "bootcount": "0",
    }


@pytest.mark.parametrize("position", [0, 3, 5, 200, 0x3FFF], ids=lambda p: f"byte {p}")  # 4 is the flags
def test_after_corrupting_the_newest_copy_both_we_and_fw_printenv_read_the_older_one(
    tmp_path, fw_tools, position
):
    config = make_config(tmp_path, "one file at offsets", 0x4000)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)
    env.write({"boot_slot": "b"})
    newest = next(copy for copy in env.copies() if copy.current)

    flip_byte(config.devices[newest.index], position)

    assert env.read() == INITIAL
    assert tools.printenv() == INITIAL
    assert [copy.crc_valid for copy in env.copies()] == [newest.index != 0, newest.index != 1]


def test_the_flags_byte_is_outside_the_crc_for_both_tools(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)
    env.write({"boot_slot": "b"})

    put_raw(config.devices[0], bytes([9]), 4)  # the older copy now claims to be newer

    assert [(copy.crc_valid, copy.flags, copy.current) for copy in env.copies()] == [
        (True, 9, True),
        (True, 2, False),
    ]
    assert env.read() == tools.printenv() == INITIAL


def test_with_both_copies_bad_we_raise_and_write_nothing_while_fw_printenv_uses_a_default(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)
    for device in config.devices:
        flip_byte(device, 100)
    before = snapshot(config)

    with pytest.raises(NoValidEnvironmentError) as caught:
        env.read()
    assert "no copy of the U-Boot environment has a valid CRC" in str(caught.value)
    with pytest.raises(NoValidEnvironmentError):
        env.write({"boot_slot": "b"})
    assert not any(copy.current for copy in env.copies())
    assert snapshot(config) == before

    result = tools.run(tools.printenv_path)
    assert b"Cannot read environment, using default" in result.stderr
    assert snapshot(config) == before


def test_a_single_copy_with_a_bad_crc_raises_and_is_not_rewritten(tmp_path, lock_path):
    lock_path.parent.mkdir()
    config = make_config(tmp_path, "single copy", 0x4000)
    env = create(config, INITIAL, lock_path=lock_path)
    flip_byte(config.devices[0], 4)
    before = snapshot(config)
    with pytest.raises(NoValidEnvironmentError):
        env.write({"boot_slot": "b"})
    assert snapshot(config) == before


def test_a_write_torn_by_a_power_cut_leaves_the_previous_variables_for_both_tools(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)

    with _power_cut_after(100), pytest.raises(EnvWriteError) as caught:
        env.write({"boot_slot": "b", "upgrade_available": "1", "big": "x" * 1000})

    assert "may be torn" in str(caught.value)
    assert caught.value.field == str(config.devices[1].device)
    assert env.read() == tools.printenv() == INITIAL
    assert [copy.crc_valid for copy in env.copies()] == [True, False]
    env.write({"boot_slot": "b"})  # the torn copy is simply the next one written
    assert tools.printenv() == {**INITIAL, "boot_slot": "b"}


@contextlib.contextmanager
def _power_cut_after(length: int) -> Iterator[None]:
    """The next pwrite persists only its first `length` bytes, then the power goes (an I/O error)."""
    real_pwrite = os.pwrite

    def torn(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, bytes(data[:length]), offset)
        raise OSError(errno.EIO, "power cut")

    with mock.patch.object(os, "pwrite", torn):
        yield


# --- what the data area may hold ------------------------------------------------------------------------


def _copy_with_data(data: bytes, flags: int, size: int = 0x4000) -> bytes:
    area = data + bytes(data_size(size, True) - len(data))
    return bytes(copy_format(size, True).build({"flags": flags, "data": area}))


def test_entries_without_a_separator_are_skipped_and_the_last_duplicate_wins_as_in_fw_printenv(
    tmp_path, fw_tools
):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    config.devices[0].device.write_bytes(_copy_with_data(b"b=1\0noequals\0b=2\0c=x=y\0\0", 1))
    config.devices[1].device.write_bytes(_copy_with_data(b"\0", 0))
    env = UBootEnv(config, tools.lock_path)

    assert env.read() == tools.printenv() == {"b": "2", "c": "x=y"}


def test_a_current_copy_whose_last_entry_has_no_nul_is_an_error_for_both_tools(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    config.devices[0].device.write_bytes(_copy_with_data(b"a" * data_size(0x4000, True), 2))
    config.devices[1].device.write_bytes(_copy_with_data(b"v=1\0\0", 1))
    env = UBootEnv(config, tools.lock_path)
    before = snapshot(config)

    with pytest.raises(EnvFormatError):
        env.read()
    with pytest.raises(EnvFormatError):
        env.write({"v": "2"})
    assert b"Cannot read environment" in tools.run(tools.printenv_path).stderr
    assert snapshot(config) == before


def test_bytes_that_are_not_utf8_survive_a_rewrite(redundant):
    config, env = redundant
    put_raw(config.devices[0], _copy_with_data(b"raw=\xff\xfe\0\0", 5))
    value = env.read()["raw"]
    env.write({"other": "1"})
    assert copy_variables(config, 1) == {"raw": value, "other": "1"}
    assert parse_copy(raw_copy(config.devices[1]), True).data.startswith(b"other=1\0raw=\xff\xfe\0\0")


# --- validation: refused before anything is written ---------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"": "x"}, ""),
        ({"a=b": "x"}, "a=b"),
        ({"a\0b": "x"}, "a\0b"),
        ({"name": "x\0y"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "\ud800"}, "name"),
    ],
    ids=["empty name", "= in name", "NUL in name", "NUL in value", "empty value", "unencodable value"],
)
def test_invalid_names_and_values_are_refused_before_anything_is_written(redundant, changes, field):
    config, env = redundant
    before = snapshot(config)
    with pytest.raises(InvalidVariableError) as caught:
        env.write({"boot_slot": "b", **changes})
    assert caught.value.field == (field or "name")
    assert snapshot(config) == before


@pytest.mark.parametrize("layout", ["two files", "single copy"])
def test_variables_that_exactly_fill_the_area_are_written_and_one_byte_more_is_refused(
    tmp_path, fw_tools, layout
):
    config = make_config(tmp_path, layout, 0x4000)
    tools = fw_tools(config)
    env = create(config, {}, lock_path=tools.lock_path)
    room = env.data_size - len("v=") - 2  # the entry's NUL and the end marker

    env.write({"v": "x" * room})
    assert tools.printenv() == {"v": "x" * room}

    before = snapshot(config)
    with pytest.raises(EnvTooLargeError) as caught:
        env.write({"v": "x" * (room + 1)})
    assert caught.value.field == "size"
    assert snapshot(config) == before

    # fw_setenv refuses two bytes more; one byte more it accepts (its size check is one byte short) and
    # writes an area whose last entry takes the end marker's byte, which we read (libubootenv itself
    # reads one byte past the copy there, so whether it can read its own output is luck)
    refused = tools.run(tools.setenv_path, "v", "y" * (room + 2))
    assert b"Error storing the env" in refused.stderr
    assert refused.returncode != 0
    assert snapshot(config) == before
    tools.setenv("v", "y" * (room + 1))
    assert env.read() == {"v": "y" * (room + 1)}


# --- devices and the lock -------------------------------------------------------------------------------


def test_a_missing_device_is_a_device_error(tmp_path, lock_path):
    lock_path.parent.mkdir()
    config = FwEnvConfig(
        (EnvDevice(tmp_path / "absent0", 0, 0x4000), EnvDevice(tmp_path / "absent1", 0, 0x4000))
    )
    env = UBootEnv(config, lock_path)
    with pytest.raises(EnvDeviceError) as caught:
        env.read()
    assert caught.value.field == str(tmp_path / "absent0")
    with pytest.raises(EnvDeviceError):
        env.write({"a": "1"})
    assert not (tmp_path / "absent0").exists()


def test_a_device_shorter_than_its_copy_is_a_device_error(redundant):
    config, env = redundant
    os.truncate(config.devices[1].device, 0x4000 - 1)
    with pytest.raises(EnvDeviceError, match="ends before"):
        env.read()


@pytest.mark.parametrize("device", ["/dev/mtd0", "/dev/ubi0_1"])
def test_raw_flash_devices_are_refused_up_front(device):
    with pytest.raises(UnsupportedDeviceError):
        UBootEnv(FwEnvConfig((EnvDevice(Path(device), 0, 0x4000),)))


def test_a_symlink_to_raw_flash_is_refused_too(tmp_path):
    (tmp_path / "env").symlink_to("/dev/mtd7")
    with pytest.raises(UnsupportedDeviceError):
        UBootEnv(FwEnvConfig((EnvDevice(tmp_path / "env", 0, 0x4000),)))


def test_a_negative_offset_on_a_regular_file_is_refused(tmp_path, lock_path):
    lock_path.parent.mkdir()
    (tmp_path / "env").write_bytes(bytes(0x8000))
    env = UBootEnv(FwEnvConfig((EnvDevice(tmp_path / "env", -0x4000, 0x4000),)), lock_path)
    with pytest.raises(UnsupportedDeviceError, match="block device"):
        env.read()


def test_a_lock_file_that_cannot_be_created_is_a_lock_error(tmp_path):
    config = make_config(tmp_path, "two files", 0x4000)
    with pytest.raises(EnvLockError) as caught:
        create(config, INITIAL, lock_path=tmp_path / "no-such-dir" / "fw_printenv.lock")
    assert caught.value.field == "lock"
    assert not config.devices[0].device.exists()


def test_the_default_lock_is_the_one_libubootenv_hard_codes():
    assert UBootEnv(FwEnvConfig((EnvDevice(Path("env"), 0, 0x10),))).lock_path == Path(
        "/var/lock/fw_printenv.lock"
    )


def _wait_until_someone_waits_for(lock_file: Path) -> None:
    """Poll /proc/locks (with a deadline) until another open file waits for a flock on `lock_file`."""
    inode = f":{lock_file.stat().st_ino}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and fields[-3].endswith(inode):
                return
    pytest.fail(f"nobody waited for {lock_file}")


@contextlib.contextmanager
def _holding(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_our_write_waits_for_the_lock_and_then_sees_the_latest_environment(redundant, lock_path):
    config, env = redundant
    with _holding(lock_path):
        writer = threading.Thread(target=env.write, args=({"bootcount": "1"},))
        writer.start()
        _wait_until_someone_waits_for(lock_path)
        # what a concurrent fw_setenv does while it holds the lock:
        UBootEnv(config, lock_path=lock_path.parent / "other.lock").write({"boot_slot": "b"})
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert env.read() == {**INITIAL, "boot_slot": "b", "bootcount": "1"}


def test_fw_setenv_waits_for_the_lock_we_take(tmp_path, fw_tools):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    if tools.lock_dir is None and not _SYSTEM_LOCK_DIR.is_dir():
        pytest.skip("fw_setenv runs without a lock where /var/lock does not exist")
    env = create(config, INITIAL, lock_path=tools.lock_path)
    with _holding(tools.lock_path):
        setenv = subprocess.Popen(tools.command(tools.setenv_path, "bootcount", "1"), stderr=subprocess.PIPE)
        _wait_until_someone_waits_for(tools.lock_path)
        env_while_waiting = copy_variables(config, 1)
        # stands for a write of ours in progress under that lock (made here without taking it again)
        UBootEnv(config, lock_path=tmp_path / "bypass.lock").write({"boot_slot": "b"})
    assert setenv.wait(timeout=30) == 0
    assert env_while_waiting == INITIAL
    assert env.read() == {**INITIAL, "boot_slot": "b", "bootcount": "1"}


# --- create ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=hex)
def test_a_fresh_environment_has_two_valid_copies_with_copy_0_current(tmp_path, fw_tools, size):
    config = make_config(tmp_path, "two files", size)
    tools = fw_tools(config)
    env = create(config, INITIAL, lock_path=tools.lock_path)

    assert [(c.crc_valid, c.flags, c.current) for c in env.copies()] == [(True, 1, True), (True, 0, False)]
    assert [device.device.stat().st_size for device in config.devices] == [size, size]
    assert copy_variables(config, 1) == INITIAL
    assert tools.printenv() == INITIAL


def test_a_single_copy_is_rewritten_in_place_without_flags(tmp_path, lock_path):
    lock_path.parent.mkdir()
    config = make_config(tmp_path, "single copy", 0x4000)
    env = create(config, INITIAL, lock_path=lock_path)
    env.write({"bootcount": "1"})
    assert [(c.crc_valid, c.flags, c.current) for c in env.copies()] == [(True, None, True)]
    assert config.devices[0].device.stat().st_size == 0x200 + 0x4000


# --- properties ------------------------------------------------------------------------------------------

_names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="=\0"), min_size=1, max_size=12)
_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40)
_variables = st.dictionaries(_names, _values, max_size=20)
# what survives fw_printenv's name=value lines and a fw_setenv script
_tool_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="=#"),
    min_size=1,
    max_size=12,
)
_tool_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
)


@_PROPERTIES
@given(variables=_variables)
def test_any_valid_variables_round_trip_through_write_and_read(tmp_path, lock_path, variables):
    lock_path.parent.mkdir(exist_ok=True)
    env = create(make_config(tmp_path, "two files", 0x4000), {}, lock_path=lock_path)
    env.write(variables)
    assert env.read() == variables


@settings(_PROPERTIES, max_examples=25)
@given(variables=st.dictionaries(_tool_names, _tool_values, max_size=10))
def test_any_printable_variables_we_write_are_read_by_fw_printenv(tmp_path, fw_tools, variables):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    env = create(config, {"keep": "me"}, lock_path=tools.lock_path)
    env.write(variables)
    assert tools.printenv() == {"keep": "me", **variables}


@settings(_PROPERTIES, max_examples=25)
@given(variables=st.dictionaries(_tool_names, _tool_values, max_size=10))
def test_any_printable_variables_fw_setenv_writes_are_read_by_us(tmp_path, fw_tools, variables):
    config = make_config(tmp_path, "two files", 0x4000)
    tools = fw_tools(config)
    env = create(config, {"keep": "me"}, lock_path=tools.lock_path)
    script = tmp_path / "script.txt"
    script.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
    tools.setenv("-s", script)
    assert env.read() == {"keep": "me", **variables}


@_PROPERTIES
@given(
    first=st.binary(max_size=80),
    second=st.binary(max_size=80),
    size=st.integers(1, 64),
    two_copies=st.booleans(),
)
def test_arbitrary_bytes_in_the_copies_are_read_or_refused_with_our_error(
    tmp_path, lock_path, first, second, size, two_copies
):
    lock_path.parent.mkdir(exist_ok=True)
    (tmp_path / "env0").write_bytes(first)
    (tmp_path / "env1").write_bytes(second)
    devices = (EnvDevice(tmp_path / "env0", 0, size), EnvDevice(tmp_path / "env1", 0, size))
    try:
        env = UBootEnv(FwEnvConfig(devices if two_copies else devices[:1]), lock_path)
        variables = env.read()
    except UBootEnvError:
        return
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in variables.items())


@_PROPERTIES
@given(
    areas=st.lists(st.binary(min_size=59, max_size=59), min_size=2, max_size=2),
    flags=st.lists(st.integers(0, 255), min_size=2, max_size=2),
)
def test_arbitrary_data_areas_with_valid_crcs_are_read_or_refused_with_our_error(
    tmp_path, lock_path, areas, flags
):
    lock_path.parent.mkdir(exist_ok=True)
    config = FwEnvConfig((EnvDevice(tmp_path / "env0", 0, 64), EnvDevice(tmp_path / "env1", 0, 64)))
    for device, area, flag in zip(config.devices, areas, flags, strict=True):
        device.device.write_bytes(copy_format(64, True).build({"flags": flag, "data": area}))
    env = UBootEnv(config, lock_path)
    try:
        variables = env.read()
    except EnvFormatError:
        return
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in variables.items())


_changes = st.dictionaries(
    st.sampled_from(["boot_slot", "bootcount", "upgrade_available", "x"]), st.none() | _values
)


@_PROPERTIES
@given(writes=st.lists(_changes, min_size=1, max_size=8))
def test_a_sequence_of_writes_leaves_the_last_variables_current_and_the_previous_in_the_other_copy(
    tmp_path, lock_path, writes
):
    lock_path.parent.mkdir(exist_ok=True)
    config = make_config(tmp_path, "one file at offsets", 0x4000)
    env = create(config, INITIAL, lock_path=lock_path)
    model = dict(INITIAL)
    for changes in writes:
        previous = dict(model)
        model = {name: value for name, value in {**model, **changes}.items() if value is not None}
        env.write(changes)
        assert env.read() == model
        other = next(copy.index for copy in env.copies() if not copy.current)
        assert copy_variables(config, other) == previous


@_PROPERTIES
@given(
    earlier=_changes,
    changes=_changes,
    persisted=st.integers(0, 300) | st.integers(0, 0x4000 - 1),  # most cuts where the entries are
)
def test_a_write_torn_anywhere_leaves_the_previous_or_the_complete_new_variables(
    tmp_path, lock_path, earlier, changes, persisted
):
    lock_path.parent.mkdir(exist_ok=True)
    config = make_config(tmp_path, "two files", 0x4000)
    env = create(config, INITIAL, lock_path=lock_path)
    env.write(earlier)
    previous = env.read()
    new = {name: value for name, value in {**previous, **changes}.items() if value is not None}
    current_before = next(copy.index for copy in env.copies() if copy.current)

    with _power_cut_after(persisted), pytest.raises(EnvWriteError):
        env.write(changes)

    copies = env.copies()
    assert copies[current_before].crc_valid
    assert copy_variables(config, current_before) == previous
    torn = copies[1 - current_before]
    event("the torn copy is complete and current" if torn.current else "the previous copy stays current")
    # a torn copy becomes current only if every byte of the new copy made it (it then is the new copy)
    assert env.read() == (new if torn.current else previous)
    if persisted <= 4:  # not even the flags byte made it: the torn copy cannot claim to be newer
        assert not torn.current

"""The TOML-configured gateway board: every field checked and named, paths relative to the file, the running
slot from the kernel command line, the boot environment's errors in the board's family, reboot commands."""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from board.errors import BoardError, BootEnvError, ConfigError, RebootError, RunningSlotUnknownError
from board.gateway import (
    DEFAULT_REBOOT_COMMAND,
    KNOWN_KEYS,
    GatewayBoard,
    load_config,
    parse_config,
    parse_size,
    render_config,
)
from board.interface import Identity, SlotName
from board.ubootenv import NoValidEnvironmentError
from tests.board_helpers import der, write_gateway

REPO = Path(__file__).resolve().parent.parent

EXAMPLE = Path(__file__).parent.parent / "board" / "gateway.example.toml"


def example_document() -> dict[str, Any]:
    document = tomllib.loads(EXAMPLE.read_text())
    del document["identity"]["serial_number_file"]
    document["identity"]["serial_number"] = "GW-0001"
    return document


# --- configuration ---------------------------------------------------------------------------------


def test_the_example_configuration_reads_with_every_documented_field():
    config = parse_config(example_document(), Path("/etc/mers"))
    assert config.identity == Identity("GW-0001", "Acme", "gw-100", "B")
    assert config.slot_a.device == Path("/dev/mmcblk0p2")
    assert config.slot_b.size == 512 << 20
    assert config.fw_env_config == Path("/etc/fw_env.config")
    assert config.env_lock_file == Path("/var/lock/fw_printenv.lock")
    assert (config.cmdline, config.slot_parameter) == (Path("/proc/cmdline"), "mers.slot")
    assert config.reboot_command == DEFAULT_REBOOT_COMMAND
    assert config.reboot_request_file is None


def test_every_key_of_the_example_is_described_in_the_module_docstring():
    import board.gateway

    document = tomllib.loads(EXAMPLE.read_text())
    keys = [f"{table}.{key}" for table, values in document.items() for key in values if table != "slots"]
    keys += [f"slots.a.{key}" for key in document["slots"]["a"]]
    for key in keys:
        assert key in (board.gateway.__doc__ or ""), key


def test_relative_paths_are_relative_to_the_configuration_file(tmp_path):
    config = load_config(write_gateway(tmp_path))
    assert config.state_dir == tmp_path / "state"
    assert config.key_store == tmp_path / "otp" / "keystore.json"
    assert config.slot_a.device == tmp_path / "slot-a"


def test_a_rendered_configuration_reads_back_the_same(tmp_path):
    config = load_config(write_gateway(tmp_path))
    (tmp_path / "again.toml").write_text(render_config(config, tmp_path))
    assert load_config(tmp_path / "again.toml") == config


def _without(table: str, key: str):
    def change(document: dict[str, Any]) -> None:
        del document[table][key]

    return change


def _misspelt(path: str, as_written: str):
    """The key at `path` written as `as_written` (a typo), its value kept."""

    def change(document: dict[str, Any]) -> None:
        *tables, key = path.split(".")
        target = document
        for table in tables:
            target = target[table]
        target[as_written] = target.pop(key)

    return change


def _setting(path: str, value: object):
    def change(document: dict[str, Any]) -> None:
        *tables, key = path.split(".")
        target = document
        for table in tables:
            target = target.setdefault(table, {})
        target[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_without("identity", "vendor"), "identity.vendor"),
        (_without("identity", "class"), "identity.class"),
        (_without("identity", "serial_number"), "identity.serial_number"),
        (_setting("identity.serial_number_file", "/sys/serial"), "identity.serial_number"),
        (_setting("identity.serial_number", ""), "identity.serial_number"),
        (_setting("identity.vendor", 7), "identity.vendor"),
        (_setting("identity.colour", "red"), "identity.colour"),
        (_without("storage", "state_dir"), "storage.state_dir"),
        (_without("storage", "key_store"), "storage.key_store"),
        (_setting("storage.extra", "x"), "storage.extra"),
        (lambda d: d["slots"].pop("b"), "slots.b"),
        (lambda d: d["slots"]["a"].pop("device"), "slots.a.device"),
        (lambda d: d["slots"]["a"].pop("record"), "slots.a.record"),
        (_setting("slots.a.size", "lots"), "slots.a.size"),
        (_setting("slots.a.size", 0), "slots.a.size"),
        (_setting("slots.a.size", -5), "slots.a.size"),
        (_setting("slots.a.size", True), "slots.a.size"),
        (_setting("slots.a.sise", "1MiB"), "slots.a.sise"),
        (_setting("slots.c", {"device": "x", "record": "y"}), "slots.c"),
        (_setting("slots.b.device", "/dev/mmcblk0p2"), "slots.b"),
        (_without("boot", "fw_env_config"), "boot.fw_env_config"),
        (_setting("boot.slot_parameter", "mers slot"), "boot.slot_parameter"),
        (_setting("reboot.command", []), "reboot.command"),
        (_setting("reboot.command", "systemctl reboot"), "reboot.command"),
        (_setting("reboot.when", "now"), "reboot.when"),
        (_setting("extra", {"x": 1}), "extra"),
        (lambda d: d.pop("boot"), "boot"),
        # a misspelt required key is named as the fault, not the key it was meant to be
        (_misspelt("slots.a.device", "devcie"), "slots.a.devcie"),
        (_misspelt("storage.state_dir", "state_dirr"), "storage.state_dirr"),
        (_misspelt("identity.serial_number", "serial_numbr"), "identity.serial_numbr"),
        (_misspelt("boot", "boto"), "boto"),
    ],
)
def test_a_wrong_configuration_is_refused_naming_the_key(change, field):
    document = example_document()
    change(document)
    with pytest.raises(ConfigError) as caught:
        parse_config(document, Path("/etc/mers"))
    assert caught.value.field == field


def test_every_key_the_example_file_uses_is_a_known_key():
    """What tells a misspelt key from one read later: it must hold every key of the file format."""

    def keys(table: dict[str, Any]) -> set[str]:
        found = set(table)
        for value in table.values():
            if isinstance(value, dict):
                found |= keys(value)
        return found

    example = tomllib.loads((REPO / "board" / "gateway.example.toml").read_text())
    assert keys(example) | {"serial_number", "serial_number_file", "request_file"} <= KNOWN_KEYS


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[identity\n")
    with pytest.raises(ConfigError, match="not TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_the_serial_number_may_come_from_a_device_tree_file(tmp_path):
    (tmp_path / "serial-number").write_bytes(b"GW-0042\x00")
    document = example_document()
    del document["identity"]["serial_number"]
    document["identity"]["serial_number_file"] = "serial-number"
    assert parse_config(document, tmp_path).identity.serial_number == "GW-0042"
    (tmp_path / "serial-number").write_bytes(b"\x00\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(document, tmp_path)
    assert caught.value.field == "identity.serial_number_file"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("64MiB", 64 << 20),
        ("64M", 64 << 20),
        ("1 GiB", 1 << 30),
        ("8Ki", 8192),
    ],
)
def test_sizes_are_bytes_or_binary_units(text, size):
    assert parse_size(text, "size") == size


@given(st.integers(1, 1 << 20), st.sampled_from(["", "K", "KiB", "M", "MiB", "G", "GiB"]))
def test_a_size_with_a_unit_is_that_many_units(number, unit):
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[:1]]
    assert parse_size(f"{number}{unit}", "size") == number * factor


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5MiB", "12 apples", "MiB", "1e6"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ConfigError):
        parse_size(text, "slots.a.size")


# --- the board -------------------------------------------------------------------------------------


def test_a_gateway_board_reads_its_slots_and_running_slot(tmp_path):
    board = GatewayBoard.from_toml(write_gateway(tmp_path))
    assert board.identity.serial_number == "GW-7"
    assert board.slot(SlotName.A).size == 8192  # the device's size
    assert board.slot(SlotName.B).size == 4096  # as configured
    assert board.active_slot() is SlotName.A
    assert board.inactive_slot() is SlotName.B


def test_a_gateway_board_writes_its_otp_and_state_where_configured(tmp_path):
    board = GatewayBoard.from_toml(write_gateway(tmp_path))
    board.write_key(0, der())
    board.state.write("journal", b"{}")
    assert (tmp_path / "otp" / "keystore.json").exists()
    assert (tmp_path / "state" / "journal").read_bytes() == b"{}"


def test_the_first_install_creates_the_directory_of_the_slot_records(tmp_path):
    """A gateway fresh from the factory has no slot records, and maybe not their directory either."""
    config = write_gateway(tmp_path)
    config.write_text(config.read_text().replace('record = "b.record"', 'record = "records/b.record"'))
    board = GatewayBoard.from_toml(config)
    with board.open_inactive_slot_for_writing() as slot:
        slot.write(b"payload")
    assert (tmp_path / "records" / "b.record").is_file()


@pytest.mark.parametrize("cmdline", ["quiet root=/dev/sda", "mers.slot=c", "xmers.slot=a", ""])
def test_a_command_line_that_does_not_name_a_slot_leaves_the_running_slot_unknown(tmp_path, cmdline):
    board = GatewayBoard.from_toml(write_gateway(tmp_path, cmdline=cmdline))
    assert board.running_slot() is None
    with pytest.raises(RunningSlotUnknownError):
        board.open_inactive_slot_for_writing()


def test_the_slot_parameter_name_is_configurable(tmp_path):
    config = write_gateway(tmp_path, extra='slot_parameter = "rauc.slot"', cmdline="rauc.slot=b mers.slot=a")
    assert GatewayBoard.from_toml(config).running_slot() is SlotName.B


def test_a_boot_environment_with_no_valid_copy_is_a_board_error(tmp_path):
    board = GatewayBoard.from_toml(write_gateway(tmp_path))
    for name in ("env0", "env1"):
        (tmp_path / name).write_bytes(b"\xff" * 0x2000)
    with pytest.raises(NoValidEnvironmentError):
        board.boot_env.read()
    with pytest.raises(NoValidEnvironmentError):
        board.boot_env.write({"bootcount": "1"})
    with pytest.raises(BoardError):
        board.open_inactive_slot_for_writing()


def test_a_missing_fw_env_config_is_a_boot_env_error_naming_the_setting(tmp_path):
    board = GatewayBoard.from_toml(write_gateway(tmp_path))
    (tmp_path / "fw_env.config").unlink()
    with pytest.raises(BootEnvError) as caught:
        board.boot_env.read()
    assert caught.value.field == "boot.fw_env_config"


def test_reboot_runs_the_configured_command(tmp_path):
    marker = tmp_path / "rebooted"
    command = f'command = ["{sys.executable}", "-c", "open({str(marker)!r}, \'w\').write(\'x\')"]'
    board = GatewayBoard.from_toml(write_gateway(tmp_path, extra=f"\n[reboot]\n{command}"))
    board.reboot()
    assert marker.read_text() == "x"


def test_a_failing_reboot_command_is_a_reboot_error_with_its_last_words(tmp_path):
    command = (
        f'command = ["{sys.executable}", "-c", "import sys; sys.exit(\'Failed to reboot: access denied\')"]'
    )
    board = GatewayBoard.from_toml(write_gateway(tmp_path, extra=f"\n[reboot]\n{command}"))
    with pytest.raises(RebootError, match="access denied"):
        board.reboot()
    (tmp_path / "other").mkdir()
    missing = GatewayBoard.from_toml(
        write_gateway(tmp_path / "other", extra='\n[reboot]\ncommand = ["/no/such/reboot"]')
    )
    with pytest.raises(RebootError):
        missing.reboot()


def test_a_size_larger_than_any_device_is_a_config_error_not_an_overflow():
    with pytest.raises(ConfigError, match="larger than any device"):
        parse_size("100000000000000000000", "slots.a.size")


@pytest.mark.parametrize("field", ["key_store", "fw_env_config"])
def test_files_the_installer_must_not_reach_are_refused_inside_the_state_directory(tmp_path, field):
    config = write_gateway(tmp_path)
    text = config.read_text()
    if field == "key_store":
        text = text.replace('key_store = "otp/keystore.json"', 'key_store = "state/keystore.json"')
    else:
        text = text.replace('fw_env_config = "fw_env.config"', 'fw_env_config = "state/fw_env.config"')
    config.write_text(text)
    with pytest.raises(ConfigError, match="inside storage"):
        GatewayBoard.from_toml(config)


def _slot_b_device(config: Path, device: str) -> None:
    text = config.read_text()
    assert 'device = "slot-b"' in text
    config.write_text(text.replace('device = "slot-b"', f'device = "{device}"'))


@pytest.mark.parametrize(
    "spelling",
    ["sub/../slot-a", "link-to-a", "hard-link-of-a"],
    ids=["dot-dot", "symlink", "hard link"],
)
def test_slot_b_on_slot_a_under_another_name_is_refused(tmp_path, spelling):
    """Else the inactive slot would be the running rootfs, and the installer would write over it."""
    config = write_gateway(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link-to-a").symlink_to(tmp_path / "slot-a")
    (tmp_path / "hard-link-of-a").hardlink_to(tmp_path / "slot-a")
    _slot_b_device(config, spelling)
    with pytest.raises(ConfigError, match="different devices") as caught:
        load_config(config)
    assert caught.value.field == "slots.b"


def test_two_block_device_nodes_of_one_partition_are_one_slot(tmp_path):
    config = write_gateway(tmp_path)
    partition = os.makedev(179, 2)  # mmcblk0p2, as a by-partlabel link or a copied node reaches it
    try:
        os.mknod(tmp_path / "mmcblk0p2", stat.S_IFBLK | 0o600, partition)
        os.mknod(tmp_path / "rootfs-a", stat.S_IFBLK | 0o600, partition)
        os.mknod(tmp_path / "mmcblk0p3", stat.S_IFBLK | 0o600, os.makedev(179, 3))
    except PermissionError:
        pytest.skip("creating device nodes needs CAP_MKNOD")
    text = config.read_text().replace('device = "slot-a"', 'device = "mmcblk0p2"')
    config.write_text(text)
    _slot_b_device(config, "rootfs-a")
    with pytest.raises(ConfigError, match="different devices"):
        load_config(config)
    config.write_text(config.read_text().replace('device = "rootfs-a"', 'device = "mmcblk0p3"'))
    assert load_config(config).slot_b.device == tmp_path / "mmcblk0p3", "another partition is another slot"

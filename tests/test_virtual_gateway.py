"""The virtual gateway: mers installed in a Debian arm64 root file system as an integrator installs it
(`scripts/build-guest`), booted by real U-Boot from the slot `boot_slot` names, running on Debian's real
kernel, reads the real U-Boot environment on the SD card through its `fw_env.config` and knows which slot
runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from board.env_init import first_environment, initialise_environment, parse_defaults
from tests.conftest import unavailable
from tests.real_uboot import Gateway, Parts, parts

REPO = Path(__file__).resolve().parent.parent
#: the guest's own check runs instead of an init system (vm/guest-check): its commands, then power-off
CHECK_ARGS = "console=ttyAMA0 rootwait ro panic=-1 init=/usr/local/sbin/mers-guest-check"


@pytest.fixture(scope="module")
def guest_image() -> Path:
    directory = os.environ.get("MERS_VM_GUEST")
    if not directory or not (Path(directory) / "slot.img").is_file():
        unavailable("MERS_VM_GUEST names no slot.img (scripts/test builds it with scripts/build-guest)")
    return Path(directory) / "slot.img"


def guest_commands(output: str) -> dict[str, tuple[int, str]]:
    """What each command of vm/guest-check printed, and its exit status, by command line."""
    text = output.replace("\r\n", "\n")
    found = {}
    for match in re.finditer(r"^guest: \$ (.*?)\n(.*?)^guest: exit (\d+)$", text, re.S | re.M):
        found[match.group(1)] = (int(match.group(3)), match.group(2))
    return found


def test_mers_runs_in_the_guest_on_the_slot_u_boot_booted(tmp_path: Path, guest_image: Path) -> None:
    machine: Parts = parts()
    gateway = Gateway(tmp_path, machine, slot_image=guest_image)
    defaults = parse_defaults(machine.initial_env.read_text(), "u-boot-initial-env")
    defaults.update(parse_defaults((REPO / "uboot" / "mers-env.txt").read_text(), "mers-env.txt"))
    defaults["mers_bootargs"] = CHECK_ARGS
    initialise_environment(gateway.env, first_environment(defaults))

    booted = gateway.power_on(until_power_off=True)
    assert "guest: done" in booted.output, booted.output[-3000:]
    assert booted.slot == "a"
    commands = guest_commands(booted.output)
    assert commands["mers --version"][0] == 0, commands
    assert "mers, version" in commands["mers --version"][1]
    assert commands["mers-board init /etc/mers/board.toml"][0] == 0, commands
    code, info_text = commands["mers-board info /etc/mers/board.toml --json"]
    assert code == 0, info_text
    info = json.loads(info_text)
    assert info["running_slot"] == "a"
    assert (info["boot_env"]["boot_slot"], info["boot_env"]["upgrade_available"]) == ("a", "0")
    assert {name: slot["device"] for name, slot in info["slots"].items()} == {
        "a": "/dev/vda",
        "b": "/dev/vdb",
    }
    code, status_text = commands["mers status --board /etc/mers/board.toml --json"]
    assert code == 0, status_text
    assert json.loads(status_text)["firmware"]["running_slot"] == "a"

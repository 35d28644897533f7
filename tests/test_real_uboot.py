"""Real U-Boot, built with the shipped fragments and booting with the shipped environment
(`uboot/mers-env.txt` over U-Boot's own default one, written by `mers-board env init`), loads the kernel
of the slot `boot_slot` names from that slot and tells it which one; counts a trial, and rolls it back
past `bootlimit`; and the simulated bootloader makes the same decision, and the same number of saves, at
every power-on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from board.bootloader import BootReason, decide_boot
from board.env_init import first_environment, initialise_environment, parse_defaults
from board.interface import SlotName
from mers.install import trial_env_changes
from tests.real_uboot import Gateway, Parts, PowerOn, parts

#: run by scripts/test-vm, not with the suite
pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def machine() -> Parts:
    return parts()


def new_gateway(directory: Path, machine: Parts) -> Gateway:
    gateway = Gateway(directory, machine)
    defaults = parse_defaults(machine.initial_env.read_text(), "u-boot-initial-env")
    defaults.update(parse_defaults((REPO / "uboot" / "mers-env.txt").read_text(), "mers-env.txt"))
    initialise_environment(gateway.env, first_environment(defaults))
    return gateway


def boot_as_the_simulator_says(gateway: Gateway, bootable: Mapping[SlotName, bool]) -> PowerOn:
    """Power the gateway on; what real U-Boot did must be what `decide_boot` decides for the same
    environment: the slot the kernel was told, or none when that slot cannot boot, the environment
    saved, and the number of saves."""
    before, flags = gateway.env.read(), gateway.flags()
    decision = decide_boot(before, bootable)
    booted = gateway.power_on()
    expected_slot = decision.slot.value if bootable[decision.slot] else None
    assert booted.slot == expected_slot, booted.output[-2000:]
    assert without_runtime(gateway.env.read()) == without_runtime({**before, **decision.env_changes})
    assert gateway.flags() == (flags + len(decision.env_writes)) % 256
    return booted


BOTH = {SlotName.A: True, SlotName.B: True}

#: what U-Boot sets in its environment at start-up, and so stores with every save it makes (the simulator
#: neither sets nor needs them; mers reads none of them)
RUNTIME = frozenset({"fdtcontroladdr", "stdin", "stdout", "stderr"})


def without_runtime(env: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in RUNTIME}


def test_a_committed_boot_loads_its_slots_kernel_and_saves_nothing(tmp_path: Path, machine: Parts) -> None:
    gateway = new_gateway(tmp_path, machine)
    flags = gateway.flags()
    booted = boot_as_the_simulator_says(gateway, BOTH)
    assert booted.slot == "a"
    assert "root=/dev/vda" in (booted.cmdline or "")
    assert gateway.flags() == flags  # counted in memory only


def test_a_trial_is_counted_then_rolled_back_past_the_bootlimit_in_two_saves(
    tmp_path: Path, machine: Parts
) -> None:
    gateway = new_gateway(tmp_path, machine)
    gateway.env.write(trial_env_changes(gateway.env.read(), SlotName.B))  # what `mers install` arms
    for count in (1, 2, 3):
        booted = boot_as_the_simulator_says(gateway, BOTH)
        assert booted.slot == "b" and "root=/dev/vdb" in (booted.cmdline or "")
        assert gateway.env.read()["bootcount"] == str(count)
    flags = gateway.flags()
    assert decide_boot(gateway.env.read(), BOTH).reason is BootReason.ROLLBACK
    assert boot_as_the_simulator_says(gateway, BOTH).slot == "a"
    assert gateway.flags() == flags + 2  # the count, then altbootcmd's switch
    env = gateway.env.read()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("a", "0", "4")
    assert boot_as_the_simulator_says(gateway, BOTH).slot == "a"  # committed again: nothing saved


def test_a_confirmed_trial_stays_on_the_new_slot(tmp_path: Path, machine: Parts) -> None:
    gateway = new_gateway(tmp_path, machine)
    gateway.env.write(trial_env_changes(gateway.env.read(), SlotName.B))
    assert boot_as_the_simulator_says(gateway, BOTH).slot == "b"
    gateway.env.write({"upgrade_available": "0", "bootcount": "0"})  # what `mers confirm` commits
    for _ in range(2):
        assert boot_as_the_simulator_says(gateway, BOTH).slot == "b"


def test_a_new_slot_without_a_kernel_resets_each_trial_until_the_rollback(
    tmp_path: Path, machine: Parts
) -> None:
    gateway = new_gateway(tmp_path, machine)
    gateway.write_slot("b", kernel=False)
    gateway.env.write(trial_env_changes(gateway.env.read(), SlotName.B))
    broken = {SlotName.A: True, SlotName.B: False}
    for _ in range(3):
        booted = boot_as_the_simulator_says(gateway, broken)
        assert "mers: slot b did not boot" in booted.output
    assert boot_as_the_simulator_says(gateway, broken).slot == "a"
    assert gateway.env.read()["boot_slot"] == "a"

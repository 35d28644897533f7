"""The virtual gateway: mers installed in a Debian arm64 root file system with systemd as an integrator
installs it (`scripts/build-guest`), booted by real U-Boot from the slot `boot_slot` names, running on
Debian's real kernel. Its units (`systemd/`) do the work, as on a gateway: the provisioning console at the
factory, `mers-confirm.service` after each boot, `mers.service` onboarding and installing. The tests only
power the machine on and off, and look from outside: the hub's state, the U-Boot environment on its SD
card (as Debian's `fw_printenv` reads it), the key store on its data disk, what it printed on its console."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from board.env_init import first_environment, initialise_environment, parse_defaults
from hub.home import HubSettings
from hub.setup import new_hub_keys
from tests.conftest import require_tool, run_cli, unavailable
from tests.hub_helpers import AGENTS, FIRMWARE, RunningHub, running_hub
from tests.real_uboot import BOOT_DEADLINE, GUEST_HUB_ADDRESS, GUEST_HUB_PORT, Gateway, Parts, PowerOn, parts
from tests.signing_helpers import succeeded
from tests.vm_steps import step

#: run by scripts/test-vm, not with the suite
pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
#: a gateway's boot: systemd starts the units; their log is forwarded to the console the tests read
RUN_ARGS = "console=ttyAMA0 ro panic=-1 systemd.journald.forward_to_console=1"
#: at the factory: the provisioning console's unit on the UART (ttyAMA0), the kernel's console on hvc0
FACTORY_ARGS = (
    "console=hvc0 ro panic=-1 systemd.journald.forward_to_console=1"
    " systemd.wants=mers-board-console@ttyAMA0.service"
)
#: the tests' check (vm/guest-check) once the boot is done, then power-off; mers's units, and the login
#: prompt that would interleave with what the commands print, kept out of it
CHECK_ARGS = (
    "console=ttyAMA0 ro panic=-1 systemd.wants=mers-guest-check.service"
    " systemd.mask=mers.service systemd.mask=mers-confirm.service systemd.mask=serial-getty@ttyAMA0.service"
)
#: one power-on of the scenario, a whole image's download and write included
SCENARIO_BOOT_DEADLINE = 300.0


@dataclass(frozen=True)
class Guest:
    slot: Path  # a slot's root file system
    data: Path  # the data partition as the factory receives it


@pytest.fixture(scope="module")
def guest() -> Guest:
    directory = os.environ.get("MERS_VM_GUEST")
    found = Guest(Path(directory or "") / "slot.img", Path(directory or "") / "data.img")
    if not directory or not found.slot.is_file() or not found.data.is_file():
        unavailable("MERS_VM_GUEST names no slot.img and data.img (scripts/test-vm builds them)")
    return found


#: a kernel message that reached the console before the guest quieted it
_KERNEL_MESSAGE = re.compile(r"^\[ *\d+\.\d+\] .*\n", re.M)


def guest_commands(output: str) -> dict[str, tuple[int, str]]:
    """What each command of vm/guest-check printed, and its exit status, by command line."""
    text = _KERNEL_MESSAGE.sub("", output.replace("\r\n", "\n"))
    found = {}
    for match in re.finditer(r"^guest: \$ (.*?)\n(.*?)^guest: exit (\d+)$", text, re.S | re.M):
        found[match.group(1)] = (int(match.group(3)), match.group(2))
    return found


def write_environment(gateway: Gateway, machine: Parts, bootargs: str, **board_settings: str) -> None:
    """The first environment, from U-Boot's defaults and the shipped boot commands, with the kernel
    command line `bootargs` and what the board sets for itself (as an integrator's defaults file would)."""
    defaults = parse_defaults(machine.initial_env.read_text(), "u-boot-initial-env")
    defaults.update(parse_defaults((REPO / "uboot" / "mers-env.txt").read_text(), "mers-env.txt"))
    defaults["mers_bootargs"] = bootargs
    defaults.update(board_settings)
    initialise_environment(gateway.env, first_environment(defaults), force=True)


def release(
    directory: Path, slot_image: Path, key: Path, version: str, counter: int, *, etc_mers: str = ""
) -> Path:
    """A signed image of the guest's root file system with /etc/mers-release saying `version` (and
    /etc/mers/mers.env holding `etc_mers`, the units' settings, if given), for the vendor and class of
    vm/board.toml."""
    payload = directory / f"rootfs-{version}.img"
    shutil.copyfile(slot_image, payload)
    marker, settings = directory / f"mers-release-{version}", directory / f"mers-env-{version}"
    marker.write_text(version + "\n")
    commands = f"cd /etc\nwrite {marker} mers-release\n"
    if etc_mers:
        settings.write_text(etc_mers)
        commands += f"cd /etc/mers\nrm mers.env\nwrite {settings} mers.env\n"
    script = directory / f"debugfs-{version}"
    script.write_text(commands)
    subprocess.run(
        [require_tool("debugfs"), "-w", "-f", str(script), str(payload)], capture_output=True, check=True
    )
    signed = directory / f"rootfs-{version}.signed"
    sign: list[str | Path] = ["sign", "--key", key, "--version", version, "--security-counter", str(counter)]
    sign += ["--vendor", "acme.example", "--class", "gateway-g1", payload, signed]
    succeeded(run_cli("mers-sign", *sign))
    payload.unlink()
    return signed


def test_mers_runs_in_the_guest_on_the_slot_u_boot_booted(tmp_path: Path, guest: Guest) -> None:
    machine = parts()
    gateway = Gateway(tmp_path, machine, slot_image=guest.slot)
    gateway.add_data_disk(guest.data)
    write_environment(gateway, machine, CHECK_ARGS)
    booted = gateway.power_on(until_power_off=True)
    assert "guest: done" in booted.output, booted.output[-3000:]
    assert booted.slot == "a", booted.output[-3000:]
    commands = guest_commands(booted.output)
    assert commands["mers --version"][0] == 0, commands
    assert "mers, version" in commands["mers --version"][1]
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


@pytest.fixture
def guest_hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A hub the guest reaches at 10.0.2.100:8443 (what its boarding data and certificate name)."""
    settings = HubSettings(public_url=f"https://{GUEST_HUB_ADDRESS}:{GUEST_HUB_PORT}")
    with running_hub(tmp_path / "hub", settings, keys=new_hub_keys((GUEST_HUB_ADDRESS,))) as hub:
        yield hub


def test_a_gateway_is_provisioned_onboarded_updated_confirmed_and_rolled_back(
    tmp_path: Path, guest: Guest, guest_hub: RunningHub
) -> None:
    """At the factory, the provisioning console's unit serves the guest's real UART (QEMU's PL011, a
    pseudo-terminal here); `mers-factory provision --hub` writes the trust key and the boarding data,
    reads them back and locks. After a power cut, the first boot at the site: `mers.service` onboards
    through the guest's only network path to the hub, finds the task for v2, downloads, verifies and writes
    it into slot b, flips the environment and reboots. U-Boot counts the trial and boots v2 from slot b;
    `mers-confirm.service` commits it (ACTIVATED), and the daemon goes on to v3, into slot a. v3's health
    check fails at every trial boot, until U-Boot rolls back past `bootlimit`: v2 runs again and the task
    is FAILED. Then v4's install loses power in the middle of its download, and again right after the
    environment write: the next power-on boots its trial, which is confirmed."""
    hub = guest_hub
    machine = parts()
    gateway = Gateway(tmp_path / "gateway", machine, slot_image=guest.slot)
    gateway.add_data_disk(guest.data)
    # two failed trials before the rollback (the shipped default is 3): each trial is a whole boot
    write_environment(gateway, machine, FACTORY_ARGS, bootlimit="2")
    key, public = tmp_path / "release.pem", tmp_path / "release.pub.pem"
    succeeded(run_cli("mers-sign", "keygen", "--type", "ecdsa-p256", "-o", key))
    public.write_text(succeeded(run_cli("mers-sign", "getpub", key, "--format", "pem")).stdout)
    token = tmp_path / "admin-token"
    token.write_text(hub.admin_token + "\n")
    admin: list[str | Path] = ["--url", hub.url, "--token-file", token, "--ca", hub.ca]
    succeeded(run_cli("mers-hub", "release", "trust", "add", public, "--name", "release", *admin))
    with step("the factory provisions it over its UART"), gateway.start(uart=True) as running:
        port = running.uart()
        serving = running.wait_for(
            re.compile(r"serving the provisioning console on /dev/ttyAMA0"), BOOT_DEADLINE
        )
        assert serving is not None, running.output[-3000:]
        provisioned = run_cli(
            "mers-factory", "provision", "--records", tmp_path / "records.db", "--new-records",
            "--port", port, "--key", public,
            "--hub", hub.url, "--hub-token-file", token, "--hub-ca", hub.ca, "--json",
        )  # fmt: skip
        assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    # the power is cut there; from now on the gateway boots as at its site
    key_store = json.loads(gateway.read_from_data_disk("otp/keystore.json"))
    assert key_store["locked"] is True, key_store
    agents = hub.admin("GET", f"{AGENTS}/agents").json()["content"]
    (agent,) = [agent for agent in agents if agent["name"] == "GW-VM-0001"]
    gateway.env.write({"mers_bootargs": RUN_ARGS})
    hub_port = urlsplit(hub.url).port

    def upload(image: Path) -> str:
        """The release uploaded (its image then removed: they are large)."""
        upload: list[str | Path] = ["release", "upload", image, "--json"]
        release_id: str = json.loads(succeeded(run_cli("mers-hub", *upload, *admin)).stdout)["id"]
        image.unlink()
        return release_id

    def task_for(release_id: str) -> str:
        """A task for the gateway (the hub keeps one open at a time)."""
        create = ["task", "create", "--device", agent["id"], "--release", release_id, "--json"]
        task_id: str = json.loads(succeeded(run_cli("mers-hub", *create, *admin)).stdout)["id"]
        return task_id

    def boot_to_reboot() -> PowerOn:
        """A power-on whose units end it by rebooting (QEMU, run with -no-reboot, then exits)."""
        return gateway.power_on(until_power_off=True, hub_port=hub_port, timeout=SCENARIO_BOOT_DEADLINE)

    with step("its first boot onboards, installs v2 into slot b and reboots"):
        v2 = task_for(upload(release(tmp_path, guest.slot, key, "2.0.0", counter=2)))
        booted = boot_to_reboot()
        assert booted.slot == "a", booted.output[-3000:]
        status = hub.admin("GET", f"{AGENTS}/agents/{agent['id']}/boarding/status").json()
        assert status["status"] == "ONBOARDED", (status, booted.output[-3000:])
        env = gateway.printenv()
        assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "1", "0")
        assert task_state(hub, v2) == "ACTIVATING", booted.output[-3000:]  # reported before the reboot

    # v3: a release whose health check fails (the units read MERS_HEALTH_HOOK from /etc/mers/mers.env)
    failing = (REPO / "vm" / "mers.env").read_text() + "MERS_HEALTH_HOOK=/bin/false\n"
    v3_release = upload(release(tmp_path, guest.slot, key, "3.0.0", counter=3, etc_mers=failing))
    with step("U-Boot boots v2's trial; mers-confirm activates it; the daemon installs v3 into slot a"):
        with gateway.start(hub_port=hub_port) as running:
            activated = running.wait_until(
                lambda: task_state(hub, v2) == "ACTIVATED", SCENARIO_BOOT_DEADLINE, 0.5
            )
            assert activated, running.output[-3000:]
            assert PowerOn(running.output, running.cmdline()).slot == "b"
            v3 = task_for(v3_release)  # found at the daemon's next poll
            running.wait_for_power_off(SCENARIO_BOOT_DEADLINE)
        assert task_state(hub, v3) == "ACTIVATING", running.output[-3000:]
        env = gateway.printenv()
        assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("a", "1", "0")

    v4_release = upload(release(tmp_path, guest.slot, key, "4.0.0", counter=4))
    with step("v3's health check fails at each trial; U-Boot rolls back to v2"):
        for trial in range(1, int(gateway.printenv()["bootlimit"]) + 1):
            booted = boot_to_reboot()  # mers-confirm asks for the reboot that counts the next trial
            assert booted.slot == "a", booted.output[-3000:]
            assert gateway.printenv()["bootcount"] == str(trial)
            assert task_state(hub, v3) == "ACTIVATING", booted.output[-3000:]
        running = gateway.start(hub_port=hub_port)  # bootcount past bootlimit: altbootcmd boots slot b
        try:
            failed = running.wait_until(lambda: task_state(hub, v3) == "FAILED", SCENARIO_BOOT_DEADLINE, 0.5)
            assert failed, running.output[-3000:]
            assert PowerOn(running.output, running.cmdline()).slot == "b"
            env = gateway.printenv()
            assert (env["boot_slot"], env["upgrade_available"]) == ("b", "0")
        except BaseException:
            running.kill()
            raise

    with step("power cuts in the middle of a download and right after the env write; it always boots"):
        with running:  # the daemon finds v4 in the same boot: cut once a fifth of it is in slot a
            v4 = task_for(v4_release)
            cut = running.wait_until(lambda: task_progress(hub, v4) >= 0.2, SCENARIO_BOOT_DEADLINE, 0.2)
            assert cut, running.output[-3000:]
        assert gateway.printenv()["boot_slot"] == "b"  # nothing was switched
        with gateway.start(hub_port=hub_port) as running:  # it resumes; cut right after the env write
            # watched in this process every 10 ms (a fw_printenv a time would take a core from the guest);
            # what the cut left is read with fw_printenv below
            switched = running.wait_until(
                lambda: gateway.env.read()["boot_slot"] == "a", SCENARIO_BOOT_DEADLINE, 0.01
            )
            assert switched, running.output[-3000:]
        assert gateway.printenv()["boot_slot"] == "a"
        assert task_progress(hub, v4) >= 0.2
        with gateway.start(hub_port=hub_port) as running:  # the trial boots, and is confirmed
            activated = running.wait_until(
                lambda: task_state(hub, v4) == "ACTIVATED", SCENARIO_BOOT_DEADLINE, 0.5
            )
            assert activated, running.output[-3000:]
            assert PowerOn(running.output, running.cmdline()).slot == "a"
        env = gateway.printenv()
        assert (env["boot_slot"], env["upgrade_available"]) == ("a", "0")


def task_progress(hub: RunningHub, task_id: str) -> float:
    response = hub.admin("GET", f"{FIRMWARE}/installationTasks/{task_id}")
    assert response.status_code == 200, response.text
    progress: float = response.json()["progress"] or 0.0
    return progress


def task_state(hub: RunningHub, task_id: str) -> str:
    response = hub.admin("GET", f"{FIRMWARE}/installationTasks/{task_id}")
    assert response.status_code == 200, response.text
    state: str = response.json()["state"]
    return state

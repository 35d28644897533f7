"""The virtual gateway: mers installed in a Debian arm64 root file system as an integrator installs it
(`scripts/build-guest`), booted by real U-Boot from the slot `boot_slot` names, running on Debian's real
kernel, reads the real U-Boot environment on the SD card through its `fw_env.config` and knows which slot
runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from board.env_init import first_environment, initialise_environment, parse_defaults
from hub.home import HubSettings
from hub.setup import new_hub_keys
from tests.conftest import require_tool, run_cli, unavailable
from tests.hub_helpers import AGENTS, FIRMWARE, RunningHub, running_hub
from tests.real_uboot import BOOT_DEADLINE, GUEST_HUB_ADDRESS, GUEST_HUB_PORT, Gateway, Parts, parts
from tests.signing_helpers import succeeded
from tests.vm_steps import step

#: run by scripts/test-vm, not with the suite
pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
#: the guest's own check runs instead of an init system (vm/guest-check): its commands, then power-off
CHECK_ARGS = "console=ttyAMA0 rootwait ro panic=-1 init=/usr/local/sbin/mers-guest-check"
#: at the factory: the provisioning console on the UART (ttyAMA0), the kernel's on hvc0 (vm/guest-console)
CONSOLE_ARGS = "console=hvc0 rootwait ro panic=-1 init=/usr/local/sbin/mers-guest-console"


@pytest.fixture(scope="module")
def guest_image() -> Path:
    directory = os.environ.get("MERS_VM_GUEST")
    if not directory or not (Path(directory) / "slot.img").is_file():
        unavailable("MERS_VM_GUEST names no slot.img (scripts/test builds it with scripts/build-guest)")
    return Path(directory) / "slot.img"


#: a kernel message that reached the console before the guest quieted it
_KERNEL_MESSAGE = re.compile(r"^\[ *\d+\.\d+\] .*\n", re.M)


def guest_commands(output: str) -> dict[str, tuple[int, str]]:
    """What each command of vm/guest-check printed, and its exit status, by command line."""
    text = _KERNEL_MESSAGE.sub("", output.replace("\r\n", "\n"))
    found = {}
    for match in re.finditer(r"^guest: \$ (.*?)\n(.*?)^guest: exit (\d+)$", text, re.S | re.M):
        found[match.group(1)] = (int(match.group(3)), match.group(2))
    return found


def write_environment(gateway: Gateway, machine: Parts, bootargs: str) -> None:
    """The first environment, from U-Boot's defaults and the shipped boot commands, with the guest's own
    script as init (instead of an init system) and its console as `bootargs` say."""
    defaults = parse_defaults(machine.initial_env.read_text(), "u-boot-initial-env")
    defaults.update(parse_defaults((REPO / "uboot" / "mers-env.txt").read_text(), "mers-env.txt"))
    defaults["mers_bootargs"] = bootargs
    initialise_environment(gateway.env, first_environment(defaults), force=True)


def check_the_guest(
    gateway: Gateway, hub: RunningHub | None = None, *, slot: str = "a", reboots: bool = False
) -> dict[str, tuple[int, str]]:
    """Boot `vm/guest-check` to its power-off (on the network, reaching `hub`), from `slot`: what each of
    its commands printed. With `reboots`, a command reboots the guest before the list ends."""
    gateway.env.write({"mers_bootargs": CHECK_ARGS})
    booted = gateway.power_on(until_power_off=True, hub_port=urlsplit(hub.url).port if hub else None)
    assert ("guest: done" in booted.output) is not reboots, booted.output[-3000:]
    assert booted.slot == slot, booted.output[-3000:]
    return guest_commands(booted.output)


def release(directory: Path, slot_image: Path, key: Path, version: str, counter: int) -> Path:
    """A signed image of the guest's root file system with /etc/mers-release saying `version`, for the
    vendor and class of vm/board.toml."""
    payload = directory / f"rootfs-{version}.img"
    shutil.copyfile(slot_image, payload)
    marker = directory / f"mers-release-{version}"
    marker.write_text(version + "\n")
    script = directory / f"debugfs-{version}"
    script.write_text(f"cd /etc\nwrite {marker} mers-release\n")
    subprocess.run(
        [require_tool("debugfs"), "-w", "-f", str(script), str(payload)], capture_output=True, check=True
    )
    signed = directory / f"rootfs-{version}.signed"
    sign: list[str | Path] = ["sign", "--key", key, "--version", version, "--security-counter", str(counter)]
    sign += ["--vendor", "acme.example", "--class", "gateway-g1", payload, signed]
    succeeded(run_cli("mers-sign", *sign))
    payload.unlink()
    return signed


def test_mers_runs_in_the_guest_on_the_slot_u_boot_booted(tmp_path: Path, guest_image: Path) -> None:
    machine = parts()
    gateway = Gateway(tmp_path, machine, slot_image=guest_image)
    write_environment(gateway, machine, CHECK_ARGS)
    commands = check_the_guest(gateway)
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
    tmp_path: Path, guest_image: Path, guest_hub: RunningHub
) -> None:
    """The guest serves its provisioning console on its real UART (QEMU's PL011, a pseudo-terminal here);
    `mers-factory provision --hub` writes the trust key and the boarding data, reads them back and locks.
    After a power cut, the key store on the guest's data disk holds it all, locked, and `mers onboard`
    in the guest registers with the hub through the guest's only network path to it. A task for v2 is
    downloaded, verified and written into slot b, the environment flipped, and the guest reboots; U-Boot
    counts the trial and boots v2 from slot b; `mers confirm` there commits it and the task is ACTIVATED.
    Then v3, whose health check fails at every trial boot, is rolled back by U-Boot past `bootlimit`:
    v2 runs again and the task is FAILED. Then v4's install loses power in the middle of its download, and
    again right after the environment write: the next power-on boots its trial, which is confirmed."""
    hub = guest_hub
    machine = parts()
    gateway = Gateway(tmp_path / "gateway", machine, slot_image=guest_image)
    gateway.add_data_disk()
    write_environment(gateway, machine, CONSOLE_ARGS)
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
    board = "--board /etc/mers/board.toml"
    with step("its first boot onboards"):
        # the power is cut there; the first boot at the site onboards
        lines = [
            f"mers-board info {board.split()[1]} --json",
            f"mers onboard {board}",
            f"mers status {board} --json",
        ]
        gateway.put_on_data_disk("guest-commands", "\n".join(lines) + "\n")
        commands = check_the_guest(gateway, hub)
        code, info_text = commands["mers-board info /etc/mers/board.toml --json"]
        assert code == 0, info_text
        info = json.loads(info_text)
        assert info["locked"] is True
        assert info["key_slots"][0]["state"] == "written"
        agents = hub.admin("GET", f"{AGENTS}/agents").json()["content"]
        (agent,) = [agent for agent in agents if agent["name"] == "GW-VM-0001"]
        assert info["boarding"]["client_id"] == agent["id"]
        assert info["boarding"]["base_url"] == f"https://{GUEST_HUB_ADDRESS}:{GUEST_HUB_PORT}"
        assert f"mers onboard {board}" in commands, commands
        assert commands[f"mers onboard {board}"][0] == 0, commands
        status = hub.admin("GET", f"{AGENTS}/agents/{agent['id']}/boarding/status").json()
        assert status["status"] == "ONBOARDED", status
        code, status_text = commands[f"mers status {board} --json"]
        assert code == 0 and json.loads(status_text)["client_id"] == agent["id"], status_text

    def task_for(image: Path) -> dict[str, Any]:
        """The release uploaded (its image then removed: they are large) and a task for the gateway."""
        upload: list[str | Path] = ["release", "upload", image, "--json"]
        uploaded = json.loads(succeeded(run_cli("mers-hub", *upload, *admin)).stdout)
        image.unlink()
        create = ["task", "create", "--device", agent["id"], "--release", uploaded["id"], "--json"]
        task: dict[str, Any] = json.loads(succeeded(run_cli("mers-hub", *create, *admin)).stdout)
        return task

    with step("a task installs v2 into slot b and reboots"):
        # a release for it: installed by the task, into slot b, the boot environment flipped, a reboot
        task = task_for(release(tmp_path, guest_image, key, "2.0.0", counter=2))
        install = f"mers install --task {task['id']} --no-progress {board}\n"
        gateway.put_on_data_disk("guest-commands", install)
        check_the_guest(gateway, hub, reboots=True)
        env = gateway.env.read()
        assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "1", "0")
        assert task_state(hub, task["id"]) == "ACTIVATING"  # reported before the reboot
    with step("U-Boot boots the trial of v2; confirm activates it"):
        # U-Boot counts the trial and boots slot b, where v2 runs; confirm commits it
        gateway.put_on_data_disk(
            "guest-commands", f"cat /etc/mers-release\nmers confirm {board}\nmers status {board} --json\n"
        )
        commands = check_the_guest(gateway, hub, slot="b")
        assert commands["cat /etc/mers-release"] == (0, "2.0.0\n"), commands
        assert commands[f"mers confirm {board}"][0] == 0, commands
        assert task_state(hub, task["id"]) == "ACTIVATED"
        env = gateway.env.read()
        assert (env["boot_slot"], env["upgrade_available"]) == ("b", "0")

    with step("a task installs v3 into slot a and reboots"):
        failing = task_for(release(tmp_path, guest_image, key, "3.0.0", counter=3))
        install = f"mers install --task {failing['id']} --no-progress {board}\n"
        gateway.put_on_data_disk("guest-commands", install)
        check_the_guest(gateway, hub, slot="b", reboots=True)
        assert gateway.env.read()["boot_slot"] == "a"

    with step("v3's health check fails at each trial; U-Boot rolls back to v2"):
        checks = f"cat /etc/mers-release\nmers confirm --health-hook /bin/false {board}\n"
        gateway.put_on_data_disk("guest-commands", checks)
        limit = int(gateway.env.read()["bootlimit"])
        for trial in range(1, limit + 1):
            commands = check_the_guest(gateway, hub, slot="a", reboots=True)
            assert commands["cat /etc/mers-release"] == (0, "3.0.0\n"), commands
            assert gateway.env.read()["bootcount"] == str(trial)
        gateway.put_on_data_disk("guest-commands", f"cat /etc/mers-release\nmers confirm {board}\n")
        commands = check_the_guest(gateway, hub, slot="b")  # bootcount past bootlimit: altbootcmd
        assert commands["cat /etc/mers-release"] == (0, "2.0.0\n"), commands
        assert commands[f"mers confirm {board}"][0] == 8, commands
        assert task_state(hub, failing["id"]) == "FAILED"
        env = gateway.env.read()
        assert (env["boot_slot"], env["upgrade_available"]) == ("b", "0")

    with step("power cuts in the middle of a download and right after the env write; it always boots"):
        cut = task_for(release(tmp_path, guest_image, key, "4.0.0", counter=4))
        install = f"mers install --task {cut['id']} --no-progress {board}\n"
        gateway.put_on_data_disk("guest-commands", install)
        gateway.env.write({"mers_bootargs": CHECK_ARGS})
        hub_port = urlsplit(hub.url).port
        with gateway.start(hub_port=hub_port) as running:  # cut once a fifth of the image is in slot a
            assert running.wait_until(lambda: task_progress(hub, cut["id"]) >= 0.2, BOOT_DEADLINE, 0.2)
        assert gateway.env.read()["boot_slot"] == "b"  # nothing was switched
        with gateway.start(
            hub_port=hub_port
        ) as running:  # the install resumes; cut right after the env write
            assert running.wait_until(lambda: gateway.env.read()["boot_slot"] == "a", BOOT_DEADLINE, 0.01)
        assert task_progress(hub, cut["id"]) >= 0.2
        gateway.put_on_data_disk("guest-commands", f"cat /etc/mers-release\nmers confirm {board}\n")
        commands = check_the_guest(gateway, hub, slot="a")  # the trial boots, and is confirmed
        assert commands["cat /etc/mers-release"] == (0, "4.0.0\n"), commands
        assert commands[f"mers confirm {board}"][0] == 0, commands
        assert task_state(hub, cut["id"]) == "ACTIVATED"


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

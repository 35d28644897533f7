"""Real U-Boot and a real Linux kernel under QEMU (aarch64 `virt`, TCG): the virtual gateway's machine.

The parts come from `scripts/build-uboot` (U-Boot built from Debian's source package with the shipped
fragments, and its default environment) and `scripts/fetch-kernel` (Debian's arm64 kernel); `scripts/test`
builds or reuses them before the suite and names them in `MERS_VM_UBOOT` and `MERS_VM_KERNEL`. The
gateway's U-Boot environment lives on an SD card at the offsets `uboot/qemu-arm64.config` gives it; the
slots are virtio disks, each a file system holding the kernel at `/boot/Image`.

A power-on runs until the kernel prints its command line (U-Boot has chosen the slot, saved what it
saves, and loaded that slot's kernel) or U-Boot gives up and resets (QEMU runs with `-no-reboot`, so a
reset ends it): both are a boot attempt, as the simulated bootloader's `boot` is one.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from board.fw_env_config import EnvDevice, FwEnvConfig, render
from board.ubootenv import UBootEnv
from tests.conftest import require_tool, unavailable

#: where `uboot/qemu-arm64.config` puts the two environment copies on the SD card
ENV_OFFSETS = (0x400000, 0x404000)
ENV_SIZE = 0x4000
SD_CARD_SIZE = 8 << 20  # QEMU's sd-card needs a power of two
SLOT_SIZE = 48 << 20
BOOT_DEADLINE = 120.0
_COMMAND_LINE = re.compile(r"Kernel command line: ([^\r\n]*)\r?\n")
#: where the guest reaches the hub: QEMU forwards it to the hub on this host's 127.0.0.1
GUEST_HUB_ADDRESS = "10.0.2.100"
GUEST_HUB_PORT = 8443
#: the guest's flushes do not wait for this host's disk: its writes reach this host's page cache at once
#: either way, so a power cut (QEMU killed) keeps exactly what it would keep with flushes honoured, and the
#: installer's fsync every second costs no host sync
_CACHE = "cache=unsafe"
_UART = re.compile(r"char device redirected to (/dev/pts/\d+) \(label serial0\)")


@dataclass(frozen=True)
class Parts:
    uboot: Path  # u-boot.bin
    initial_env: Path  # U-Boot's default environment, u-boot-initial-env
    kernel: Path  # an arm64 Image


def parts() -> Parts:
    """The parts `scripts/test` built or reused; the test is skipped (failed under MERS_REQUIRE_ALL)
    without them."""
    require_tool("qemu-system-aarch64", "Debian package qemu-system-arm")
    uboot, kernel = os.environ.get("MERS_VM_UBOOT"), os.environ.get("MERS_VM_KERNEL")
    if not uboot or not kernel:
        unavailable("MERS_VM_UBOOT and MERS_VM_KERNEL are not set (scripts/test builds them)")
    found = Parts(Path(uboot) / "u-boot.bin", Path(uboot) / "u-boot-initial-env", Path(kernel))
    for path in (found.uboot, found.initial_env, found.kernel):
        if not path.is_file():
            unavailable(f"{path} is missing (scripts/build-uboot, scripts/fetch-kernel make it)")
    return found


@dataclass(frozen=True)
class PowerOn:
    output: str
    #: the command line the kernel printed; None: no kernel started (U-Boot reset the board)
    cmdline: str | None

    @property
    def slot(self) -> str | None:
        """The slot U-Boot told the kernel it booted (`mers.slot=`)."""
        if self.cmdline is None:
            return None
        found = [
            word.removeprefix("mers.slot=") for word in self.cmdline.split() if word.startswith("mers.slot=")
        ]
        return found[-1] if found else None


class Gateway:
    """The machine's disks in `directory`: an SD card for the environment, and slots a and b."""

    def __init__(self, directory: Path, machine: Parts, *, slot_image: Path | None = None) -> None:
        """Slots holding just the kernel, or each a copy of `slot_image` (the guest's root file system,
        `scripts/build-guest`)."""
        self.directory = directory
        self.parts = machine
        self.sd_card = directory / "sd-card.img"
        self.slots = {name: directory / f"slot-{name}.img" for name in ("a", "b")}
        self.fw_env_config = directory / "fw_env.config"
        self.data_disk: Path | None = None
        directory.mkdir(parents=True, exist_ok=True)
        with open(self.sd_card, "wb") as card:
            card.truncate(SD_CARD_SIZE)
        config = FwEnvConfig(tuple(EnvDevice(self.sd_card, offset, ENV_SIZE) for offset in ENV_OFFSETS))
        self.fw_env_config.write_text(render(config))
        self.env = UBootEnv(config, lock_path=directory / "fw_env.lock")
        for name, path in self.slots.items():
            if slot_image is None:
                self.write_slot(name, kernel=True)
            else:
                shutil.copyfile(slot_image, path)

    def write_slot(self, name: str, *, kernel: bool) -> None:
        """Slot `name` as a file system holding the kernel, or (kernel False) one U-Boot cannot boot."""
        root = self.directory / f"root-{name}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "boot").mkdir(parents=True)
        if kernel:
            shutil.copyfile(self.parts.kernel, root / "boot" / "Image")
        self.slots[name].unlink(missing_ok=True)
        subprocess.run(
            [require_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(root), str(self.slots[name]),
             str(SLOT_SIZE >> 10)],
            capture_output=True,
            check=True,
        )  # fmt: skip
        shutil.rmtree(root)

    def printenv(self) -> dict[str, str]:
        """The environment as Debian's `fw_printenv` reads it from the SD card (a peer's reading, not
        mers's own), through the same offsets the guest's `fw_env.config` gives."""
        completed = subprocess.run(
            [require_tool("fw_printenv", "Debian's libubootenv-tool"), "-c", str(self.fw_env_config)],
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(line.partition("=")[::2] for line in completed.stdout.splitlines() if "=" in line)

    def flags(self) -> int:
        """The current environment copy's flags: each save raises them by one."""
        current = next(copy for copy in self.env.copies() if copy.current)
        assert current.flags is not None
        return current.flags

    def add_data_disk(self, image: Path) -> Path:
        """A third virtio disk (the guest's /dev/vdc), a copy of `image`: the data partition the guest keeps
        its key store and the installer's state on, which updates do not write."""
        disk = self.directory / "data.img"
        shutil.copyfile(image, disk)
        self.data_disk = disk
        return disk

    def read_from_data_disk(self, path: str) -> str:
        """The file `path` of the data disk, powered off. The journal a power cut left is replayed first
        (e2fsck), as the guest's next mount would: debugfs reads past it."""
        assert self.data_disk is not None, "no data disk"
        checked = subprocess.run(
            [require_tool("e2fsck"), "-f", "-y", str(self.data_disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: the journal replayed
        read = subprocess.run(
            [require_tool("debugfs"), "-R", f"cat {path}", str(self.data_disk)],
            capture_output=True,
            text=True,
            check=True,
        )
        return read.stdout

    def start(self, *, uart: bool = False, hub_port: int | None = None) -> Running:
        """Power the machine on. With `uart`, its UART (the PL011, the guest's ttyAMA0) is a pseudo-terminal
        of this host, as a factory's serial cable, and the kernel's console is hvc0 (virtio-console). With
        `hub_port`, the guest has a network on which 10.0.2.100:8443 is 127.0.0.1:`hub_port` of this host,
        and nothing else is reached (QEMU's user network with restrict=on)."""
        command = [
            require_tool("qemu-system-aarch64"),
            "-M", "virt", "-cpu", "cortex-a57", "-smp", "2", "-m", "512M", "-no-reboot",
            "-bios", str(self.parts.uboot),
            "-device", "sdhci-pci",
            "-drive", f"if=none,id=sd,format=raw,{_CACHE},file={self.sd_card}",
            "-device", "sd-card,drive=sd",
        ]  # fmt: skip
        if hub_port is None:
            command += ["-nic", "none"]
        else:
            # a relay per connection (a `tcp:` chardev would carry only the first one)
            relay = f"cmd:{require_tool('socat')} - TCP:127.0.0.1:{hub_port}"
            forward = f"guestfwd=tcp:{GUEST_HUB_ADDRESS}:{GUEST_HUB_PORT}-{relay}"
            command += ["-nic", f"user,model=virtio-net-pci,restrict=on,{forward}"]
        if uart:
            command += ["-display", "none", "-monitor", "none", "-serial", "pty"]
            command += ["-chardev", "stdio,id=console,signal=off", "-device", "virtio-serial-pci"]
            command += ["-device", "virtconsole,chardev=console"]
        else:
            command += ["-nographic"]
        disks = [*self.slots.items(), *([("data", self.data_disk)] if self.data_disk else [])]
        for name, path in disks:
            command += ["-drive", f"if=none,id=disk-{name},format=raw,{_CACHE},file={path}"]
            command += ["-device", f"virtio-blk-pci,drive=disk-{name}"]
        return Running(
            subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )

    def power_on(
        self, *, until_power_off: bool = False, hub_port: int | None = None, timeout: float = BOOT_DEADLINE
    ) -> PowerOn:
        """One power-on, until the kernel prints its command line or U-Boot resets; with
        `until_power_off`, until the machine powers itself off or reboots (what it printed is kept)."""
        with self.start(hub_port=hub_port) as running:
            running.cmdline(timeout)
            if until_power_off:
                running.wait_for_power_off(timeout)
        return PowerOn(running.output, running.cmdline(0))


class Running:
    """A powered-on machine: what it printed so far, and its end (a kill is a power cut)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._output = b""
        self._ended = False

    @property
    def output(self) -> str:
        return _text(self._output)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first match of `pattern` in the output, read until it appears; None if the machine
        ended (U-Boot reset it, or the guest powered off) before it did. Fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (found := pattern.search(self.output)) is None and not self._ended:
            self._read(deadline)
        return found

    def cmdline(self, timeout: float = BOOT_DEADLINE) -> str | None:
        """The command line the kernel printed, read until it does; None if the machine ended first (U-Boot
        reset it)."""
        found = self.wait_for(_COMMAND_LINE, timeout)
        return found.group(1).strip() if found else None

    def wait_until(self, condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
        """Read the output (so QEMU never blocks on a full pipe) until `condition()` holds, checked every
        `interval` s; False if the machine ended first. Fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self._ended:
                return False
            assert time.monotonic() < deadline, f"not within {timeout} s:\n{self.output[-3000:]}"
            self._read(min(deadline, time.monotonic() + interval), wait=False)
        return True

    def wait_for_power_off(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ended:
            self._read(deadline)

    def uart(self, timeout: float = BOOT_DEADLINE) -> str:
        """The host's end of the machine's UART, as QEMU names it."""
        found = self.wait_for(_UART, timeout)
        assert found is not None, self.output
        return found.group(1)

    def kill(self) -> None:
        """Cut the power."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=30)

    def _read(self, deadline: float, *, wait: bool = True) -> None:
        """Read what the machine printed until `deadline`; past it, fail (or with `wait` False, return)."""
        stdout = self._process.stdout
        assert stdout is not None
        remaining = deadline - time.monotonic()
        if not wait and remaining <= 0:
            return
        assert remaining > 0, f"the machine did not get there in time:\n{self.output[-4000:]}"
        ready, _, _ = select.select([stdout], [], [], remaining)
        if ready:
            chunk = os.read(stdout.fileno(), 65536)
            self._output += chunk
            self._ended = not chunk

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        assert self._process.stdout is not None
        self._process.stdout.close()


def _text(output: bytes) -> str:
    return output.decode("utf-8", "replace")

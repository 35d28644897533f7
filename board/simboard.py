"""The simulated board: a `GatewayBoard` whose TOML file and every file it names live in one directory.

There is no second implementation to drift from the real one: the simulation differs only in where its
files are and in two stand-ins for hardware, both written as on a gateway. The simulated bootloader writes
`cmdline` (`mers.slot=a`), as U-Boot passes the booted slot on the kernel command line, and `reboot()`
writes `reboot-requested` instead of running `systemctl reboot`, which the bootloader consumes.

Directory layout::

    board.toml          the configuration (written last: its presence marks a complete board)
    slot-a.img          slot a, a file of the slot size (sparse)
    slot-a.record       slot a's record: the header and TLVs of its image (absent: factory content)
    slot-b.img, slot-b.record
    fw_env.config       the two environment copies, for us and for fw_printenv -c / fw_setenv -c
    uboot-env.0, uboot-env.1, fw_env.lock
    keystore.json       the emulated OTP: key slots, lock, security-counter floor, boarding data
    state/              the installer's state directory
    cmdline             the kernel command line of the running system
    reboot-requested    present once the system asked for a reboot
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import fw_env_config
from .errors import ConfigError, StorageError
from .fw_env_config import EnvDevice, FwEnvConfig
from .gateway import GatewayBoard, GatewayConfig, SlotConfig, check_identity, load_config, render_config
from .interface import (
    DEFAULT_BOOTLIMIT,
    ENV_BOOT_SLOT,
    ENV_BOOTCOUNT,
    ENV_BOOTLIMIT,
    ENV_UPGRADE_AVAILABLE,
    Identity,
    SlotName,
)
from .keystore import KeyStore
from .slots import encode_record, payload_offset, slot_record_of_image, verify_slot_content
from .storage import DIRECTORY_MODE, fsync_directory, remove_durably, write_atomically
from .ubootenv import UBootEnvError
from .ubootenv import create as create_env

CONFIG_NAME = "board.toml"
DEFAULT_SLOT_SIZE = 64 << 20
ENV_COPY_SIZE = 0x4000
INITIAL_ENV = {
    ENV_BOOT_SLOT: SlotName.A.value,
    ENV_UPGRADE_AVAILABLE: "0",
    ENV_BOOTCOUNT: "0",
    ENV_BOOTLIMIT: str(DEFAULT_BOOTLIMIT),
}
_CMDLINE = "cmdline"
_REBOOT_REQUEST = "reboot-requested"


class SimBoard(GatewayBoard):
    """A `GatewayBoard` in one directory, plus what the simulated bootloader needs."""

    @classmethod
    def open(cls, directory: Path) -> SimBoard:
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ConfigError(f"{directory} is not a simulated board (no {CONFIG_NAME})", field="directory")
        return cls(load_config(config_path))

    @classmethod
    def create(
        cls,
        directory: Path,
        identity: Identity,
        *,
        slot_size: int = DEFAULT_SLOT_SIZE,
        image: Path | None = None,
    ) -> SimBoard:
        """Make a new board in `directory` (absent or empty): slot a active and running, a fresh redundant
        environment, an empty key store. `image`, if given, is put in slot a with its record (its hash is
        checked, not its signature: this is the factory's image). The board is built in a temporary
        directory beside `directory` and renamed into place, so a failure leaves no half board."""
        directory = directory.absolute()
        check_identity(identity)
        _check_slot_size(slot_size)
        _check_new_directory(directory)
        try:
            building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        except OSError as exc:
            raise StorageError(f"cannot create a board beside {directory}: {exc.strerror}") from exc
        try:
            _build(building, directory, identity, slot_size, image)
            os.replace(building, directory)
            fsync_directory(directory.parent)
        except BaseException as exc:
            shutil.rmtree(building, ignore_errors=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot create the board {directory}: {exc.strerror}") from exc
            raise
        return cls.open(directory)

    @property
    def directory(self) -> Path:
        return self.config.fw_env_config.parent  # every file of a simulated board is in its directory

    # --- what the simulated bootloader and the tests observe -------------------------------------------

    def reboot_requested(self) -> bool:
        request = self.config.reboot_request_file
        return request is not None and request.exists()

    def record_boot(self, slot: SlotName | None) -> None:
        """Set the running system: `slot` booted (its kernel command line names it), or, with None, the
        boot attempt failed and nothing runs. Either way the pending reboot request has been served."""
        if slot is None:
            remove_durably(self.config.cmdline)
        else:
            write_atomically(self.config.cmdline, f"{self.config.slot_parameter}={slot.value}\n".encode())
        if self.config.reboot_request_file is not None:
            remove_durably(self.config.reboot_request_file)


def _check_new_directory(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} exists and is not an empty directory", field="directory")
    if not directory.parent.is_dir():
        raise ConfigError(f"{directory.parent} does not exist", field="directory")


#: a slot is a block device's worth of sectors: at least a page, whole 512-byte sectors
MIN_SLOT_SIZE = 4096
SECTOR_SIZE = 512


def _check_slot_size(slot_size: int) -> None:
    """Refuse a slot no gateway has: one too small for any image, or not whole sectors."""
    if slot_size < MIN_SLOT_SIZE or slot_size % SECTOR_SIZE:
        raise ConfigError(
            f"slot size {slot_size} bytes: a board's slots are at least {MIN_SLOT_SIZE} bytes, "
            f"in whole {SECTOR_SIZE}-byte sectors",
            field="slot_size",
        )


def _build(building: Path, final: Path, identity: Identity, slot_size: int, image: Path | None) -> None:
    """Lay out a board in `building` whose configuration names its files under `final`."""
    config = GatewayConfig(
        identity=identity,
        state_dir=final / "state",
        key_store=final / "keystore.json",
        slot_a=SlotConfig(final / "slot-a.img", final / "slot-a.record", slot_size),
        slot_b=SlotConfig(final / "slot-b.img", final / "slot-b.record", slot_size),
        fw_env_config=final / "fw_env.config",
        env_lock_file=final / "fw_env.lock",
        cmdline=final / _CMDLINE,
        reboot_request_file=final / _REBOOT_REQUEST,
    )
    (building / "state").mkdir(mode=DIRECTORY_MODE)
    for name in SlotName:
        with open(building / f"slot-{name.value}.img", "xb") as handle:
            handle.truncate(slot_size)
    if image is not None:
        _install_factory_image(building, image, slot_size)
    env_devices = tuple(EnvDevice(Path(f"uboot-env.{index}"), 0, ENV_COPY_SIZE) for index in range(2))
    try:
        create_env(
            FwEnvConfig(tuple(EnvDevice(building / d.device, 0, d.size) for d in env_devices)),
            INITIAL_ENV,
            lock_path=building / "fw_env.lock",
        )
    except UBootEnvError as exc:
        raise StorageError(f"cannot create the boot environment: {exc}") from exc
    # fw_printenv reads device paths as they are written, so they are absolute (the final directory)
    final_env = FwEnvConfig(tuple(EnvDevice(final / d.device, 0, d.size) for d in env_devices))
    write_atomically(building / "fw_env.config", fw_env_config.render(final_env).encode())
    KeyStore(building / "keystore.json").initialise()
    write_atomically(building / _CMDLINE, f"{config.slot_parameter}={SlotName.A.value}\n".encode())
    write_atomically(building / CONFIG_NAME, render_config(config, final).encode())


def _install_factory_image(building: Path, image: Path, slot_size: int) -> None:
    """Put `image`'s payload in slot a and its record beside it, as a factory would flash them."""
    record = slot_record_of_image(image)
    if record.payload_size > slot_size:
        raise ConfigError(
            f"the image's payload of {record.payload_size} bytes does not fit the {slot_size}-byte slot",
            field="slot_size",
        )
    with open(image, "rb") as source, open(building / "slot-a.img", "r+b") as slot:
        source.seek(payload_offset(record))
        remaining = record.payload_size
        while remaining:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                raise StorageError(f"{image} shrank while being copied", field="image")
            slot.write(chunk)
            remaining -= len(chunk)
        slot.flush()
        os.fsync(slot.fileno())
        verify_slot_content(record, slot.fileno(), slot_size)
    write_atomically(building / "slot-a.record", encode_record(record))

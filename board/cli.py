"""`mers-board`: the device's command line, a thin layer over the board library.

Each command calls one library function and prints one line (or JSON). Every `BoardError` becomes a
one-line message on stderr and an exit code that says which kind of failure it was; no tracebacks.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from .bootloader import BootOutcome
from .bootloader import boot as boot_board
from .console_cli import console, sim_serve
from .env_init import first_environment, initialise_environment, parse_defaults
from .errors import BoardError, BootEnvError, ConfigError, StorageError
from .fw_env_config import FwEnvConfigError
from .gateway import GatewayBoard, parse_size
from .interface import Identity, SlotName
from .simboard import SimBoard
from .ubootenv import UBootEnv, UBootEnvError

EXIT_BOOT_FAILED = 1  # `boot`: the attempt failed (printed on stdout like a success); boot again
EXIT_USAGE = 2  # a value or configuration is not acceptable (click uses 2 as well)
EXIT_REFUSED = 3  # the board refused the operation
EXIT_STORAGE = 4  # a file, device or the boot environment could not be used


class Size(click.ParamType[int, Any]):
    """A size in bytes: `67108864`, `0x4000000`, `64MiB`, `64M`."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, "slot size")
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors as one line on stderr and a distinct exit code."""
    try:
        yield
    except BoardError as error:
        field = f"[{error.field}] " if error.field else ""
        click.echo(f"mers-board: error: {field}{error}", err=True)
        sys.exit(_exit_code(error))


def _exit_code(error: BoardError) -> int:
    if isinstance(error, ConfigError | FwEnvConfigError):
        return EXIT_USAGE
    if isinstance(error, StorageError | BootEnvError | UBootEnvError):
        return EXIT_STORAGE
    return EXIT_REFUSED


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Example: mers-board sim create ./gw1 --serial GW-0001 --vendor Acme --class gw-100\n\n"
    "Exit codes: 0 ok, 1 boot attempt failed, 2 usage, 3 refused, 4 storage, 130 interrupted.",
)
@click.version_option(package_name="mers")
def main() -> None:
    """The device side: simulated boards, the simulated bootloader, board information."""


@main.group()
def sim() -> None:
    """Simulated boards (one directory each).

    Example: mers-board sim create ./gw1 --serial GW-1 --vendor Acme --class gw-1; mers-board sim serve ./gw1
    """


@sim.command("create")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--serial", "serial_number", required=True, help="Serial number.")
@click.option("--vendor", required=True, help="Vendor name (images carry its UUID_VID).")
@click.option("--class", "image_class", required=True, help="Hardware model (images carry its UUID_CID).")
@click.option("--hardware-revision", default="", help="Hardware revision (free text).")
@click.option("--slot-size", type=Size(), default="64MiB", show_default=True, help="Size of each slot.")
@click.option(
    "--image",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A signed image whose payload slot a starts with (factory content, with its record).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the new board's description as JSON.")
def sim_create(
    directory: Path,
    serial_number: str,
    vendor: str,
    image_class: str,
    hardware_revision: str,
    slot_size: int,
    image: Path | None,
    as_json: bool,
) -> None:
    """Create a simulated board in DIRECTORY (absent or empty): slot a running, empty key slots.

    Example: mers-board sim create ./gw1 --serial GW-0001 --vendor Acme --class gw-100 --slot-size 16MiB
    """
    identity = Identity(serial_number, vendor, image_class, hardware_revision)
    with reported_errors():
        board = SimBoard.create(directory, identity, slot_size=slot_size, image=image)
        description = describe(board)
    if as_json:
        click.echo(json.dumps(description, indent=2))
    else:
        click.echo(f"created simulated board {identity.serial_number} in {board.directory}")


# the provisioning console (board.console_cli): `mers-board console BOARD --port DEV`, `sim serve DIR`
main.add_command(console)
sim.add_command(sim_serve)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def boot(directory: Path, as_json: bool) -> None:
    """Power the simulated board in DIRECTORY on once, as U-Boot with bootcount boots.

    Prints which slot booted and why. Exit status 1: the boot attempt failed; run it again.

    Example: mers-board boot ./gw1 --json
    """
    with reported_errors():
        result = boot_board(SimBoard.open(directory))
    click.echo(json.dumps(result.as_json()) if as_json else result.message)
    if result.decision.outcome is BootOutcome.FAILED:
        sys.exit(EXIT_BOOT_FAILED)


@main.command()
@click.argument("config", metavar="TOML", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def init(config: Path) -> None:
    """Give a new gateway its empty key store (once: an existing one is never replaced).

    Run it when the gateway's image is built or on its first boot, before the factory provisions it. A key
    store that disappears later is an error, not a reset: that would unlock the board.

    Example: mers-board init /etc/mers/board.toml
    """
    with reported_errors():
        board = GatewayBoard.from_toml(config)
        created = board.initialise()
    where = board.config.key_store
    click.echo(f"created the key store {where}" if created else f"the key store {where} exists: unchanged")


@main.group()
def env() -> None:
    """The board's U-Boot environment."""


@env.command("init")
@click.argument("board_path", metavar="DIR|TOML", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--defaults",
    "defaults_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="name=value lines as mkenvimage reads them; again for more files, later values winning.",
)
@click.option("--force", is_flag=True, help="Replace a valid environment (it holds the running slot).")
def env_init(board_path: Path, defaults_files: tuple[Path, ...], force: bool) -> None:
    """Write a new board's first U-Boot environment, both copies: the defaults files' variables, with
    boot_slot=a, upgrade_available=0, bootcount=0 and bootlimit=3 where they set none.

    Example: mers-board env init /etc/mers/board.toml --defaults u-boot-initial-env --defaults mers-env.txt
    """
    with reported_errors():
        defaults: dict[str, str] = {}
        for path in defaults_files:
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the defaults file {path}: {exc}", field="defaults") from exc
            defaults.update(parse_defaults(text, str(path)))
        variables = first_environment(defaults)
        board = _open(board_path)
        boot_env = board.boot_env
        if not isinstance(boot_env, UBootEnv):
            raise ConfigError(f"{board_path} keeps no U-Boot environment of its own", field="boot_env")
        initialise_environment(boot_env, variables, force=force)
    copies = len(boot_env.config.devices)
    click.echo(
        f"wrote the U-Boot environment ({copies} copies, {len(variables)} variables): boot_slot="
        f"{variables['boot_slot']} bootlimit={variables['bootlimit']}"
    )


def _open(board_path: Path) -> GatewayBoard:
    """A simulated board's directory, or a gateway's TOML file."""
    return SimBoard.open(board_path) if board_path.is_dir() else GatewayBoard.from_toml(board_path)


@main.command()
@click.argument("board_path", metavar="DIR|TOML", type=click.Path(exists=True, path_type=Path))
@click.option("--check-slots", is_flag=True, help="Hash each slot against its record (reads both slots).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info(board_path: Path, check_slots: bool, as_json: bool) -> None:
    """Describe a board: a simulated board's directory, or a gateway's TOML file.

    Example: mers-board info ./gw1 --json
    """
    with reported_errors():
        description = describe(_open(board_path), check_slots=check_slots)
    click.echo(json.dumps(description, indent=2) if as_json else _as_text(description))


def describe(board: GatewayBoard, *, check_slots: bool = False) -> dict[str, Any]:
    """Everything `info` shows, as JSON-ready values."""
    identity = board.identity
    summary = board.boarding_summary()
    running = board.running_slot()
    slots = {}
    for name in SlotName:
        slot = board.slot(name)
        record = slot.record()
        entry: dict[str, Any] = {
            "device": str(slot.device),
            "size": slot.size,
            "image_version": record.version if record else None,
            "payload_size": record.payload_size if record else None,
        }
        if check_slots:
            check = slot.check()
            entry.update(status=check.status.value, detail=check.detail)
        slots[name.value] = entry
    return {
        "serial_number": identity.serial_number,
        "vendor": identity.vendor,
        "class": identity.image_class,
        "hardware_revision": identity.hardware_revision,
        "locked": board.is_locked(),
        "key_slots": [
            {"index": s.index, "state": s.state.value, "key_hash": s.key_hash.hex() if s.key_hash else None}
            for s in board.key_slots()
        ],
        "security_counter_floor": board.security_counter_floor(),
        "boarding": None
        if summary is None
        else {
            "client_id": summary.client_id,
            "tenant": summary.tenant,
            "base_url": summary.base_url,
            "iat_expires_at": summary.iat_expires_at,
            "config_sha256": summary.config_sha256.hex(),
            "ca_sha256": summary.ca_sha256.hex(),
        },
        "running_slot": running.value if running else None,
        "boot_env": board.boot_env.read(),
        "slots": slots,
    }


def _as_text(description: dict[str, Any]) -> str:
    keys = ", ".join(f"{s['index']}:{s['state']}" for s in description["key_slots"])
    env = description["boot_env"]
    lines = [
        f"board {description['serial_number']} ({description['vendor']} {description['class']} "
        f"rev {description['hardware_revision'] or '-'}), "
        + ("locked" if description["locked"] else "unlocked"),
        f"key slots {keys}; security counter floor {description['security_counter_floor']}",
        "boarding data: "
        + (f"client {description['boarding']['client_id']}" if description["boarding"] else "none"),
        f"running slot {description['running_slot'] or 'none'}; boot_slot={env.get('boot_slot')} "
        f"upgrade_available={env.get('upgrade_available')} bootcount={env.get('bootcount')} "
        f"bootlimit={env.get('bootlimit')}",
    ]
    for name, slot in description["slots"].items():
        content = f"image {slot['image_version']}" if slot["image_version"] else "no image recorded"
        status = f", {slot['status']}: {slot['detail']}" if "status" in slot else ""
        lines.append(f"slot {name}: {slot['size']} bytes, {content}{status}")
    return "\n".join(lines)


EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended


def script() -> None:
    """The `mers-board` console script: `main`, with Ctrl-C ending it in exit 130 (`main` itself is left
    without a signal handler for tests and library users who call it in-process)."""
    signal.signal(signal.SIGINT, _interrupted)
    main()


def _interrupted(signum: int, frame: object) -> NoReturn:
    """Ctrl-C: unwind as KeyboardInterrupt would (context managers close, files stay whole), but end in
    the shell's code for it, 130, rather than click's "Aborted!" and 1, which means something else here.
    A SIGTERM is not caught: it ends the command as the signal does (143 in a shell)."""
    click.echo("mers-board: interrupted", err=True)
    raise SystemExit(EXIT_INTERRUPTED)

"""A board's first U-Boot environment: `mers-board env init` writes both copies from a defaults file read
as mkenvimage reads it, fw_printenv reads the result, a valid environment is kept unless forced, and a
board with no valid environment says how to write one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from board.env_init import first_environment, parse_defaults
from board.errors import ConfigError
from board.ubootenv import parse_copy, parse_variables
from tests.board_helpers import write_gateway
from tests.conftest import CliResult, require_tool, run_cli

DEFAULTS = """\
# U-Boot's default environment, with the boot commands a gateway needs
bootdelay=0
bootcmd=run mers_boot

mers_boot=if test "${boot_slot}" = b; then setenv part 3; else setenv part 2; fi; \\
load virtio 0:${part} ${kernel_addr_r} Image; booti ${kernel_addr_r} - ${fdtcontroladdr}
altbootcmd=if test "${boot_slot}" = b; then setenv boot_slot a; else setenv boot_slot b; fi; \\
setenv upgrade_available 0; saveenv; run bootcmd
bootlimit=5
"""


def mers_board(*args: str | Path) -> CliResult:
    return run_cli("mers-board", *args)


def blank_gateway(directory: Path) -> Path:
    """A gateway whose environment medium was never written (zeros, as a new eMMC reads)."""
    config = write_gateway(directory)
    for name in ("env0", "env1"):
        (directory / name).write_bytes(bytes(0x2000))
    return config


def fw_printenv(directory: Path) -> dict[str, str]:
    completed = subprocess.run(
        [require_tool("fw_printenv"), "-c", str(directory / "fw_env.config")],
        capture_output=True,
        text=True,
        check=True,
    )
    variables = {}
    for line in completed.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.isidentifier():
            variables[name] = value
    return variables


def test_a_blank_board_is_told_to_run_env_init(tmp_path: Path) -> None:
    config = blank_gateway(tmp_path)
    result = mers_board("info", config)
    assert result.returncode == 4
    assert "mers-board env init" in result.error_line
    status = run_cli("mers", "status", "--board", config, "--json")
    assert "mers-board env init" in json.loads(status.stdout)["firmware"]["boot_env"]["error"]


def test_env_init_writes_both_copies_that_fw_printenv_reads_with_mers_variables_added(tmp_path: Path) -> None:
    config = blank_gateway(tmp_path)
    defaults = tmp_path / "u-boot-initial-env"
    defaults.write_text(DEFAULTS)
    result = mers_board("env", "init", config, "--defaults", defaults)
    assert result.returncode == 0, result.stderr
    assert "2 copies" in result.stdout
    seen = fw_printenv(tmp_path)
    assert seen["boot_slot"] == "a" and seen["upgrade_available"] == "0" and seen["bootcount"] == "0"
    assert seen["bootlimit"] == "5"  # the file's own limit stays
    assert seen["bootcmd"] == "run mers_boot"
    assert seen["altbootcmd"].startswith("if test")
    for name in ("env0", "env1"):
        copy = parse_copy((tmp_path / name).read_bytes(), redundant=True)
        assert copy.crc_valid
    assert mers_board("info", config).returncode == 0


def test_env_init_keeps_a_valid_environment_unless_forced(tmp_path: Path) -> None:
    config = write_gateway(tmp_path)
    before = [(tmp_path / name).read_bytes() for name in ("env0", "env1")]
    refused = mers_board("env", "init", config)
    assert refused.returncode == 3
    assert "--force" in refused.error_line
    assert [(tmp_path / name).read_bytes() for name in ("env0", "env1")] == before
    forced = mers_board("env", "init", config, "--force")
    assert forced.returncode == 0, forced.stderr
    assert fw_printenv(tmp_path)["boot_slot"] == "a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bootcmd run x\n", "is not name=value"),
        (" bootcmd=run x\n", "holds blanks"),
        ("bootlimit=0\n", "no limit U-Boot keeps"),
        ("bootlimit=0x100000000\n", "no limit U-Boot keeps"),
        ("upgrade_available=1\n", "must be 0"),
        ("boot_slot=c\n", "not a or b"),
    ],
)
def test_a_defaults_file_u_boot_would_misread_is_refused_and_nothing_is_written(
    tmp_path: Path, text: str, message: str
) -> None:
    config = blank_gateway(tmp_path)
    defaults = tmp_path / "defaults"
    defaults.write_text(text)
    result = mers_board("env", "init", config, "--defaults", defaults)
    assert result.returncode == 2
    assert message in result.error_line
    assert (tmp_path / "env0").read_bytes() == bytes(0x2000)


def test_the_defaults_file_is_read_as_mkenvimage_reads_it(tmp_path: Path) -> None:
    """mkenvimage (u-boot-tools) as the peer: the image it makes of the file holds our variables."""
    mkenvimage = require_tool("mkenvimage", "u-boot-tools")
    source = tmp_path / "defaults"
    source.write_text(DEFAULTS + "empty=\n")
    image = tmp_path / "env.bin"
    subprocess.run([mkenvimage, "-r", "-s", "0x2000", "-o", str(image), str(source)], check=True)
    theirs = parse_copy(image.read_bytes(), redundant=True)
    assert theirs.crc_valid
    expected = {name: value for name, value in parse_variables(theirs.data).items() if value}
    assert parse_defaults(source.read_text(), "defaults") == expected


def test_a_later_defaults_file_or_line_wins_as_in_u_boot(tmp_path: Path) -> None:
    config = blank_gateway(tmp_path)
    (tmp_path / "initial").write_text("bootcmd=run distro_bootcmd\nkernel_addr_r=0x40400000\nbootlimit=4\n")
    (tmp_path / "mers").write_text("bootcmd=run mers_boot\nbootlimit=5\nbootlimit=6\n")
    result = mers_board(
        "env", "init", config, "--defaults", tmp_path / "initial", "--defaults", tmp_path / "mers"
    )
    assert result.returncode == 0, result.stderr
    seen = fw_printenv(tmp_path)
    assert (seen["bootcmd"], seen["kernel_addr_r"], seen["bootlimit"]) == ("run mers_boot", "0x40400000", "6")


def test_a_first_environment_without_defaults_is_mers_own() -> None:
    assert first_environment({}) == {
        "boot_slot": "a",
        "upgrade_available": "0",
        "bootcount": "0",
        "bootlimit": "3",
    }
    with pytest.raises(ConfigError):
        first_environment({"boot_slot": "B"})

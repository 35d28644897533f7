"""fw_env.config is read as libubootenv 0.3.2 reads it, and anything it could misread is refused by line.

That the same text makes fw_printenv look at the same bytes is shown in test_ubootenv.py, with the tool.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from board.fw_env_config import (
    ConfigFileError,
    EnvDevice,
    FwEnvConfig,
    FwEnvConfigError,
    InvalidLayoutError,
    MalformedLineError,
    load,
    parse,
    render,
)

# --- what is accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "/dev/mmcblk0 0x3FE000 0x2000\n",
            (EnvDevice(Path("/dev/mmcblk0"), 0x3FE000, 0x2000),),
            id="one line is a single copy",
        ),
        pytest.param(
            "/dev/mmcblk0 0x3FE000 0x2000\n/dev/mmcblk0 0x3FC000 0x2000\n",
            (
                EnvDevice(Path("/dev/mmcblk0"), 0x3FE000, 0x2000),
                EnvDevice(Path("/dev/mmcblk0"), 0x3FC000, 0x2000),
            ),
            id="two lines are a redundant pair",
        ),
        pytest.param("env 4096 4000\n", (EnvDevice(Path("env"), 4096, 0x4000),), id="decimal offset"),
        pytest.param("env 010 0X4000\n", (EnvDevice(Path("env"), 8, 0x4000),), id="leading zero is octal"),
        pytest.param("env 0 0x4000\n", (EnvDevice(Path("env"), 0, 0x4000),), id="zero offset"),
        pytest.param("env 0X1f 20000\n", (EnvDevice(Path("env"), 0x1F, 0x20000),), id="upper-case 0X"),
        pytest.param("env +16 1\n", (EnvDevice(Path("env"), 16, 1),), id="signed offset"),
        pytest.param(
            "/dev/mmcblk0 -0x4000 0x2000\n",
            (EnvDevice(Path("/dev/mmcblk0"), -0x4000, 0x2000),),
            id="negative offset counts from the end",
        ),
        pytest.param(
            "/dev/mtd1 0 0x20000 0x10000 2\n",
            (EnvDevice(Path("/dev/mtd1"), 0, 0x20000, 0x10000, 2),),
            id="sector size and count",
        ),
        pytest.param(
            "/dev/mtd1 0 0x20000 10000 10\n",
            (EnvDevice(Path("/dev/mtd1"), 0, 0x20000, 0x10000, 0x10),),
            id="sector fields are hex without 0x too",
        ),
        pytest.param(
            "# fw_env.config\n\n   \n\t\r\nenv 0 0x4000 # trailing comment\n",
            (EnvDevice(Path("env"), 0, 0x4000),),
            id="comments and blank lines",
        ),
        pytest.param(
            "a\t0\t0x4000\r\nb 0   0x4000\r\n",
            (EnvDevice(Path("a"), 0, 0x4000), EnvDevice(Path("b"), 0, 0x4000)),
            id="tabs, runs of blanks, CRLF",
        ),
        pytest.param(
            "flash.img 0x80000 0x20000\nflash.img 0xA0000 0x20000\n",
            (EnvDevice(Path("flash.img"), 0x80000, 0x20000), EnvDevice(Path("flash.img"), 0xA0000, 0x20000)),
            id="two copies side by side in one file",
        ),
    ],
)
def test_well_formed_configs_are_read_as_libubootenv_reads_them(text, expected):
    config = parse(text)
    assert config.devices == expected
    assert config.redundant == (len(expected) == 2)
    assert config.copy_size == expected[0].size


def test_an_indented_hash_starts_a_device_name_not_a_comment():
    # libubootenv skips only lines whose first character is '#'; after blanks, sscanf's %ms reads it
    config = parse("env 0 0x4000\n   #env 0 0x4000\n")
    assert config.devices == (EnvDevice(Path("env"), 0, 0x4000), EnvDevice(Path("#env"), 0, 0x4000))


def test_the_size_field_is_hexadecimal_even_without_0x():
    assert parse("env 0 4000\n").copy_size == 16384


def test_an_octal_offset_is_octal_and_a_decimal_one_decimal():
    assert parse("env 0100 0x10\n").devices[0].offset == 64
    assert parse("env 100 0x10\n").devices[0].offset == 100


# --- what is refused, with its line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error", "line", "field"),
    [
        pytest.param("env 0\n", MalformedLineError, 1, "size", id="too few fields"),
        pytest.param("# c\n\nenv\n", MalformedLineError, 3, "offset", id="device only"),
        pytest.param("env 0 0x4000\n  # note\n", MalformedLineError, 2, "size", id="indented # note"),
        pytest.param("  # /dev/mtd1 0x0 0x1000\n", MalformedLineError, 1, "offset", id="indented # copy"),
        pytest.param("env 0 0x4000 0x1000 1 extra\n", MalformedLineError, 1, "sectors", id="extra field"),
        pytest.param("env 08 0x4000\n", MalformedLineError, 1, "offset", id="8 is not an octal digit"),
        pytest.param("env 0x 0x4000\n", MalformedLineError, 1, "offset", id="0x without digits"),
        pytest.param("env 12ab 0x4000\n", MalformedLineError, 1, "offset", id="decimal with hex digits"),
        pytest.param("env zero 0x4000\n", MalformedLineError, 1, "offset", id="offset is a word"),
        pytest.param("env 0 0x4000zz\n", MalformedLineError, 1, "size", id="size with trailing junk"),
        pytest.param("env 0 -4000\n", MalformedLineError, 1, "size", id="negative size"),
        pytest.param("env 0 16K\n", MalformedLineError, 1, "size", id="size with a unit"),
        pytest.param("env 0 0x4000 0x1000#c\n", MalformedLineError, 1, "sector_size", id="comment glued on"),
        pytest.param("env 0 0x4000 x\n", MalformedLineError, 1, "sector_size", id="bad sector size"),
        pytest.param("env 0 0x4000 0x1000 y\n", MalformedLineError, 1, "sectors", id="bad sector count"),
        pytest.param("env 0 0\n", InvalidLayoutError, 1, "size", id="zero size"),
        pytest.param("a 0 0x4000\n\nb 0 0x2000\n", InvalidLayoutError, 3, "size", id="copies differ in size"),
        pytest.param("a 0 0x4000\na 0x2000 0x4000\n", InvalidLayoutError, 2, "offset", id="copies overlap"),
        pytest.param("a 0 0x10\nb 0 0x10\nc 0 0x10\n", InvalidLayoutError, 3, "layout", id="a third copy"),
    ],
)
def test_malformed_configs_are_refused_naming_the_line(text, error, line, field):
    with pytest.raises(error) as caught:
        parse(text)
    assert caught.value.line == line
    assert caught.value.field == field
    assert str(caught.value).startswith(f"line {line}: ")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", " \t\n# and another\n"])
def test_a_config_without_any_copy_is_refused(text):
    with pytest.raises(InvalidLayoutError, match="no environment copy"):
        parse(text)


def test_every_error_is_a_fw_env_config_error():
    for text in ("env 0\n", "env 0 0\n", ""):
        with pytest.raises(FwEnvConfigError):
            parse(text)


def test_copies_in_one_file_may_touch_but_not_overlap():
    assert parse("a 0 0x4000\na 0x4000 0x4000\n").redundant
    with pytest.raises(InvalidLayoutError):
        parse("a 0 0x4000\na 0x3fff 0x4000\n")


def test_copies_on_different_devices_may_share_offsets():
    assert parse("a 0 0x4000\nb 0 0x4000\n").redundant


# --- files and rendering ------------------------------------------------------------------------------


def test_a_config_file_is_loaded_from_disk(tmp_path):
    path = tmp_path / "fw_env.config"
    path.write_text("env0 0 0x4000\nenv1 0 0x4000\n")
    assert load(path) == FwEnvConfig((EnvDevice(Path("env0"), 0, 0x4000), EnvDevice(Path("env1"), 0, 0x4000)))


def test_a_missing_config_file_is_a_typed_error(tmp_path):
    with pytest.raises(ConfigFileError) as caught:
        load(tmp_path / "absent.config")
    assert caught.value.field == "config"


def test_rendered_config_states_every_number_in_hex():
    config = FwEnvConfig((EnvDevice(Path("/srv/env.img"), 0x80000, 0x20000, 0x1000, 2),))
    lines = [line for line in render(config).splitlines() if not line.startswith("#")]
    assert lines == ["/srv/env.img 0x80000 0x20000 0x1000 0x2"]


@pytest.mark.parametrize("device", ["with space", "#hash", "tab\there"])
def test_a_device_path_the_config_syntax_cannot_hold_is_not_rendered(device):
    config = FwEnvConfig((EnvDevice(Path(device), 0, 0x4000),))
    with pytest.raises(InvalidLayoutError) as caught:
        render(config)
    assert caught.value.field == "device"


def test_a_device_must_have_a_positive_size():
    with pytest.raises(InvalidLayoutError):
        EnvDevice(Path("env"), 0, 0)


def test_a_config_holds_one_or_two_copies():
    device = EnvDevice(Path("env"), 0, 0x10)
    with pytest.raises(InvalidLayoutError):
        FwEnvConfig(())
    with pytest.raises(InvalidLayoutError):
        FwEnvConfig((device, EnvDevice(Path("b"), 0, 0x10), EnvDevice(Path("c"), 0, 0x10)))


_paths = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Z", "C"), exclude_characters="#"),
    min_size=1,
    max_size=40,
).map(Path)
_devices = st.builds(
    EnvDevice,
    device=_paths,
    offset=st.integers(-(2**40), 2**40),
    size=st.integers(1, 2**32),
    sector_size=st.none() | st.integers(0, 2**32),
    sectors=st.none(),
)


@given(device=_devices, second_offset=st.integers(0, 2**40), sectors=st.none() | st.integers(0, 2**16))
def test_any_rendered_config_parses_back_to_itself(device, second_offset, sectors):
    if device.sector_size is not None:
        device = EnvDevice(device.device, device.offset, device.size, device.sector_size, sectors)
    for devices in ((device,), (device, EnvDevice(Path("other"), second_offset, device.size))):
        config = FwEnvConfig(devices)
        assert parse(render(config)) == config


@given(text=st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_only_a_config_error(text):
    try:
        config = parse(text)
    except FwEnvConfigError:
        return
    assert 1 <= len(config.devices) <= 2

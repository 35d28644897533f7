"""`mers-board` (run in-process, `run_cli`): create a simulated board, boot it, describe it; one line per
error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from board.interface import SlotName
from board.simboard import SimBoard
from tests.board_helpers import corrupt, install, signed_image, write_gateway
from tests.conftest import CliResult, run_cli


@pytest.fixture
def mers_board() -> Callable[..., CliResult]:
    """Call `mers-board ARGS...` (in-process; `process=True` for a real one)."""

    def call(*args: str | Path, **kwargs: object) -> CliResult:
        return run_cli("mers-board", *args, **kwargs)  # type: ignore[arg-type]

    return call


def create(mers_board: Callable[..., CliResult], directory: Path, *extra: str | Path) -> CliResult:
    return mers_board(
        "sim", "create", directory, "--serial", "GW-0001", "--vendor", "Acme", "--class", "gw-100",
        "--slot-size", "64KiB", *extra,
    )  # fmt: skip


def test_sim_create_makes_a_board_and_says_so_in_one_line(mers_board, tmp_path):
    result = create(mers_board, tmp_path / "gw")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"created simulated board GW-0001 in {tmp_path / 'gw'}\n"
    assert (tmp_path / "gw" / "board.toml").is_file()


def test_sim_create_json_describes_the_new_board(mers_board, tmp_path):
    result = create(mers_board, tmp_path / "gw", "--hardware-revision", "B", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["serial_number"], document["class"], document["hardware_revision"]) == (
        "GW-0001",
        "gw-100",
        "B",
    )
    assert document["running_slot"] == "a"
    assert document["slots"]["b"]["size"] == 64 << 10
    assert [slot["state"] for slot in document["key_slots"]] == ["empty"] * 3


def test_sim_create_refuses_an_existing_board_in_one_line(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw")
    result = create(mers_board, tmp_path / "gw")
    assert result.returncode == 2
    assert result.error_line.startswith("mers-board: error: [directory]")


@pytest.mark.parametrize("size", ["lots", "0", "-4", "7", "4095", "4097"])
def test_sim_create_refuses_a_bad_slot_size_as_a_usage_error(mers_board, tmp_path, size):
    result = mers_board(
        "sim",
        "create",
        tmp_path / "gw",
        "--serial",
        "S",
        "--vendor",
        "V",
        "--class",
        "C",
        "--slot-size",
        size,
    )
    assert result.returncode == 2
    assert "slot size" in result.stderr
    assert not (tmp_path / "gw").exists()


def test_sim_create_refuses_a_bad_identity_in_one_line(mers_board, tmp_path):
    result = mers_board("sim", "create", tmp_path / "gw", "--serial", " ", "--vendor", "V", "--class", "C")
    assert result.returncode == 2
    assert result.error_line.startswith("mers-board: error: [identity.serial_number]")


def test_boot_prints_which_slot_booted_and_why(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw", "--image", signed_image(tmp_path, "1.0.0"))
    result = mers_board("boot", tmp_path / "gw")
    assert (result.returncode, result.stdout) == (0, "booted slot a: committed; holds image 1.0.0+0\n")


def test_a_failed_boot_attempt_exits_1_and_the_rollback_follows(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw")
    board = SimBoard.open(tmp_path / "gw")
    install(board, signed_image(tmp_path))
    corrupt(board.slot(SlotName.B).device)
    outcomes = [mers_board("boot", tmp_path / "gw", "--json") for _ in range(4)]
    assert [result.returncode for result in outcomes] == [1, 1, 1, 0]
    documents = [json.loads(result.stdout) for result in outcomes]
    assert [d["outcome"] for d in documents] == ["failed"] * 3 + ["booted"]
    assert documents[-1]["slot"] == "a" and documents[-1]["reason"] == "rollback"
    assert all(result.stderr == "" for result in outcomes)


def test_boot_of_a_directory_that_is_not_a_board_is_one_line(mers_board, tmp_path):
    result = mers_board("boot", tmp_path)
    assert result.returncode == 2
    assert result.error_line.startswith("mers-board: error: [directory]")


def test_boot_with_both_environment_copies_bad_is_one_line_and_exit_4(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw")
    for name in ("uboot-env.0", "uboot-env.1"):
        corrupt(tmp_path / "gw" / name, 1)
    result = mers_board("boot", tmp_path / "gw")
    assert result.returncode == 4
    assert "valid CRC" in result.error_line


def test_a_slot_record_missing_a_field_fails_boot_and_info_in_one_line(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw", "--image", signed_image(tmp_path, "1.0.0"))
    record = tmp_path / "gw" / "slot-a.record"
    body = json.loads(record.read_text())
    del body["payload_size"]  # damaged, or written by a release that did not keep it
    record.write_text(json.dumps(body))
    booted = mers_board("boot", tmp_path / "gw")
    assert (booted.returncode, booted.stderr) == (1, "")
    assert booted.stdout.startswith("boot of slot a failed (committed):") and "payload_size" in booted.stdout
    described = mers_board("info", tmp_path / "gw", "--check-slots")
    assert described.returncode == 3 and described.error_line.startswith("mers-board: error: [slot]")
    assert "payload_size" in described.error_line


def test_info_describes_a_simulated_board_in_text_and_json(mers_board, tmp_path):
    create(mers_board, tmp_path / "gw", "--image", signed_image(tmp_path, "1.0.0"))
    text = mers_board("info", tmp_path / "gw")
    assert text.returncode == 0, text.stderr
    assert "board GW-0001 (Acme gw-100 rev -), unlocked" in text.stdout
    assert "slot a: 65536 bytes, image 1.0.0+0" in text.stdout
    checked = json.loads(mers_board("info", tmp_path / "gw", "--json", "--check-slots").stdout)
    assert checked["slots"]["a"]["status"] == "valid"
    assert checked["slots"]["b"]["status"] == "unrecorded"
    assert checked["boot_env"]["boot_slot"] == "a"


def test_info_reads_a_gateway_from_its_toml_file(mers_board, tmp_path):
    config = write_gateway(tmp_path)
    result = mers_board("info", config, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["serial_number"], document["running_slot"]) == ("GW-7", "a")
    assert document["slots"]["b"]["size"] == 4096


def test_info_on_a_broken_gateway_configuration_is_one_line_naming_the_key(mers_board, tmp_path):
    (tmp_path / "gateway.toml").write_text('[identity]\nserial_number = "x"\n')
    result = mers_board("info", tmp_path / "gateway.toml")
    assert result.returncode == 2
    assert result.error_line.startswith("mers-board: error: [identity.vendor]")


def test_help_shows_an_example(mers_board):
    result = mers_board("--help")
    assert result.returncode == 0
    assert "mers-board sim create" in result.stdout


def test_init_gives_a_gateway_its_key_store_once_and_never_replaces_it(mers_board, tmp_path):
    config = write_gateway(tmp_path)  # already initialised, as an image build would
    key_store = tmp_path / "otp" / "keystore.json"
    key_store.unlink()
    assert mers_board("info", config).returncode != 0  # a missing store is an error, not a fresh board
    created = mers_board("init", config)
    assert created.returncode == 0, created.stderr
    assert "created" in created.stdout
    before = key_store.read_bytes()
    again = mers_board("init", config)
    assert again.returncode == 0
    assert "unchanged" in again.stdout
    assert key_store.read_bytes() == before

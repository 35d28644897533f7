"""The simulated board: one directory, the code paths of a gateway, and the installer's only write path."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import board.simboard as simboard_module
from board.errors import (
    ActiveSlotWriteError,
    BoardLockedError,
    ConfigError,
    RunningSlotUnknownError,
    SlotFullError,
)
from board.interface import Board, Identity, KeySlotState, SlotName, SlotStatus
from board.simboard import CONFIG_NAME, SimBoard
from board.slots import payload_offset, slot_record_of_image
from board.storage import StateDirectory
from tests.board_helpers import IDENTITY, SLOT_SIZE, boarding, der, install, signed_image, simulated_board
from tests.conftest import require_tool


class PowerCut(BaseException):
    pass


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- creating and opening --------------------------------------------------------------------------


def test_a_new_board_runs_slot_a_with_a_fresh_environment_and_empty_key_slots(tmp_path):
    board = simulated_board(tmp_path / "gw")
    assert board.identity == IDENTITY
    assert board.active_slot() is SlotName.A
    assert board.boot_env.read() == {
        "boot_slot": "a",
        "upgrade_available": "0",
        "bootcount": "0",
        "bootlimit": "3",
    }
    assert [slot.state for slot in board.key_slots()] == [KeySlotState.EMPTY] * 3
    assert not board.is_locked() and board.boarding_data() is None
    assert board.security_counter_floor() == 0
    for name in SlotName:
        assert board.slot(name).size == SLOT_SIZE
        assert board.slot(name).check().status is SlotStatus.UNRECORDED
    assert not board.reboot_requested()


def test_a_new_board_keeps_its_otp_and_state_private(tmp_path):
    simulated_board(tmp_path / "gw")
    assert _mode(tmp_path / "gw" / "keystore.json") == 0o600
    assert _mode(tmp_path / "gw" / "state") == 0o700


def test_the_simulated_board_is_a_gateway_board_configured_by_the_toml_in_its_directory(tmp_path):
    from board.gateway import GatewayBoard

    board = simulated_board(tmp_path / "gw")
    again = GatewayBoard.from_toml(tmp_path / "gw" / CONFIG_NAME)
    assert again.config == board.config
    assert isinstance(board, GatewayBoard)


def test_the_environment_of_a_new_board_is_what_fw_printenv_reads(tmp_path):
    fw_printenv = require_tool("fw_printenv", "Debian's libubootenv-tool")
    simulated_board(tmp_path / "gw")
    output = subprocess.run(
        [fw_printenv, "-c", str(tmp_path / "gw" / "fw_env.config")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sorted(output.split()) == ["boot_slot=a", "bootcount=0", "bootlimit=3", "upgrade_available=0"]


def test_a_board_created_with_an_image_holds_it_valid_in_slot_a(tmp_path):
    image = signed_image(tmp_path, "1.0.0")
    board = simulated_board(tmp_path / "gw", image=image)
    check = board.slot(SlotName.A).check()
    assert (check.status, check.detail) == (SlotStatus.VALID, "holds image 1.0.0+0")
    assert board.slot(SlotName.B).check().status is SlotStatus.UNRECORDED


def test_a_board_created_in_an_empty_existing_directory_is_fine(tmp_path):
    (tmp_path / "gw").mkdir()
    simulated_board(tmp_path / "gw")


@pytest.mark.parametrize(
    "identity",
    [
        Identity("", "Acme", "gw-100", ""),
        Identity("GW\n1", "Acme", "gw-100", ""),
        Identity("GW-1", " ", "gw-100", ""),
        Identity("GW-1", "Acme", "", ""),
        Identity("GW-1", "Acme", "gw-100", "rev\tB"),
    ],
)
def test_an_unusable_identity_creates_nothing(tmp_path, identity):
    with pytest.raises(ConfigError) as caught:
        SimBoard.create(tmp_path / "gw", identity)
    assert caught.value.field.startswith("identity.")
    assert os.listdir(tmp_path) == []


def test_a_board_is_never_created_over_an_existing_one(tmp_path):
    simulated_board(tmp_path / "gw")
    before = sorted(os.listdir(tmp_path / "gw"))
    with pytest.raises(ConfigError) as caught:
        simulated_board(tmp_path / "gw")
    assert caught.value.field == "directory"
    assert sorted(os.listdir(tmp_path / "gw")) == before


def test_an_image_too_large_for_the_slots_creates_nothing(tmp_path):
    image = signed_image(tmp_path, payload=os.urandom(SLOT_SIZE + 1))
    with pytest.raises(ConfigError, match="does not fit"):
        simulated_board(tmp_path / "gw", image=image)
    assert not [name for name in os.listdir(tmp_path) if not name.startswith("image")]


def test_a_crash_while_creating_a_board_leaves_no_half_board(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise PowerCut

    monkeypatch.setattr(simboard_module, "create_env", crash)
    with pytest.raises(PowerCut):
        simulated_board(tmp_path / "gw")
    assert os.listdir(tmp_path) == []


def test_opening_a_directory_that_is_not_a_board_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        SimBoard.open(tmp_path)
    assert caught.value.field == "directory"


# --- the installer's path --------------------------------------------------------------------------


def test_the_installer_writes_the_inactive_slot_records_it_and_switches(tmp_path):
    board = simulated_board(tmp_path / "gw")
    image = signed_image(tmp_path)
    assert install(board, image) is SlotName.B
    assert board.slot(SlotName.B).check().status is SlotStatus.VALID
    assert board.slot(SlotName.B).record() == slot_record_of_image(image)
    assert board.boot_env.read()["boot_slot"] == "b"


def test_no_slot_can_be_opened_for_writing_while_a_switch_waits_for_the_reboot(tmp_path):
    board = simulated_board(tmp_path / "gw")
    install(board, signed_image(tmp_path))
    before = board.slot(SlotName.B).record()
    with pytest.raises(ActiveSlotWriteError):
        board.open_inactive_slot_for_writing()
    assert board.slot(SlotName.B).record() == before  # refused before anything was touched


def test_no_slot_can_be_opened_for_writing_while_the_running_slot_is_on_trial(tmp_path):
    board = simulated_board(tmp_path / "gw")
    install(board, signed_image(tmp_path))
    board.record_boot(SlotName.B)
    with pytest.raises(ActiveSlotWriteError, match="fallback"):
        board.open_inactive_slot_for_writing()
    board.boot_env.write({"upgrade_available": "0"})  # what `mers confirm` does
    assert board.inactive_slot() is SlotName.A


def test_the_record_of_the_running_slot_cannot_be_replaced(tmp_path):
    board = simulated_board(tmp_path / "gw", image=signed_image(tmp_path, "1.0.0"))
    before = (tmp_path / "gw" / "slot-a.record").read_bytes()
    with pytest.raises(ActiveSlotWriteError):
        board.write_slot_record(SlotName.A, slot_record_of_image(signed_image(tmp_path, "2.0.0")))
    assert (tmp_path / "gw" / "slot-a.record").read_bytes() == before


def test_without_a_running_slot_on_the_command_line_nothing_is_written(tmp_path):
    board = simulated_board(tmp_path / "gw")
    board.record_boot(None)  # the last boot attempt failed: nothing runs
    assert board.running_slot() is None
    with pytest.raises(RunningSlotUnknownError):
        board.open_inactive_slot_for_writing()


def test_a_write_past_the_slot_size_is_refused(tmp_path):
    board = simulated_board(tmp_path / "gw")
    with board.open_inactive_slot_for_writing() as slot, pytest.raises(SlotFullError):
        slot.write(bytes(SLOT_SIZE + 1))
    assert (tmp_path / "gw" / "slot-b.img").stat().st_size == SLOT_SIZE


def test_a_reboot_is_a_request_the_bootloader_serves(tmp_path):
    board = simulated_board(tmp_path / "gw")
    board.reboot()
    assert board.reboot_requested()
    board.record_boot(SlotName.A)
    assert not board.reboot_requested()


# --- the OTP and the state directory through the board ---------------------------------------------


def test_keys_boarding_data_and_the_lock_persist_across_reopening(tmp_path):
    board: Board = simulated_board(tmp_path / "gw")
    slot = board.write_key(0, der())
    assert slot.state is KeySlotState.WRITTEN
    board.write_boarding_data(boarding())
    board.lock()
    reopened = SimBoard.open(tmp_path / "gw")
    assert reopened.is_locked()
    assert reopened.key_slots()[0].public_key_der == der()
    assert reopened.boarding_data() == boarding()
    summary = reopened.boarding_summary()
    assert summary is not None and summary.client_id == "agent-1"
    with pytest.raises(BoardLockedError):
        reopened.write_key(1, der(index=1))


def test_the_state_store_is_the_boards_state_directory(tmp_path):
    board = simulated_board(tmp_path / "gw")
    assert isinstance(board.state, StateDirectory)
    board.state.write("credentials", b"secret")
    assert _mode(tmp_path / "gw" / "state" / "credentials") == 0o600


def test_a_crash_while_recording_a_slot_leaves_it_marked_incomplete_never_valid(tmp_path, monkeypatch):
    board = simulated_board(tmp_path / "gw")
    install(board, signed_image(tmp_path, "1.0.0"), switch=False)
    image = signed_image(tmp_path, "2.0.0")
    record = slot_record_of_image(image)
    with board.open_inactive_slot_for_writing() as slot, open(image, "rb") as source:
        source.seek(payload_offset(record))
        slot.write(source.read(record.payload_size))

    def crash(source, destination):
        raise PowerCut

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PowerCut):
        board.write_slot_record(SlotName.B, record)
    monkeypatch.undo()
    assert board.slot(SlotName.B).check().status is SlotStatus.INCOMPLETE


def test_a_crash_before_a_slot_is_marked_for_writing_leaves_its_record_and_content(tmp_path, monkeypatch):
    board = simulated_board(tmp_path / "gw")
    install(board, signed_image(tmp_path), switch=False)

    def crash(source, destination):
        raise PowerCut

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PowerCut):
        board.open_inactive_slot_for_writing()
    monkeypatch.undo()
    assert board.slot(SlotName.B).check().status is SlotStatus.VALID

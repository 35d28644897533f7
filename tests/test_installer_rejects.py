"""Images the board must refuse, through `mers install` against a real hub: the ones the header and the
trailer decide are refused before a slot byte is written; a payload changed after signing is refused
after the download and never activated. Each time the task is FAILED with the reason, and the active slot
and the boot environment are exactly as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from board.interface import SlotName
from mers.errors import EXIT_REJECTED
from mers.journal import Phase, load_journal
from signing.keys import KeyAlgorithm
from tests.firmware_helpers import new_task, trust
from tests.hub_helpers import RunningHub
from tests.installer_helpers import Rig, make_rig, slot_files
from tests.signing_helpers import signer_for


def wrong_key(rig: Rig) -> Path:
    other = signer_for(KeyAlgorithm.ECDSA_P256)
    trust(rig.hub, other, name="another key")  # the hub accepts it; the board does not know it
    return rig.image("2.0.0", counter=2, signer=other)


def wrong_class(rig: Rig) -> Path:
    return rig.image("2.0.0", counter=2, image_class="gateway-g2")


def lower_counter(rig: Rig) -> Path:
    rig.board.raise_security_counter_floor(5)
    return rig.image("2.0.0", counter=3)


def oversized(rig: Rig) -> Path:
    return rig.image("2.0.0", counter=2, size=(4 << 20) + 1)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (wrong_key, "untrusted key"),
        (wrong_class, "class UUID"),
        (lower_counter, "security counter 3 is below the device's floor 5"),
        (oversized, "does not fit"),
    ],
    ids=["wrong-key", "wrong-class", "lower-counter", "oversized"],
)
def test_image_decidable_from_header_and_trailer_is_rejected_before_any_write(
    hub: RunningHub, tmp_path: Path, make: Callable[[Rig], Path], field: str
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(make(rig))
    board = rig.board
    before = {name: slot_files(board, name) for name in SlotName}
    env = board.boot_env.read()

    refused = rig.mers("install", "--task", task_id, "--no-progress")

    assert refused.returncode == EXIT_REJECTED, refused.stderr
    assert field in refused.error_line
    task = rig.task(task_id)
    assert task["state"] == "FAILED" and field in task["message"]
    assert {name: slot_files(board, name) for name in SlotName} == before, "no slot byte written"
    assert board.boot_env.read() == env and not board.reboot_requested()
    journal = load_journal(board.state)
    assert journal.phase is Phase.IDLE and "FAILED" in journal.message


def test_payload_changed_on_the_server_is_rejected_after_download_and_never_activated(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    release = rig.release(rig.image("2.0.0", counter=2))
    blob = hub.state.blobs / release["sha256"]
    data = bytearray(blob.read_bytes())
    data[4096] ^= 0x55  # inside the payload: same size, same URL, same ETag
    blob.write_bytes(bytes(data))
    task_id = new_task(hub, rig.gateway.agent_id, release["id"])["id"]
    board = rig.board
    active_before = slot_files(board, SlotName.A)
    env = board.boot_env.read()

    refused = rig.mers("install", "--task", task_id, "--no-progress")

    assert refused.returncode == EXIT_REJECTED, refused.stderr
    assert "hash" in refused.error_line
    task = rig.task(task_id)
    assert task["state"] == "FAILED" and "differs from the signed SHA256" in task["message"]
    assert slot_files(board, SlotName.A) == active_before
    assert board.boot_env.read() == env and not board.reboot_requested()
    assert board.slot(SlotName.B).check().status.value == "incomplete", "the written slot is never bootable"
    assert rig.boot().decision.slot is SlotName.A

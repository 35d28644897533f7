"""The simulated bootloader: U-Boot's bootcount model as a pure decision, and the thin layer that boots a
simulated board with real environment writes and real slot hashes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from board import fw_env_config
from board.bootloader import BootDecision, BootOutcome, BootReason, boot, decide_boot
from board.errors import BootEnvError
from board.interface import SlotName, SlotStatus
from board.simboard import SimBoard
from board.ubootenv import NoValidEnvironmentError, UBootEnv
from tests.board_helpers import corrupt, install, signed_image, simulated_board
from tests.conftest import require_tool

BOTH_GOOD = {SlotName.A: True, SlotName.B: True}


def env(boot_slot: str = "a", upgrade: str = "0", count: str = "0", limit: str = "3") -> dict[str, str]:
    return {"boot_slot": boot_slot, "upgrade_available": upgrade, "bootcount": count, "bootlimit": limit}


class OnlyChecks(Mapping[SlotName, bool]):
    """Slot validity that fails the test if any slot but `allowed` is consulted."""

    def __init__(self, allowed: SlotName, valid: bool) -> None:
        self.allowed, self.valid = allowed, valid

    def __getitem__(self, name: SlotName) -> bool:
        assert name is self.allowed, f"slot {name} was checked needlessly"
        return self.valid

    def __iter__(self) -> Iterator[SlotName]:
        return iter(SlotName)

    def __len__(self) -> int:
        return 2


# --- the decision (pure) ---------------------------------------------------------------------------


def test_a_committed_slot_boots_without_writing_the_environment():
    decision = decide_boot(env("b"), OnlyChecks(SlotName.B, True))
    assert (decision.slot, decision.outcome, decision.reason) == (
        SlotName.B,
        BootOutcome.BOOTED,
        BootReason.COMMITTED,
    )
    assert decision.env_changes == {}


def test_a_trial_boot_counts_before_booting_the_new_slot():
    decision = decide_boot(env("b", "1", "1"), OnlyChecks(SlotName.B, True))
    assert (decision.slot, decision.reason, decision.bootcount) == (SlotName.B, BootReason.TRIAL, 2)
    assert decision.upgrade_available
    assert decision.env_changes == {"bootcount": "2"}


def test_a_trial_past_the_bootlimit_rolls_back_in_two_saves_as_real_u_boot_does():
    """bootcount_store saves the count, then altbootcmd switches the slot and saves again."""
    decision = decide_boot(env("b", "1", "3"), OnlyChecks(SlotName.A, True))
    assert (decision.slot, decision.reason, decision.outcome) == (
        SlotName.A,
        BootReason.ROLLBACK,
        BootOutcome.BOOTED,
    )
    assert decision.env_writes == ({"bootcount": "4"}, {"boot_slot": "a", "upgrade_available": "0"})
    assert decision.env_changes == {"bootcount": "4", "boot_slot": "a", "upgrade_available": "0"}
    assert not decision.upgrade_available


def test_a_power_cut_between_the_two_saves_of_a_rollback_rolls_back_at_the_next_power_on():
    variables = env("b", "1", "3")
    counted = {**variables, **decide_boot(variables, BOTH_GOOD).env_writes[0]}  # the switch never saved
    again = decide_boot(counted, BOTH_GOOD)
    assert (again.slot, again.reason, again.bootcount) == (SlotName.A, BootReason.ROLLBACK, 5)
    assert again.env_writes == ({"bootcount": "5"}, {"boot_slot": "a", "upgrade_available": "0"})


def test_a_slot_that_fails_its_check_is_a_failed_boot_attempt():
    decision = decide_boot(env("b", "1", "0"), OnlyChecks(SlotName.B, False))
    assert (decision.outcome, decision.bootcount) == (BootOutcome.FAILED, 1)
    assert decision.env_changes == {"bootcount": "1"}  # the count is saved before the kernel is tried


def test_missing_counters_take_u_boot_defaults():
    decision = decide_boot({"boot_slot": "a", "upgrade_available": "1"}, BOTH_GOOD)
    assert (decision.bootcount, decision.bootlimit) == (1, 0)
    assert decide_boot({"boot_slot": "a"}, BOTH_GOOD).reason is BootReason.COMMITTED


@pytest.mark.parametrize(
    ("count", "limit", "reason", "bootcount"),
    [
        ("0x3", "3", BootReason.ROLLBACK, 4),  # hexadecimal, as simple_strtoul reads a 0x prefix
        ("1", "0x2", BootReason.TRIAL, 2),
        ("2", "0x2", BootReason.ROLLBACK, 3),
        ("2", "2abc", BootReason.ROLLBACK, 3),  # digits up to the first other character
        ("-1", "3", BootReason.TRIAL, 1),  # no digits: 0
        ("5", "three", BootReason.TRIAL, 6),  # no digits: no limit
    ],
)
def test_the_counters_are_read_as_u_boot_reads_them(count, limit, reason, bootcount):
    decision = decide_boot(env("b", "1", count, limit), BOTH_GOOD)
    assert (decision.reason, decision.bootcount) == (reason, bootcount)


@pytest.mark.parametrize("limit", [None, "0", "three"])
def test_without_a_positive_bootlimit_a_failing_trial_is_booted_for_ever_as_u_boot_does(limit):
    variables = {"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"}
    if limit is not None:
        variables["bootlimit"] = limit
    for attempt in range(1, 51):
        decision = decide_boot(variables, {SlotName.A: True, SlotName.B: False})
        assert (decision.slot, decision.reason, decision.outcome) == (
            SlotName.B,
            BootReason.TRIAL,
            BootOutcome.FAILED,
        )
        assert decision.env_changes == {"bootcount": str(attempt)}, "never rolled back"
        variables = {**variables, **decision.env_changes}


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({}, "boot_slot"),
        (env("c"), "boot_slot"),
        (env("a", "yes"), "upgrade_available"),
    ],
)
def test_an_environment_outside_the_model_stops_the_boot_naming_the_variable(variables, field):
    with pytest.raises(BootEnvError) as caught:
        decide_boot(variables, BOTH_GOOD)
    assert caught.value.field == field


environments = st.builds(
    env,
    boot_slot=st.sampled_from(["a", "b"]),
    upgrade=st.sampled_from(["0", "1"]),
    count=st.integers(0, 12).map(str),
    limit=st.integers(0, 8).map(str),
)
validity = st.fixed_dictionaries({SlotName.A: st.booleans(), SlotName.B: st.booleans()})


@given(variables=environments, valid=validity)
def test_every_decision_follows_the_bootcount_rules(variables, valid):
    decision = decide_boot(variables, valid)
    assert decision.outcome is (BootOutcome.BOOTED if valid[decision.slot] else BootOutcome.FAILED)
    if variables["upgrade_available"] == "0":
        assert decision.env_changes == {}
        assert decision.slot.value == variables["boot_slot"]
        return
    count = int(variables["bootcount"]) + 1
    assert decision.env_changes["bootcount"] == str(count)
    limit = int(variables["bootlimit"])
    if limit > 0 and count > limit:  # 0 turns the limit off
        assert decision.slot.value != variables["boot_slot"]
        assert decision.env_changes == {
            "bootcount": str(count),
            "boot_slot": decision.slot.value,
            "upgrade_available": "0",
        }
    else:
        assert decision.slot.value == variables["boot_slot"]
        assert decision.env_changes == {"bootcount": str(count)}


def _boot_until_committed(variables: dict[str, str], valid: Mapping[SlotName, bool]) -> list[BootDecision]:
    decisions = []
    for _ in range(20):
        decision = decide_boot(variables, valid)
        variables = {**variables, **decision.env_changes}
        decisions.append(decision)
        if not decision.upgrade_available:
            break
    return decisions


@given(limit=st.integers(1, 8), new_slot_good=st.booleans())
def test_an_unconfirmed_trial_ends_on_the_old_slot_after_bootlimit_trial_boots(limit, new_slot_good):
    decisions = _boot_until_committed(
        env("b", "1", "0", str(limit)), {SlotName.A: True, SlotName.B: new_slot_good}
    )
    trials, last = decisions[:-1], decisions[-1]
    assert len(trials) == limit
    assert all(d.slot is SlotName.B and d.reason is BootReason.TRIAL for d in trials)
    assert all(d.outcome is (BootOutcome.BOOTED if new_slot_good else BootOutcome.FAILED) for d in trials)
    assert (last.slot, last.reason, last.outcome) == (SlotName.A, BootReason.ROLLBACK, BootOutcome.BOOTED)
    after = {**env("b", "1", "0", str(limit))}
    for decision in decisions:
        after.update(decision.env_changes)
    assert decide_boot(after, {SlotName.A: True, SlotName.B: new_slot_good}).env_changes == {}


# --- booting a simulated board (I/O) ---------------------------------------------------------------


def env_flags(board: SimBoard) -> int:
    """The current copy's flags: each environment write raises them by one."""
    env = UBootEnv(fw_env_config.load(board.config.fw_env_config), lock_path=board.config.env_lock_file)
    flags = next(copy.flags for copy in env.copies() if copy.current)
    assert flags is not None
    return flags


@pytest.fixture
def upgraded(tmp_path) -> SimBoard:
    """A board running slot a that installed an image into slot b and asked for a reboot."""
    board = simulated_board(tmp_path / "gw", image=signed_image(tmp_path, "1.0.0"))
    install(board, signed_image(tmp_path, "2.0.0"))
    board.reboot()
    return board


def test_booting_after_an_upgrade_runs_the_new_slot_on_trial(upgraded):
    flags = env_flags(upgraded)
    result = boot(upgraded)
    assert result.message == "booted slot b: trial boot 1 of 3; holds image 2.0.0+0"
    assert result.check.status is SlotStatus.VALID
    assert upgraded.running_slot() is SlotName.B
    assert not upgraded.reboot_requested()
    assert upgraded.boot_env.read()["bootcount"] == "1"
    assert env_flags(upgraded) == flags + 1


def test_a_corrupted_new_slot_fails_every_trial_saving_the_count_then_rolls_back_saving_twice(upgraded):
    corrupt(upgraded.slot(SlotName.B).device)
    for attempt in (1, 2, 3):
        flags = env_flags(upgraded)
        result = boot(upgraded)
        assert result.decision.outcome is BootOutcome.FAILED
        assert result.message.startswith(
            f"boot of slot b failed (trial boot {attempt} of 3): the content hashes to"
        )
        assert result.message.endswith("boot again")
        assert upgraded.running_slot() is None
        assert env_flags(upgraded) == flags + 1
    flags = env_flags(upgraded)
    result = boot(upgraded)
    assert (
        result.message
        == "booted slot a: rolled back from slot b (bootcount 4 > bootlimit 3); holds image 1.0.0+0"
    )
    assert env_flags(upgraded) == flags + 2  # the count, then altbootcmd's switch
    assert upgraded.boot_env.read() == env("a", "0", "4")
    assert upgraded.running_slot() is SlotName.A
    flags = env_flags(upgraded)
    assert boot(upgraded).decision.reason is BootReason.COMMITTED
    assert env_flags(upgraded) == flags  # a committed boot writes nothing


def test_after_a_rollback_fw_printenv_sees_the_old_slot_committed(upgraded):
    fw_printenv = require_tool("fw_printenv", "Debian's libubootenv-tool")
    corrupt(upgraded.slot(SlotName.B).device)
    while boot(upgraded).decision.outcome is BootOutcome.FAILED:
        pass
    output = subprocess.run(
        [fw_printenv, "-c", str(upgraded.config.fw_env_config), "boot_slot", "upgrade_available"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert output.split() == ["boot_slot=a", "upgrade_available=0"]


def test_a_board_without_bootlimit_never_rolls_a_corrupted_trial_back(upgraded):
    upgraded.boot_env.write({"bootlimit": None})
    corrupt(upgraded.slot(SlotName.B).device)
    for attempt in range(1, 11):
        result = boot(upgraded)
        assert result.decision.outcome is BootOutcome.FAILED and result.decision.slot is SlotName.B
        assert result.message.startswith(f"boot of slot b failed (trial boot {attempt}, no bootlimit")
    assert upgraded.boot_env.read() == {"boot_slot": "b", "upgrade_available": "1", "bootcount": "10"}


def test_a_corrupted_committed_slot_fails_every_boot_without_touching_the_environment(tmp_path):
    board = simulated_board(tmp_path / "gw", image=signed_image(tmp_path, "1.0.0"))
    corrupt(board.slot(SlotName.A).device, 10)
    flags = env_flags(board)
    for _ in range(5):
        result = boot(board)
        assert result.decision.outcome is BootOutcome.FAILED
        assert result.message.endswith("nothing is on trial, so every boot will try slot a again")
    assert env_flags(board) == flags


def test_a_slot_half_written_since_its_record_does_not_boot(tmp_path):
    board = simulated_board(tmp_path / "gw")
    install(board, signed_image(tmp_path), switch=False)
    with board.open_inactive_slot_for_writing() as slot:
        slot.write(b"the start of another image")
    board.boot_env.write({"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"})  # an installer bug
    result = boot(board)
    assert result.decision.outcome is BootOutcome.FAILED
    assert result.check.status is SlotStatus.INCOMPLETE


def test_an_unreadable_environment_stops_the_boot_and_nothing_is_written(tmp_path):
    board = simulated_board(tmp_path / "gw")
    for name in ("uboot-env.0", "uboot-env.1"):
        corrupt(tmp_path / "gw" / name, 2)
    board.reboot()
    before = {
        name: (tmp_path / "gw" / name).read_bytes() for name in ("uboot-env.0", "uboot-env.1", "cmdline")
    }
    with pytest.raises(NoValidEnvironmentError):
        boot(board)
    assert {name: (tmp_path / "gw" / name).read_bytes() for name in before} == before
    assert board.reboot_requested()


def test_the_json_form_carries_the_decision_and_the_check(upgraded):
    document = boot(upgraded).as_json()
    assert document["outcome"] == "booted" and document["slot"] == "b" and document["reason"] == "trial"
    assert (document["bootcount"], document["bootlimit"], document["upgrade_available"]) == (1, 3, True)
    assert document["env_changes"] == {"bootcount": "1"}
    assert document["slot_status"] == "valid"

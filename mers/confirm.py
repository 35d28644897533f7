"""`mers confirm`: after a boot, commit the slot on trial or report that it failed (docs/design.md §8).

RAUC's vocabulary: a healthy trial is marked good (`upgrade_available=0`, the security-counter floor
raised to the image's counter, the task ACTIVATED); an unhealthy one is left for the bootloader, which
rolls back after `bootlimit` boots, and the rollback is reported as FAILED with its reason. The old slot is
never touched, so the board always has something to boot.

Every step is idempotent and ordered so a power cut at any point is finished by the next `confirm`:
commit the environment, then raise the floor, then report, then end the journal.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from board.interface import (
    ENV_BOOT_SLOT,
    ENV_BOOTCOUNT,
    ENV_BOOTLIMIT,
    ENV_UPGRADE_AVAILABLE,
    Board,
    uboot_number,
)

from .client import DeviceClient
from .errors import HubRefusedError, MersError, NotConfirmedError, ReonboardingRequiredError, TaskClosedError
from .health_hook import run_health_hook
from .journal import Journal, Phase, SourceKind, journal_owner, load_journal, save_journal
from .tasks import TaskClient, TaskState

HEALTH_TIMEOUT = 120.0
#: refusals of a final report (ACTIVATED, FAILED) that no retry changes: the task is unknown to the hub
#: (the device was onboarded again as another agent), or the hub will not take the report. The board's
#: state is final by then, so the journal ends and the refusal is logged; anything else is retried. Not
#: 409: the hub answers it to a report that lost a race, to be tried again (a task closed meanwhile is
#: `TaskClosedError` on the next try, which ends the journal too)
_FINAL_REFUSALS = frozenset({400, 403, 404, 410, 422})
log = logging.getLogger("mers.confirm")


class ConfirmStep(enum.StrEnum):
    """Points of a confirm a hook sees (the power-cut tests SIGKILL the process there)."""

    CONFIRMING = "confirming"  # journal CONFIRMING; health checks next
    HEALTHY = "healthy"  # the checks passed; nothing committed yet
    COMMITTED = "committed"  # upgrade_available=0 written
    FLOOR_RAISED = "floor-raised"  # the security-counter floor is the image's counter
    REPORTED = "reported"  # the task is ACTIVATED; the journal not yet IDLE


class ConfirmOutcome(enum.StrEnum):
    NOTHING = "nothing"  # no install awaits confirmation
    PENDING = "pending"  # the new slot is armed but the board has not rebooted into it yet
    ACTIVATED = "activated"
    FAILED = "failed"  # rolled back (reported); the old slot runs


@dataclass(frozen=True)
class ConfirmResult:
    outcome: ConfirmOutcome
    message: str


Hook = Callable[[ConfirmStep], None]


class Confirmer:
    """Commits or refuses the trial of the journalled install on `board`."""

    def __init__(
        self,
        board: Board,
        client: DeviceClient | None = None,
        *,
        health_command: Sequence[str] | str | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
        hook: Hook | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.board = board
        self.client = client
        self._unparsable_hook = ""
        if isinstance(health_command, str):
            try:
                health_command = shlex.split(health_command)
            except ValueError as exc:  # an unbalanced quote: no check can vouch for the trial
                self._unparsable_hook = str(exc)
                health_command = ()
        self.health_command = tuple(health_command or ())
        self.health_timeout = health_timeout
        self._hook = hook
        self._should_stop = should_stop

    def confirm(self) -> ConfirmResult:
        """Commit a healthy trial (ACTIVATED), report a rollback (FAILED, `NotConfirmedError`), or
        refuse an unhealthy trial (`NotConfirmedError`; the board reboots to count the next attempt)."""
        with journal_owner(self.board.state):
            return self._confirm()

    def _confirm(self) -> ConfirmResult:
        journal = load_journal(self.board.state)
        if journal.phase not in (Phase.VERIFIED, Phase.SWITCHED, Phase.REBOOTING, Phase.CONFIRMING):
            return ConfirmResult(ConfirmOutcome.NOTHING, "no install awaits confirmation")
        running = self.board.active_slot()
        env = self.board.boot_env.read()
        if running == journal.slot:
            return self._confirm_running(journal, env)
        if env.get(ENV_BOOT_SLOT) == journal.slot and env.get(ENV_UPGRADE_AVAILABLE) == "1":
            return ConfirmResult(ConfirmOutcome.PENDING, f"slot {journal.slot} boots next: reboot to try it")
        if journal.phase is Phase.VERIFIED:
            return ConfirmResult(ConfirmOutcome.NOTHING, "the verified image is not activated yet")
        return self._rolled_back(journal, env)

    def _confirm_running(self, journal: Journal, env: dict[str, str]) -> ConfirmResult:
        committed = env.get(ENV_UPGRADE_AVAILABLE, "0") == "0"
        if not committed:
            journal = journal.advanced(Phase.CONFIRMING)
            save_journal(self.board.state, journal)
            self._step(ConfirmStep.CONFIRMING)
            problem = self._health_problem(journal)
            if problem is not None:
                return self._unhealthy(journal, env, problem)
            self._step(ConfirmStep.HEALTHY)
            self.board.boot_env.write({ENV_UPGRADE_AVAILABLE: "0", ENV_BOOTCOUNT: "0"})
        self._step(ConfirmStep.COMMITTED)
        if journal.security_counter > self.board.security_counter_floor():
            self.board.raise_security_counter_floor(journal.security_counter)
        self._step(ConfirmStep.FLOOR_RAISED)
        message = f"{journal.version} runs from slot {journal.slot} and is committed"
        self._report(journal, TaskState.ACTIVATED, message)
        self._step(ConfirmStep.REPORTED)
        save_journal(self.board.state, journal.finished(f"ACTIVATED: {message}"))
        return ConfirmResult(ConfirmOutcome.ACTIVATED, message)

    def _unhealthy(self, journal: Journal, env: dict[str, str], problem: str) -> ConfirmResult:
        """Leave the trial to the bootloader: record why, tell the hub, and reboot so the next attempt
        counts towards `bootlimit` (the rollback that follows is reported as FAILED)."""
        attempt = f"trial boot {env.get(ENV_BOOTCOUNT, '?')} of {env.get(ENV_BOOTLIMIT, '?')}"
        message = f"health check failed on {attempt}: {problem}"
        save_journal(self.board.state, journal.advanced(Phase.CONFIRMING, message=message))
        # the hub may be what is unhealthy; the rollback report carries the reason either way
        with contextlib.suppress(MersError):
            self._report(journal, TaskState.ACTIVATING, message)
        self.board.reboot()
        raise NotConfirmedError(f"{message}; rebooting (the bootloader rolls back after bootlimit)")

    def _rolled_back(self, journal: Journal, env: dict[str, str]) -> ConfirmResult:
        """The journal says switched, the board runs the old slot and will not try the new one."""
        limit = uboot_number(env.get(ENV_BOOTLIMIT))  # 0: U-Boot's limit is off, it never rolls back
        if limit > 0 and uboot_number(env.get(ENV_BOOTCOUNT)) > limit:
            reason = (
                f"the bootloader rolled back to slot {journal.previous_slot} after "
                f"{env.get(ENV_BOOTCOUNT, '?')} boots of slot {journal.slot} (bootlimit "
                f"{env.get(ENV_BOOTLIMIT, '?')})"
            )
        else:  # the power went between journalling the switch and writing the environment
            reason = (
                f"the switch to slot {journal.slot} was interrupted before the boot environment was "
                f"written; slot {journal.previous_slot} still runs: install {journal.version} again"
            )
        if journal.message:
            reason += f"; last: {journal.message}"
        self._report(journal, TaskState.FAILED, reason)
        save_journal(self.board.state, journal.finished(f"FAILED: {reason}"))
        raise NotConfirmedError(reason)

    def _health_problem(self, journal: Journal) -> str | None:
        """None when healthy: the hook command exits 0 and, for an onboarded device, the hub answers. A hub
        that answers with a refusal (the task unknown to it, say) is reachable: the trial is not blamed."""
        problem = self._hook_problem()
        if problem is not None:
            return problem
        if self.client is not None:
            try:
                if journal.source is SourceKind.TASK:
                    TaskClient(self.client).task(journal.task_id)
                else:
                    self.client.access_token()
            except HubRefusedError as exc:
                log.warning("the hub is reachable but refused the health request: %s", exc)
            except MersError as exc:
                return f"the hub is not reachable: {exc}"
        return None

    def _hook_problem(self) -> str | None:
        if self._unparsable_hook:
            return f"the health hook command cannot be split into words: {self._unparsable_hook}"
        if not self.health_command:
            return None
        return run_health_hook(self.health_command, self.health_timeout, self._should_stop)

    def _report(self, journal: Journal, state: TaskState, message: str) -> None:
        if journal.source is not SourceKind.TASK:
            return
        if self.client is None:
            raise NotConfirmedError("reporting the task needs the device client (onboarded device)")
        try:
            TaskClient(self.client).advance(journal.task_id, state, message=message)
        except TaskClosedError as exc:
            # the operator closed the task meanwhile: the board's state stands, there is nobody to tell
            log.warning("not reported as %s: %s", state, exc)
        except HubRefusedError as exc:
            if exc.status not in _FINAL_REFUSALS or isinstance(exc, ReonboardingRequiredError):
                raise
            # the hub will never take it (the task is not this agent's any more): the board's state
            # stands, and a journal kept for a report that cannot be made would block every next install
            log.warning("not reported as %s; the hub refuses it for good: %s", state, exc)

    def _step(self, step: ConfirmStep) -> None:
        if self._hook is not None:
            self._hook(step)

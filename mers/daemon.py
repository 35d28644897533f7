"""`mers run`: the daemon (docs/design.md §8). Onboard if needed, keep the credentials fresh, finish what the
journal left (confirm after a boot, resume a download), poll open installation tasks with backoff and
install them, one at a time.

SIGTERM sets a flag that the installer checks between chunks: it fsyncs the slot, journals the offset and
returns, so a stop never costs more than the chunk in hand and never leaves a journal ahead of the slot.
Errors are logged on one line each (never a URL or a secret) and retried with exponential backoff; an
error the operator must fix (a refused IAT, a corrupt state file) stops the daemon with its exit code.
A refused IAT stops it only when there are no credentials to go on with: pending boarding data whose IAT
the hub refused for good (used or expired) is logged once and set aside while the stored credentials
still work, as systemd would otherwise keep a working gateway down (`RestartPreventExitStatus`). A
failing slot is the exception among storage errors: it is logged and retried with the backoff, since an
exit only had systemd start the daemon again 30 s later to re-read the slot and fail again; with
`--once`, whose exit code is all a script sees, it exits 4 as `mers install` does.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

from board.errors import BoardError

from .boarding import current_boarding, refused_iat, set_aside_refused
from .client import DeviceClient
from .confirm import HEALTH_TIMEOUT, Confirmer, ConfirmOutcome
from .credentials import load_credentials
from .errors import (
    HubUnreachableError,
    IatExpiredError,
    IatUsedError,
    MersError,
    NoBoardingDataError,
    NotOnboardedError,
    ReonboardingRequiredError,
    SlotStorageError,
    StorageError,
)
from .install import Installer, InstallOutcome, InstallSettings
from .journal import load_journal
from .tasks import TaskClient

log = logging.getLogger("mers.run")

#: what no retry cures: the daemon exits with the error's code and the operator acts
OPERATOR_ERRORS = (
    NoBoardingDataError,
    NotOnboardedError,
    ReonboardingRequiredError,
    IatExpiredError,
    IatUsedError,
    StorageError,
)


@dataclass(frozen=True)
class DaemonSettings:
    poll_interval: float = 300.0  # between polls while all is well
    backoff_max: float = 3600.0  # the longest wait after errors in a row
    install: InstallSettings = field(default_factory=InstallSettings)
    health_command: str | None = None
    health_timeout: float = HEALTH_TIMEOUT


class Daemon:
    def __init__(self, client: DeviceClient, settings: DaemonSettings | None = None) -> None:
        self.client = client
        self.settings = settings or DaemonSettings()
        self._stop = threading.Event()
        self._failures = 0

    def stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Finish the chunk in hand, journal the offset, and return from `run` (a signal handler)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, once: bool = False) -> None:
        """Until SIGTERM (or one pass with `once`); returns after a reboot was requested."""
        while not self._stop.is_set():
            try:
                rebooting = self.cycle()
                self._failures = 0
            except SlotStorageError as exc:
                if once:
                    raise
                self._failures += 1
                log.error("%s; retrying later", exc)
                rebooting = False
            except OPERATOR_ERRORS:
                raise
            except HubUnreachableError as exc:
                self._failures += 1
                log.warning("hub unreachable, retrying later: %s", exc)
                rebooting = False
            except (MersError, BoardError) as exc:  # reported where it concerns a task; the next poll goes on
                self._failures += 1
                log.warning("%s: %s", type(exc).__name__, exc)
                rebooting = False
            if rebooting or once:
                return
            self._stop.wait(self._delay())

    def cycle(self) -> bool:
        """One pass; True when the board is rebooting into a new slot.

        Confirm comes first: a trial must be committed or refused (and so, in the end, rolled back) even
        when the hub is out of reach, which may be exactly what the new firmware broke. A switched but
        not yet rebooted install (PENDING) is resumed below: the installer requests the reboot."""
        board = self.client.board
        # a device installed from a file or URL before it was ever onboarded has no hub to ask: its health
        # is the hook's alone (as `mers confirm` decides), not "hub unreachable", which would roll back a
        # healthy trial
        onboarded = load_credentials(board.state) is not None
        confirmer = Confirmer(
            board,
            self.client if onboarded else None,
            health_command=self.settings.health_command,
            health_timeout=self.settings.health_timeout,
            should_stop=self._stop.is_set,  # SIGTERM during the check: no verdict, the next start asks again
        )
        confirmed = confirmer.confirm()
        if confirmed.outcome is not ConfirmOutcome.NOTHING:
            log.info("confirm: %s", confirmed.message)
        self._onboard(onboarded)
        self.client.renew()
        installer = Installer(
            board, self.client, settings=self.settings.install, should_stop=self._stop.is_set
        )
        if load_journal(board.state).busy:
            result = installer.resume()
        else:
            tasks = TaskClient(self.client).open_tasks()
            if not tasks:
                log.info("no open installation task")
                return False
            log.info("installing task %s (%s)", tasks[0].id, tasks[0].version)
            result = installer.install_task(tasks[0].id)
        if result is None:
            return False
        log.info("install: %s (%s)", result.outcome, result.journal.phase)
        return result.outcome is InstallOutcome.REBOOTING

    def _onboard(self, onboarded: bool) -> None:
        """Onboard if needed. Holding credentials, a refusal of the pending boarding data's IAT for good is
        no reason to stop: the credentials are kept (a failed registration never replaces them) and the
        IAT is set aside, so it is tried again only once imported again. Whether the credentials really
        still work is for the renewal and token calls that follow: a revoked agent ends in
        ReonboardingRequiredError there. Without credentials the refusal stops the daemon as before."""
        if not onboarded:
            self.client.onboard()
            return
        pending = self._pending_iat()
        if pending is not None and pending == refused_iat(self.client.board):
            return  # refused for good earlier, and logged then
        try:
            self.client.onboard()
        except (IatUsedError, IatExpiredError) as refused:
            if pending is None or self._pending_iat() != pending:  # replaced meanwhile: tried next pass
                log.error("pending boarding data refused, going on with the stored credentials: %s", refused)
                return
            set_aside_refused(self.client.board, pending)
            log.error("pending boarding data set aside, going on with the stored credentials: %s", refused)

    def _pending_iat(self) -> str | None:
        """The IAT id of the boarding data onboarding would use; None when unreadable (onboard says why)."""
        try:
            boarding = current_boarding(self.client.board)
        except (MersError, BoardError):
            return None
        return None if boarding is None else boarding.iat_id

    def _delay(self) -> float:
        return backoff_delay(self.settings, self._failures)


#: doublings beyond this change nothing (2**64 times any poll interval passes any `backoff_max`), and
#: 2**1024 no longer fits a float: after 1024 failures in a row (42 days without the hub at a 1 h cap)
#: the uncapped product raised OverflowError and crashed the daemon
_MAX_DOUBLINGS = 64


def backoff_delay(settings: DaemonSettings, failures: int) -> float:
    """The poll interval, doubled for each failure in a row up to `backoff_max`, with jitter so a fleet
    that lost its hub together does not come back together. Defined for any number of failures."""
    doublings = min(failures, _MAX_DOUBLINGS)
    base: float = min(settings.poll_interval * (2**doublings), settings.backoff_max)
    jitter: float = random.uniform(0.8, 1.2)  # noqa: S311 - spreading a fleet, not a secret
    return base * jitter

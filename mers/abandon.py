"""Ending an install the operator no longer wants, before it is armed (`mers abandon`).

An interrupted install is resumed from its journal, and a different install is refused until it ends
(docs/design.md §8). Usually it ends by itself: it finishes, its image is rejected, or its task is cancelled
on the hub. But some sources cannot come back: the USB stick was taken away, the signed URL expired and
the operator has no new one. Without a way out, such a journal would block every later install, and the
daemon would retry it forever.

Only an install that has not switched can be abandoned (DOWNLOADING or VERIFIED), and only while the
board agrees: it still runs the slot the install started from, and its boot environment does not point
at the new slot (a journal is written before the environment, but an older mers or a hand-edited
environment could have flipped it). Then the inactive slot is never booted and the running firmware is
untouched; the slot keeps what was written (part of the image, or the verified image and its record),
inert until the next install overwrites it. From SWITCHED on, the switch has begun, and the bootloader
and `mers confirm` decide how the install ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from board.interface import ENV_BOOT_SLOT, Board

from .client import DeviceClient
from .errors import AbandonRefusedError, MersError, NotOnboardedError, TaskClosedError
from .install import describe_install
from .journal import Journal, Phase, SourceKind, journal_owner, load_journal, save_journal
from .tasks import TaskClient, TaskState

log = logging.getLogger("mers.abandon")

ABANDONABLE = (Phase.DOWNLOADING, Phase.VERIFIED)


@dataclass(frozen=True)
class Abandoned:
    """What `abandon_install` ended: the journal as it stood, and whether the hub heard of it."""

    journal: Journal
    message: str  # the reason, as journalled and reported
    hub_note: str = ""  # for a task, what the hub now knows (empty for a file or a URL)


def abandon_install(board: Board, client: DeviceClient | None, reason: str) -> Abandoned | None:
    """End the install under way, if it has not switched; None when no install is under way.

    A task is reported FAILED with the reason, so the hub and a daemon polling it move on. The journal ends
    even when the hub cannot be told (the operator asked, and the device may be offline for good): the
    task then stays open on the hub, and `hub_note` says so."""
    with journal_owner(board.state):
        journal = load_journal(board.state)
        if not journal.busy:
            return None
        if journal.phase not in ABANDONABLE:
            raise AbandonRefusedError(
                f"the install of {journal.version} ({describe_install(journal)}) is {journal.phase}: the "
                "switch has begun, so the bootloader and `mers confirm` decide how it ends"
            )
        _refuse_if_armed(board, journal)
        message = f"abandoned by the operator: {reason}"
        hub_note = ""
        if journal.source is SourceKind.TASK:
            hub_note = _report_failed(client, journal.task_id, message)
        save_journal(board.state, journal.finished(message))
        return Abandoned(journal, message, hub_note)


def _refuse_if_armed(board: Board, journal: Journal) -> None:
    """The journal says "not switched"; the board must say so too."""
    env = board.boot_env.read()
    running = board.active_slot()
    if running != journal.previous_slot or env.get(ENV_BOOT_SLOT) == journal.slot:
        raise AbandonRefusedError(
            f"the journal says {journal.phase}, but the board runs slot {running} and boots slot "
            f"{env.get(ENV_BOOT_SLOT)} next (the install started from slot {journal.previous_slot}): the "
            "new slot may be armed, so the bootloader and `mers confirm` decide how the install ends"
        )


def _report_failed(client: DeviceClient | None, task_id: str, message: str) -> str:
    """Report the task FAILED; what the hub now knows, in words."""
    try:
        if client is None:
            raise NotOnboardedError("the device holds no credentials")
        TaskClient(client).advance(task_id, TaskState.FAILED, message=message)
    except TaskClosedError as exc:
        return f"the hub had already closed it ({exc})"
    except MersError as exc:
        log.warning("task %s not reported FAILED: %s", task_id, exc)
        return f"the hub was not told ({exc}): cancel task {task_id} there, or `mers run` will start it again"
    return f"task {task_id} reported FAILED"

"""Installation tasks: the state machine a device walks through while it installs a release, and the
database operations that move a task along it.

CREATED → DOWNLOADING → DOWNLOADED → INSTALLING → INSTALLED → ACTIVATING → ACTIVATED, or FAILED / CANCELED
from any open state. A task may stay where it is (progress reports); any other move, and any change at
all to a closed task, is a conflict: a delayed or replayed report can never reopen a finished task or
claim a step the device skipped. Each accepted change is one conditional UPDATE on the task's eTag, so
two concurrent reports cannot both apply from the same state (one CANCELED, the other ACTIVATED, say);
the loser re-reads and is judged against what won. Every accepted change is appended to the history.

A device has at most one open task: a second one would be installed after the first, in an order the
operator did not choose (a newer release, then an older one). Creating one while another is open is a
conflict naming the open task, to be cancelled first.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .database import Database
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .etags import EtagCondition
from .models import Agent, InstallationTask, Release, TaskTransition
from .releases import ReleaseView, get_release, is_well_formed_id, new_id
from .signed_urls import SignedUrl
from .timefmt import iso

SOFTWARE_TYPE = "FIRMWARE"
#: how often a change is re-judged after losing a race to another one before giving up
_ATTEMPTS = 8


class TaskState(enum.StrEnum):
    CREATED = "CREATED"
    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    INSTALLING = "INSTALLING"
    INSTALLED = "INSTALLED"
    ACTIVATING = "ACTIVATING"
    ACTIVATED = "ACTIVATED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


#: the way a successful installation goes, one step at a time
PROGRESSION = (
    TaskState.CREATED,
    TaskState.DOWNLOADING,
    TaskState.DOWNLOADED,
    TaskState.INSTALLING,
    TaskState.INSTALLED,
    TaskState.ACTIVATING,
    TaskState.ACTIVATED,
)
#: reachable from every open state
ENDINGS = frozenset({TaskState.FAILED, TaskState.CANCELED})
CLOSED = frozenset({TaskState.ACTIVATED, *ENDINGS})
OPEN = frozenset(TaskState) - CLOSED


def allowed_targets(state: TaskState) -> frozenset[TaskState]:
    """Where a task in `state` may go next (itself included while it is open)."""
    if state in CLOSED:
        return frozenset()
    following = PROGRESSION[PROGRESSION.index(state) + 1]
    return frozenset({state, following, *ENDINGS})


@dataclass(frozen=True)
class TaskStatus:
    state: TaskState
    progress: float
    message: str


@dataclass(frozen=True)
class TaskChange:
    """A report: a new state, progress (0..1) or message; what is None stays as it was."""

    state: TaskState | None = None
    progress: float | None = None
    message: str | None = None


def apply_change(current: TaskStatus, change: TaskChange) -> TaskStatus:
    """The status after `change`, or `ConflictError` when the state machine forbids it."""
    if current.state in CLOSED:
        raise ConflictError(f"the task is {current.state} and can no longer change")
    target = change.state or current.state
    if target not in allowed_targets(current.state):
        raise ConflictError(f"a task cannot go from {current.state} to {target}")
    return TaskStatus(
        target,
        current.progress if change.progress is None else change.progress,
        current.message if change.message is None else change.message,
    )


def states_for_filter(status: str) -> frozenset[TaskState]:
    """`open`, `closed` or one state's name, as `GET /installationTasks?status=` takes it."""
    groups = {"open": OPEN, "closed": CLOSED}
    if status.lower() in groups:
        return groups[status.lower()]
    if status.upper() in TaskState.__members__:
        return frozenset({TaskState(status.upper())})
    raise InvalidRequestError(f"status must be open, closed or a task state, not {status!r}")


@dataclass(frozen=True)
class Transition:
    from_state: TaskState | None
    to_state: TaskState
    progress: float
    message: str
    actor: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.from_state,
            "to": self.to_state,
            "progress": self.progress,
            "message": self.message,
            "actor": self.actor,
            "at": iso(self.at),
        }


@dataclass(frozen=True)
class TaskView:
    id: str
    device_id: str
    software_type: str
    release: ReleaseView
    status: TaskStatus
    etag: int
    created_at: float
    updated_at: float
    history: tuple[Transition, ...]

    def to_json(self, url: SignedUrl) -> dict[str, Any]:
        """The wire form, with `url` (freshly signed for this answer) as the artifact's URI."""
        return {
            "id": self.id,
            "deviceId": self.device_id,
            "softwareType": self.software_type,
            "softwareReleaseId": self.release.id,
            "softwareVersion": self.release.version,
            "state": self.status.state,
            "progress": self.status.progress,
            "message": self.status.message,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "eTag": str(self.etag),
            "artifacts": [
                {
                    "name": self.release.name,
                    "uri": url.uri,
                    "checksum": f"sha256:{self.release.sha256}",
                    "size": self.release.size,
                    "validUntil": iso(url.expires),
                }
            ],
            "history": [entry.to_json() for entry in self.history],
        }


def create_task(database: Database, device_id: str, release_id: str, actor: str, now: float) -> TaskView:
    """A new CREATED task installing `release_id` on agent `device_id`; 404 if either is unknown, 409 while
    the device has an open task."""
    get_release(database, release_id)
    task_id = new_id()
    try:
        with database.transaction() as session:
            _take_creation_turn(session, device_id)
            if session.get(Agent, device_id) is None:
                raise NotFoundError(f"no agent {device_id!r}")
            _check_no_open_task(session, device_id)
            session.add(
                InstallationTask(
                    id=task_id,
                    device_id=device_id,
                    software_type=SOFTWARE_TYPE,
                    release_id=release_id,
                    state=TaskState.CREATED,
                    progress=0.0,
                    message="",
                    etag=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()  # the task row before its history, for the foreign key
            session.add(_transition_row(task_id, None, TaskStatus(TaskState.CREATED, 0.0, ""), actor, now))
            # counted again after the insert: on SQLite the insert holds the write lock, so two concurrent
            # creations cannot both see no open task (PostgreSQL took its turn above)
            if _open_task_count(session, device_id) > 1:
                _check_no_open_task(session, device_id, besides=task_id)
    except IntegrityError as exc:  # the agent was deleted between the look-up and the insert
        raise NotFoundError(f"no agent {device_id!r}") from exc
    return get_task(database, task_id)


#: the first half of the PostgreSQL advisory lock a task creation holds until it commits ("mers"); the
#: second half is the device's: creations for one device take turns, others go on
_CREATION_LOCK_SPACE = 0x6D657273


def _take_creation_turn(session: Session, device_id: str) -> None:
    """On PostgreSQL, creations for one device take turns until their transaction ends: at READ COMMITTED
    two of them would each look for an open task without seeing the other's uncommitted one. Taken first,
    so every statement after it sees what the previous creation committed. SQLite serialises its writers
    by itself."""
    if session.get_bind().dialect.name == "postgresql":
        device_key = zlib.crc32(device_id.encode()) - (1 << 31)  # into PostgreSQL's signed int4
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :device)"),
            {"space": _CREATION_LOCK_SPACE, "device": device_key},
        )


def _open_task_count(session: Session, device_id: str) -> int:
    query = select(func.count()).where(
        InstallationTask.device_id == device_id, InstallationTask.state.in_(sorted(OPEN))
    )
    return session.scalar(query) or 0


def _check_no_open_task(session: Session, device_id: str, besides: str | None = None) -> None:
    query = select(InstallationTask.id, InstallationTask.state).where(
        InstallationTask.device_id == device_id, InstallationTask.state.in_(sorted(OPEN))
    )
    if besides is not None:
        query = query.where(InstallationTask.id != besides)
    open_task = session.execute(query.limit(1)).first()
    if open_task is not None:
        raise ConflictError(
            f"agent {device_id!r} already has an open installation task, {open_task.id} "
            f"({open_task.state}): cancel it first (`mers-hub task cancel`, or PATCH its state to CANCELED)"
        )


def get_task(database: Database, task_id: str) -> TaskView:
    views = _load(database, [InstallationTask.id == task_id]) if is_well_formed_id(task_id) else []
    if not views:
        raise NotFoundError(f"no installation task {task_id!r}")
    return views[0]


def list_tasks(
    database: Database, device_id: str | None, states: frozenset[TaskState] | None
) -> list[TaskView]:
    conditions: list[Any] = []
    if device_id is not None:
        conditions.append(InstallationTask.device_id == device_id)
    if states is not None:
        conditions.append(InstallationTask.state.in_(sorted(states)))
    return _load(database, conditions)


def update_task(
    database: Database,
    task_id: str,
    change: TaskChange,
    actor: str,
    now: float,
    *,
    if_match: EtagCondition | None = None,
) -> TaskView:
    """Apply `change` to the task, or raise: 404 unknown, 409 forbidden by the state machine, 412 when
    `if_match` does not name the current eTag. Each attempt is judged on a fresh read and applied only if the
    eTag it read is still current, so no concurrent change is overwritten."""
    for _ in range(_ATTEMPTS):
        view = get_task(database, task_id)
        if if_match is not None:
            if_match.check(view.etag)
        status = apply_change(view.status, change)
        if _store_change(database, view, status, actor, now):
            return get_task(database, task_id)
    raise ConflictError("the task keeps changing concurrently; try again")


def _store_change(database: Database, view: TaskView, status: TaskStatus, actor: str, now: float) -> bool:
    # A fresh transaction whose first statement writes: SQLite takes the write lock at once (waiting for
    # it), rather than failing to upgrade a read snapshot another writer has overtaken.
    with database.transaction() as session:
        result = session.execute(
            update(InstallationTask)
            .where(InstallationTask.id == view.id, InstallationTask.etag == view.etag)
            .values(
                state=status.state,
                progress=status.progress,
                message=status.message,
                etag=view.etag + 1,
                updated_at=now,
            )
        )
        assert isinstance(result, CursorResult)
        if result.rowcount != 1:
            return False
        session.add(_transition_row(view.id, view.status.state, status, actor, now))
    return True


def _transition_row(
    task_id: str, from_state: TaskState | None, status: TaskStatus, actor: str, now: float
) -> TaskTransition:
    return TaskTransition(
        task_id=task_id,
        from_state=from_state,
        to_state=status.state,
        progress=status.progress,
        message=status.message,
        actor=actor,
        at=now,
    )


#: ids bound in one IN list, well under any database's limit of bound parameters
_IDS_PER_QUERY = 500


def _load(database: Database, conditions: Sequence[Any]) -> list[TaskView]:
    with database.transaction() as session:
        rows = session.execute(
            select(InstallationTask, Release)
            .join(Release, InstallationTask.release_id == Release.id)
            .where(*conditions)
            .order_by(InstallationTask.created_at, InstallationTask.id)
        ).all()
        if not rows:
            return []
        history: dict[str, list[Transition]] = {task.id: [] for task, _ in rows}
        # the tasks the first query returned, by id: the conditions again would miss one that left them
        # between the two queries (cancelled meanwhile, no longer open), listing it with no history
        ids = list(history)
        for start in range(0, len(ids), _IDS_PER_QUERY):
            entries = session.scalars(
                select(TaskTransition)
                .where(TaskTransition.task_id.in_(ids[start : start + _IDS_PER_QUERY]))
                .order_by(TaskTransition.id)
            )
            for entry in entries:
                history[entry.task_id].append(_transition(entry))
        # each accepted change adds one entry and one to the eTag: cut what came after the task was read
        return [_view(task, ReleaseView.of(release), history[task.id][: task.etag]) for task, release in rows]


def _transition(row: TaskTransition) -> Transition:
    return Transition(
        TaskState(row.from_state) if row.from_state is not None else None,
        TaskState(row.to_state),
        row.progress,
        row.message,
        row.actor,
        row.at,
    )


def _view(task: InstallationTask, release: ReleaseView, history: list[Transition]) -> TaskView:
    return TaskView(
        id=task.id,
        device_id=task.device_id,
        software_type=task.software_type,
        release=release,
        status=TaskStatus(TaskState(task.state), task.progress, task.message),
        etag=task.etag,
        created_at=task.created_at,
        updated_at=task.updated_at,
        history=tuple(history),
    )

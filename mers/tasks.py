"""The installation-task client (docs/design.md §7): the agent's open tasks, one task with a freshly
signed artifact URL, and reports of state, progress and message. The hub shows an agent only its own
tasks; another agent's task id is answered as not found."""

from __future__ import annotations

import enum
import math
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .client import DeviceClient
from .errors import HubProtocolError, HubRefusedError, InputError, TaskClosedError
from .onboarding import refusal

TASKS_PATH = "/api/firmwaredeployment/v3/installationTasks"
#: the longest task message the hub stores (docs/design.md §7)
MAX_MESSAGE = 4096


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


#: the way a successful installation goes, one step at a time (docs/design.md §7); the hub refuses skips
PROGRESSION = (
    TaskState.CREATED,
    TaskState.DOWNLOADING,
    TaskState.DOWNLOADED,
    TaskState.INSTALLING,
    TaskState.INSTALLED,
    TaskState.ACTIVATING,
    TaskState.ACTIVATED,
)
CLOSED_STATES = frozenset({TaskState.ACTIVATED, TaskState.FAILED, TaskState.CANCELED})


@dataclass(frozen=True)
class Artifact:
    name: str
    uri: str  # a signed URL: a credential in itself, never logged
    sha256: str  # hex
    size: int
    valid_until: str


@dataclass(frozen=True)
class InstallationTask:
    id: str
    state: TaskState
    progress: float
    message: str
    release_id: str
    version: str
    etag: str
    artifacts: tuple[Artifact, ...]

    def to_json(self) -> dict[str, Any]:
        """For people and scripts: the artifact URIs are left out (they are credentials)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "progress": self.progress,
            "message": self.message,
            "softwareReleaseId": self.release_id,
            "softwareVersion": self.version,
            "artifacts": [
                {"name": a.name, "sha256": a.sha256, "size": a.size, "validUntil": a.valid_until}
                for a in self.artifacts
            ],
        }


class TaskClient:
    def __init__(self, client: DeviceClient) -> None:
        self._client = client

    def open_tasks(self) -> list[InstallationTask]:
        answer = self._client.request("GET", TASKS_PATH, params={"status": "open"})
        if answer.status != 200:
            raise refusal(answer, "task listing")
        content = answer.json().get("content")
        if not isinstance(content, list):
            raise HubProtocolError("the task listing has no content list")
        return [parse_task(item) for item in content]

    def task(self, task_id: str) -> InstallationTask:
        """The task, with an artifact URL signed now (fetch again when one expires mid-download)."""
        answer = self._client.request("GET", _task_path(task_id))
        if answer.status != 200:
            raise _task_refusal(answer, task_id, "task request")
        return parse_task(answer.json())

    def report(
        self,
        task_id: str,
        *,
        state: TaskState | None = None,
        progress: float | None = None,
        message: str | None = None,
    ) -> InstallationTask:
        if state is None and progress is None and message is None:
            raise InputError("a report needs a state, a progress or a message")
        if progress is not None and not (math.isfinite(progress) and 0.0 <= progress <= 1.0):
            raise InputError(f"progress must be a fraction from 0 to 1, not {progress}")
        body: dict[str, Any] = {}
        if state is not None:
            body["state"] = state.value
        if progress is not None:
            body["progress"] = float(progress)
        if message is not None:
            body["message"] = reportable(message)
        answer = self._client.request("PATCH", _task_path(task_id), json=body)
        if answer.status != 200:
            raise _task_refusal(answer, task_id, "task report")
        return parse_task(answer.json())

    def advance(
        self, task_id: str, target: TaskState, *, progress: float | None = None, message: str | None = None
    ) -> InstallationTask:
        """Bring the task to `target` through every state between, as the hub's state machine wants it
        one step at a time. Idempotent, so a restarted installer can call it again after a crash: a task
        already at or past `target` only gets the progress and message. A closed task raises
        `TaskClosedError` (the operator cancelled it, or it ended before the crash)."""
        task = self.task(task_id)
        if task.state in CLOSED_STATES:
            if task.state is target:
                return task
            raise TaskClosedError(f"installation task {task_id} is {task.state}")
        if target is TaskState.FAILED:
            return self.report(task_id, state=target, message=message)
        here = PROGRESSION.index(task.state)
        for state in PROGRESSION[here + 1 : PROGRESSION.index(target)]:
            task = self.report(task_id, state=state)
        if task.state is target and progress is None and message is None:
            return task
        state = target if PROGRESSION.index(target) >= here else task.state
        return self.report(task_id, state=state, progress=progress, message=message)


def reportable(message: str) -> str:
    """`message` as the hub takes it: characters that are not printable (a NUL from a health hook's
    stderr, a newline, a lone surrogate) written as escapes, and cut to `MAX_MESSAGE`. A report refused for
    its text would, after the switch, keep the journal from ever ending. A backslash is escaped too, so
    the hub's reader can tell a real newline (`\\n`) from the two characters a hook printed (`\\\\n`); a cut
    never splits an escape."""
    pieces = (_escaped(char) for char in message)
    text: list[str] = []
    length = 0
    for piece in pieces:
        if length + len(piece) > MAX_MESSAGE:
            while length + 1 > MAX_MESSAGE:  # room for the ellipsis
                length -= len(text.pop())
            return "".join(text) + "…"
        text.append(piece)
        length += len(piece)
    return "".join(text)


def _escaped(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def _task_path(task_id: str) -> str:
    if not task_id or len(task_id) > 128:
        raise InputError("a task id is 1 to 128 characters")
    return f"{TASKS_PATH}/{urllib.parse.quote(task_id, safe='')}"


def _task_refusal(answer: Any, task_id: str, during: str) -> HubRefusedError:
    if answer.status == 404:
        return HubRefusedError(
            f"no installation task {task_id!r} for this agent", status=404, code="not_found"
        )
    return refusal(answer, during)


def parse_task(document: Any) -> InstallationTask:
    try:
        artifacts = tuple(
            Artifact(
                name=str(item["name"]),
                uri=str(item["uri"]),
                sha256=str(item["checksum"]).removeprefix("sha256:"),
                size=int(item["size"]),
                valid_until=str(item["validUntil"]),
            )
            for item in document["artifacts"]
        )
        return InstallationTask(
            id=str(document["id"]),
            state=TaskState(document["state"]),
            progress=float(document["progress"]),
            message=str(document["message"]),
            release_id=str(document["softwareReleaseId"]),
            version=str(document.get("softwareVersion", "")),
            etag=str(document.get("eTag", "")),
            artifacts=artifacts,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HubProtocolError(f"the hub's installation task is malformed: {exc!r}") from exc

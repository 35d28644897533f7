"""Firmware deployment, under `/api/firmwaredeployment/v3`: release trust keys, release upload and
installation tasks (docs/design.md §7). Thin routes over `trust`, `releases` and `tasks`.

Who may do what: the admin everything; an agent (its access token) only reads and reports on its own
tasks. Another agent's task is answered like a task that does not exist, so ids are not confirmed to
strangers. Text fields are checked before they reach the database: bounded to their columns, and free
of control characters and lone surrogates, which PostgreSQL or the UTF-8 codec would otherwise refuse
with a 5xx.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .auth import AdminCaller, AnyCaller, Caller, State
from .errors import InvalidRequestError, NotFoundError
from .etags import EtagCondition, if_match_condition
from .releases import get_release, list_releases, receive_release
from .signed_urls import BlobUrlSigner
from .state import HubState
from .tasks import (
    TaskChange,
    TaskState,
    TaskView,
    create_task,
    get_task,
    list_tasks,
    states_for_filter,
    update_task,
)
from .texts import checked_name, is_name, storable_text
from .trust import add_trusted_key, trusted_keys

PREFIX = "/api/firmwaredeployment/v3"
router = APIRouter(prefix=PREFIX, tags=["firmware deployment"])


KeyName = Annotated[str, StringConstraints(max_length=128), AfterValidator(checked_name)]
ReleaseName = Annotated[str, StringConstraints(max_length=256), AfterValidator(checked_name)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(checked_name)]
Message = Annotated[str, StringConstraints(max_length=4096), AfterValidator(storable_text)]


class NewTrustedKey(BaseModel):
    name: KeyName
    pem: Annotated[str, StringConstraints(max_length=64 << 10), AfterValidator(storable_text)]


class NewTask(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    device_id: Identifier = Field(alias="deviceId")
    software_type: Literal["FIRMWARE"] = Field(alias="softwareType")
    release_id: Identifier = Field(alias="softwareReleaseId")


class TaskReport(BaseModel):
    """A PATCH: any of a new state, progress (a finite fraction) and message."""

    state: TaskState | None = None
    progress: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, strict=True)
    message: Message | None = None


# --- release trust keys ------------------------------------------------------------------------------


@router.post("/trustedKeys", status_code=201)
def add_key(body: NewTrustedKey, _admin: AdminCaller, state: State) -> dict[str, Any]:
    return add_trusted_key(state.database, body.name, body.pem, state.clock()).to_json()


@router.get("/trustedKeys")
def get_keys(_admin: AdminCaller, state: State) -> dict[str, Any]:
    return {"content": [key.to_json() for key in trusted_keys(state.database)]}


# --- releases ----------------------------------------------------------------------------------------


#: the upload takes no JSON: the OpenAPI document says so, since no parameter of the function declares it
_RAW_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/releases", openapi_extra=_RAW_IMAGE_BODY)
async def upload_release(
    request: Request, _admin: AdminCaller, state: State, name: Annotated[ReleaseName, Query()]
) -> JSONResponse:
    """The image is the raw body (`application/octet-stream`), streamed: never read whole into memory."""
    upload = await receive_release(
        state.database,
        state.blobs,
        name,
        request.stream(),
        max_size=state.settings.max_release_size,
        clock=state.clock,
    )
    return JSONResponse(upload.release.to_json(), status_code=201 if upload.created else 200)


@router.get("/releases")
def get_releases(_admin: AdminCaller, state: State) -> dict[str, Any]:
    return {"content": [release.to_json() for release in list_releases(state.database)]}


@router.get("/releases/{release_id}")
def get_one_release(release_id: str, _admin: AdminCaller, state: State) -> dict[str, Any]:
    return get_release(state.database, release_id).to_json()


# --- installation tasks ------------------------------------------------------------------------------


@router.post("/installationTasks", status_code=201)
def new_task(body: NewTask, admin: AdminCaller, state: State) -> dict[str, Any]:
    task = create_task(state.database, body.device_id, body.release_id, _actor(admin), state.clock())
    return _task_json(task, state)


@router.get("/installationTasks")
def get_tasks(
    caller: AnyCaller,
    state: State,
    device_id: Annotated[str | None, Query(alias="deviceId", max_length=128)] = None,
    status: Annotated[str | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    """The admin lists anyone's tasks; an agent only its own, whether or not it names itself. An empty
    parameter (`?deviceId=&status=`, as a client fills a template) means no filter."""
    device_id, status = device_id or None, status or None
    if device_id is not None and not is_name(device_id):
        raise InvalidRequestError("deviceId must be an agent id")
    if caller.agent_id is not None:
        if device_id is not None:
            caller.check_may_act_for(device_id)
        device_id = caller.agent_id
    states = states_for_filter(status) if status is not None else None
    return {"content": [_task_json(task, state) for task in list_tasks(state.database, device_id, states)]}


@router.get("/installationTasks/{task_id}")
def get_one_task(task_id: str, caller: AnyCaller, state: State) -> dict[str, Any]:
    return _task_json(_visible_task(task_id, caller, state), state)


@router.patch("/installationTasks/{task_id}")
def report_on_task(
    task_id: str,
    body: TaskReport,
    caller: AnyCaller,
    state: State,
    if_match: Annotated[str | None, Header(max_length=64)] = None,
) -> dict[str, Any]:
    if body.state is None and body.progress is None and body.message is None:
        raise InvalidRequestError("give a state, a progress or a message")
    _visible_task(task_id, caller, state)
    change = TaskChange(body.state, body.progress, body.message)
    task = update_task(
        state.database, task_id, change, _actor(caller), state.clock(), if_match=_etag(if_match)
    )
    return _task_json(task, state)


def _visible_task(task_id: str, caller: Caller, state: HubState) -> TaskView:
    """The task, if `caller` may see it: another agent's task is "not found", never "forbidden", so an
    agent cannot even learn which task ids exist."""
    task = get_task(state.database, task_id)
    if caller.agent_id is not None and caller.agent_id != task.device_id:
        raise NotFoundError(f"no installation task {task_id!r}")
    return task


def _task_json(task: TaskView, state: HubState) -> dict[str, Any]:
    """The task with a URL signed now: each GET hands out a fresh one, so a device whose URL expired
    mid-download fetches the task again and resumes."""
    signer = BlobUrlSigner(state.url_secret, state.base_url, state.settings.signed_url_lifetime)
    return task.to_json(signer.sign(task.release.sha256, state.clock()))


def _actor(caller: Caller) -> str:
    return "admin" if caller.agent_id is None else f"agent:{caller.agent_id}"


def _etag(if_match: str | None) -> EtagCondition | None:
    """`If-Match` as a condition; optional here (a device reporting progress need not send one)."""
    if if_match is None or not if_match.strip():
        return None
    return if_match_condition(if_match)

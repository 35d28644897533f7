"""Installation tasks: the state machine as pure functions (checked against an independent model), and
the API on a real hub: creation (one open task per device, even under concurrent creations), reports with
history, 409 on illegal moves, concurrent reports, and an agent that sees and reports on its own tasks
only."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub import tasks as hub_tasks
from hub.database import Database, create_schema, open_engine
from hub.errors import ConflictError
from hub.models import Agent, Release, SecurityProfile
from hub.tasks import CLOSED, OPEN, TaskChange, TaskState, TaskStatus, allowed_targets, apply_change
from tests.firmware_helpers import Published, add_agent, new_task, publish
from tests.hub_helpers import FIRMWARE, RunningHub, at_once, onboard_agent, running_hub

TASKS = f"{FIRMWARE}/installationTasks"
HAPPY_PATH = ["DOWNLOADING", "DOWNLOADED", "INSTALLING", "INSTALLED", "ACTIVATING", "ACTIVATED"]


# --- the state machine, pure ----------------------------------------------------------------------


def may_go(current: TaskState, target: TaskState) -> bool:
    """The rule written out plainly, independently of the module's tables."""
    order = ["CREATED", *HAPPY_PATH]
    if current in ("ACTIVATED", "FAILED", "CANCELED"):
        return False
    if target in ("FAILED", "CANCELED") or target == current:
        return True
    return order.index(target) == order.index(current) + 1


def test_open_and_closed_states_partition_all_states() -> None:
    assert frozenset(TaskState) == OPEN | CLOSED
    assert not OPEN & CLOSED
    assert {TaskState.ACTIVATED, TaskState.FAILED, TaskState.CANCELED} == CLOSED


@pytest.mark.parametrize("current", list(TaskState))
@pytest.mark.parametrize("target", list(TaskState))
def test_each_move_is_allowed_exactly_when_the_rule_says(current: TaskState, target: TaskState) -> None:
    assert (target in allowed_targets(current)) == may_go(current, target)
    status = TaskStatus(current, 0.5, "before")
    if may_go(current, target):
        assert apply_change(status, TaskChange(state=target)) == TaskStatus(target, 0.5, "before")
    else:
        with pytest.raises(ConflictError):
            apply_change(status, TaskChange(state=target))


@pytest.mark.parametrize("closed", sorted(CLOSED))
def test_a_closed_task_takes_not_even_a_progress_report(closed: TaskState) -> None:
    with pytest.raises(ConflictError):
        apply_change(TaskStatus(closed, 1.0, ""), TaskChange(progress=0.5))


changes = st.builds(
    TaskChange,
    state=st.none() | st.sampled_from(TaskState),
    progress=st.none() | st.floats(0, 1),
    message=st.none() | st.text(max_size=20),
)


@given(st.lists(changes, max_size=30))
def test_any_sequence_of_reports_follows_the_model(sequence: list[TaskChange]) -> None:
    status = TaskStatus(TaskState.CREATED, 0.0, "")
    for change in sequence:
        target = change.state or status.state
        if may_go(status.state, target):
            after = apply_change(status, change)
            assert after.state == target
            assert after.progress == (status.progress if change.progress is None else change.progress)
            assert after.message == (status.message if change.message is None else change.message)
            status = after
        else:
            with pytest.raises(ConflictError):
                apply_change(status, change)


# --- the API --------------------------------------------------------------------------------------


#: one hub and release for the module: each test works on tasks of its own agents
Served = tuple[RunningHub, Published]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("tasks")
    with running_hub(root / "hub") as hub:
        yield hub, publish(hub, root)


@pytest.fixture
def hub(served: Served) -> RunningHub:
    return served[0]


@pytest.fixture
def published(served: Served) -> Published:
    """A new agent with a new task installing the module's release."""
    hub, base = served
    agent_id = add_agent(hub)
    return Published(base.image, base.release, agent_id, new_task(hub, agent_id, base.release["id"]))


def patch(hub: RunningHub, task_id: str, token: str | None = None, **body: Any) -> requests.Response:
    return hub.request("PATCH", f"{TASKS}/{task_id}", token=token or hub.admin_token, json=body)


def read(hub: RunningHub, task_id: str) -> dict[str, Any]:
    response = hub.admin("GET", f"{TASKS}/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def walk_to(hub: RunningHub, task_id: str, state: str) -> None:
    for step in ["CREATED", *HAPPY_PATH][1 : ["CREATED", *HAPPY_PATH].index(state) + 1]:
        assert patch(hub, task_id, state=step).status_code == 200


def without_uri(task: dict[str, Any]) -> dict[str, Any]:
    """A task without the parts that are fresh on every read."""
    artifacts = [{k: v for k, v in a.items() if k not in ("uri", "validUntil")} for a in task["artifacts"]]
    return {**task, "artifacts": artifacts}


def test_a_new_task_is_created_for_an_agent_and_a_release(hub: RunningHub, published: Published) -> None:
    task, release = published.task, published.release
    assert task == {
        "id": task["id"],
        "deviceId": published.agent_id,
        "softwareType": "FIRMWARE",
        "softwareReleaseId": release["id"],
        "softwareVersion": release["version"],
        "state": "CREATED",
        "progress": 0.0,
        "message": "",
        "createdAt": task["createdAt"],
        "updatedAt": task["createdAt"],
        "eTag": "1",
        "artifacts": [
            {
                "name": release["name"],
                "uri": task["artifacts"][0]["uri"],
                "checksum": f"sha256:{release['sha256']}",
                "size": release["size"],
                "validUntil": task["artifacts"][0]["validUntil"],
            }
        ],
        "history": [
            {
                "from": None,
                "to": "CREATED",
                "progress": 0.0,
                "message": "",
                "actor": "admin",
                "at": task["createdAt"],
            }
        ],
    }
    assert without_uri(read(hub, task["id"])) == without_uri(task)


def test_every_read_of_a_task_signs_its_url_afresh(hub: RunningHub, published: Published) -> None:
    hub.clock.advance(10)
    again = read(hub, published.task["id"])["artifacts"][0]
    assert again["uri"] != published.uri
    assert again["validUntil"] > published.task["artifacts"][0]["validUntil"]


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"deviceId": "0" * 32}, 404),
        ({"softwareReleaseId": "0" * 32}, 404),
        ({"softwareReleaseId": "x\x00"}, 400),
        ({"deviceId": "\ud800"}, 400),
        ({"softwareType": "APP"}, 400),
        ({"softwareType": None}, 400),
    ],
)
def test_a_task_for_an_unknown_agent_or_release_or_software_type_is_refused(
    hub: RunningHub, published: Published, change: dict[str, Any], status: int
) -> None:
    body = {
        "deviceId": published.agent_id,
        "softwareType": "FIRMWARE",
        "softwareReleaseId": published.release["id"],
    }
    response = hub.admin("POST", TASKS, json={**body, **change})
    assert response.status_code == status, response.text
    assert len(hub.admin("GET", TASKS, params={"deviceId": published.agent_id}).json()["content"]) == 1


def test_only_the_admin_creates_tasks(hub: RunningHub, published: Published) -> None:
    body = {
        "deviceId": published.agent_id,
        "softwareType": "FIRMWARE",
        "softwareReleaseId": published.release["id"],
    }
    assert hub.request("POST", TASKS, json=body).status_code == 401


def test_a_task_walks_to_activated_and_its_history_records_every_report(
    hub: RunningHub, published: Published
) -> None:
    task_id = published.task["id"]
    assert patch(hub, task_id, state="DOWNLOADING", progress=0.0, message="starting").status_code == 200
    for progress in (0.25, 0.5, 1.0):
        hub.clock.advance(1)
        response = patch(hub, task_id, progress=progress)
        assert response.status_code == 200
        assert response.json()["progress"] == progress
    for state in HAPPY_PATH[1:]:
        response = patch(hub, task_id, state=state, message=f"now {state.lower()}")
        assert response.status_code == 200, response.text
    task = read(hub, task_id)
    assert (task["state"], task["progress"], task["message"]) == ("ACTIVATED", 1.0, "now activated")
    assert task["eTag"] == str(1 + 4 + 5)
    moves = [(entry["from"], entry["to"], entry["progress"]) for entry in task["history"]]
    assert moves == [
        (None, "CREATED", 0.0),
        ("CREATED", "DOWNLOADING", 0.0),
        ("DOWNLOADING", "DOWNLOADING", 0.25),
        ("DOWNLOADING", "DOWNLOADING", 0.5),
        ("DOWNLOADING", "DOWNLOADING", 1.0),
        ("DOWNLOADING", "DOWNLOADED", 1.0),
        ("DOWNLOADED", "INSTALLING", 1.0),
        ("INSTALLING", "INSTALLED", 1.0),
        ("INSTALLED", "ACTIVATING", 1.0),
        ("ACTIVATING", "ACTIVATED", 1.0),
    ]
    assert task["history"][1]["message"] == "starting"
    assert [entry["at"] for entry in task["history"]] == sorted(entry["at"] for entry in task["history"])
    assert task["updatedAt"] == task["history"][-1]["at"] > task["createdAt"]


def test_a_closed_task_refuses_every_change(hub: RunningHub, published: Published) -> None:
    task_id = published.task["id"]
    walk_to(hub, task_id, "ACTIVATED")
    before = read(hub, task_id)
    for body in ({"state": "FAILED"}, {"state": "ACTIVATED"}, {"progress": 0.5}, {"message": "again"}):
        response = patch(hub, task_id, **body)
        assert response.status_code == 409
        assert response.json()["error"] == "conflict"
    assert without_uri(read(hub, task_id)) == without_uri(before)


@pytest.mark.parametrize("target", ["CREATED", "INSTALLING", "INSTALLED", "ACTIVATED"])
def test_a_skipped_or_backward_step_is_a_conflict_and_changes_nothing(
    hub: RunningHub, published: Published, target: str
) -> None:
    task_id = published.task["id"]
    walk_to(hub, task_id, "DOWNLOADING")
    before = read(hub, task_id)
    response = patch(hub, task_id, state=target, progress=0.9)
    assert response.status_code == 409
    assert "DOWNLOADING" in response.json()["error_description"]
    assert without_uri(read(hub, task_id)) == without_uri(before)


@pytest.mark.parametrize("state", ["CREATED", *HAPPY_PATH[:-1]])
@pytest.mark.parametrize("ending", ["FAILED", "CANCELED"])
def test_any_open_task_may_fail_or_be_canceled(
    hub: RunningHub, published: Published, state: str, ending: str
) -> None:
    task_id = published.task["id"]
    walk_to(hub, task_id, state)
    response = patch(hub, task_id, state=ending, message="slot b does not boot")
    assert response.status_code == 200
    assert response.json()["state"] == ending
    assert response.json()["history"][-1]["from"] == state
    assert patch(hub, task_id, state="CREATED").status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"state": "DONE"},
        {"state": "downloading"},
        {"progress": 1.5},
        {"progress": -0.1},
        {"progress": "0.5"},
        {"progress": True},
        {"message": "x" * 4097},
        {"message": "nul\x00"},
        {"message": "\udc80"},
        {"state": None, "progress": None},
    ],
)
def test_a_malformed_report_is_refused_and_changes_nothing(
    hub: RunningHub, published: Published, body: dict[str, Any]
) -> None:
    response = patch(hub, published.task["id"], **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert read(hub, published.task["id"])["eTag"] == "1"


@pytest.mark.parametrize("raw", [b'{"progress": NaN}', b'{"progress": Infinity}', b"{", b"[]", b"\xff"])
def test_a_report_that_is_not_a_json_object_of_finite_numbers_is_refused(
    hub: RunningHub, published: Published, raw: bytes
) -> None:
    response = hub.admin(
        "PATCH", f"{TASKS}/{published.task['id']}", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert read(hub, published.task["id"])["eTag"] == "1"


@pytest.mark.parametrize("task_id", ["0" * 32, "nope", "%00"])
def test_an_unknown_task_is_not_found(hub: RunningHub, task_id: str) -> None:
    assert hub.admin("GET", f"{TASKS}/{task_id}").status_code == 404
    assert patch(hub, task_id, progress=0.5).status_code == 404


def test_if_match_with_a_stale_etag_is_a_failed_precondition(hub: RunningHub, published: Published) -> None:
    task_id = published.task["id"]
    url = f"{TASKS}/{task_id}"
    assert hub.admin("PATCH", url, json={"progress": 0.1}, headers={"If-Match": "1"}).status_code == 200
    stale = hub.admin("PATCH", url, json={"progress": 0.2}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert hub.admin("PATCH", url, json={"progress": 0.3}, headers={"If-Match": "junk"}).status_code == 412
    assert hub.admin("PATCH", url, json={"progress": 0.4}, headers={"If-Match": '"2"'}).status_code == 200
    assert hub.admin("PATCH", url, json={"progress": 0.5}, headers={"If-Match": "*"}).status_code == 200
    assert read(hub, task_id)["eTag"] == "4"


def test_if_match_with_a_weak_etag_never_matches_a_task(hub: RunningHub, published: Published) -> None:
    """`If-Match` compares strongly (RFC 9110 section 13.1.1): `W/"1"` fails even while the task is at 1."""
    task_id = published.task["id"]
    url = f"{TASKS}/{task_id}"
    for weak in ('W/"1"', "W/1"):
        refused = hub.admin("PATCH", url, json={"progress": 0.1}, headers={"If-Match": weak})
        assert refused.status_code == 412, refused.text
        assert refused.json()["error"] == "precondition_failed"
    assert read(hub, task_id)["eTag"] == "1"


def test_if_match_on_a_task_is_a_list_any_strong_tag_of_which_may_name_the_current(
    hub: RunningHub, published: Published
) -> None:
    """RFC 9110 section 13.1.1: a list holds when any tag in it is the current eTag, compared strongly."""
    task_id = published.task["id"]
    url = f"{TASKS}/{task_id}"
    for refused in ('"5", "6"', 'W/"1", "2"', '"1", junk'):
        response = hub.admin("PATCH", url, json={"progress": 0.1}, headers={"If-Match": refused})
        assert response.status_code == 412, response.text
        assert response.json()["error"] == "precondition_failed"
    assert read(hub, task_id)["eTag"] == "1"
    listed = hub.admin("PATCH", url, json={"progress": 0.2}, headers={"If-Match": '"5", "1"'})
    assert listed.status_code == 200, listed.text
    assert hub.admin("PATCH", url, json={"progress": 0.3}, headers={"If-Match": "*"}).status_code == 200
    mixed = hub.admin("PATCH", url, json={"progress": 0.4}, headers={"If-Match": 'W/"3", "3"'})
    assert mixed.status_code == 200, mixed.text
    assert read(hub, task_id)["eTag"] == "4"


def race_final_reports(hub: RunningHub, published: Published) -> None:
    """From ACTIVATING, ACTIVATED and CANCELED reported at the same moment: exactly one applies."""
    task_id = new_task(hub, add_agent(hub), published.release["id"])["id"]
    walk_to(hub, task_id, "ACTIVATING")
    states = ("ACTIVATED", "CANCELED")

    def report(state: str) -> Callable[[], requests.Response]:
        return lambda: requests.patch(
            f"{hub.url}{TASKS}/{task_id}",
            json={"state": state},
            headers={"Authorization": f"Bearer {hub.admin_token}"},
            verify=str(hub.ca),
            timeout=30,
        )

    answers = dict(zip(states, at_once([report(state) for state in states]), strict=True))
    assert sorted(answers.values()) == [200, 409], answers
    winner = next(state for state, status in answers.items() if status == 200)
    task = read(hub, task_id)
    assert task["state"] == winner
    assert [entry["to"] for entry in task["history"]].count(winner) == 1
    assert task["history"][-1]["from"] == "ACTIVATING"


@pytest.mark.parametrize("ending", ["CANCELED", "FAILED", "ACTIVATED"])
def test_a_device_has_one_open_task_at_a_time(hub: RunningHub, published: Published, ending: str) -> None:
    first = published.task["id"]
    walk_to(hub, first, "DOWNLOADING")
    before = hub.admin("GET", TASKS, params={"deviceId": published.agent_id}).json()
    second = hub.admin(
        "POST",
        TASKS,
        json={
            "deviceId": published.agent_id,
            "softwareType": "FIRMWARE",
            "softwareReleaseId": published.release["id"],
        },
    )
    assert second.status_code == 409, second.text
    assert first in second.json()["error_description"] and "DOWNLOADING" in second.json()["error_description"]
    assert without_uris(
        hub.admin("GET", TASKS, params={"deviceId": published.agent_id}).json()
    ) == without_uris(before)
    if ending == "ACTIVATED":
        walk_to(hub, first, "ACTIVATED")
    else:
        assert patch(hub, first, state=ending).status_code == 200
    assert new_task(hub, published.agent_id, published.release["id"])["state"] == "CREATED"


def without_uris(listing: dict[str, Any]) -> list[dict[str, Any]]:
    return [without_uri(task) for task in listing["content"]]


def race_task_creations(
    hub: RunningHub, release_id: str, monkeypatch: pytest.MonkeyPatch, count: int = 8
) -> None:
    """`count` creations for one device at the same moment: exactly one task is created. Inside the hub,
    each creation waits before it looks for an open task until all of them are there (or two seconds
    passed, where the database lets only one in at a time), so the race is run, not left to chance."""
    agent_id = add_agent(hub)
    inside = threading.Barrier(count)
    check = hub_tasks._check_no_open_task

    def check_together(session: Any, device_id: str, besides: str | None = None) -> None:
        if besides is None:
            with contextlib.suppress(threading.BrokenBarrierError):
                inside.wait(2)
        check(session, device_id, besides)

    monkeypatch.setattr(hub_tasks, "_check_no_open_task", check_together)

    def create() -> requests.Response:
        return requests.post(
            f"{hub.url}{TASKS}",
            json={"deviceId": agent_id, "softwareType": "FIRMWARE", "softwareReleaseId": release_id},
            headers={"Authorization": f"Bearer {hub.admin_token}"},
            verify=str(hub.ca),
            timeout=60,
        )

    statuses = at_once([create] * count)
    assert sorted(statuses) == [201] + [409] * (count - 1), statuses
    listed = hub.admin("GET", TASKS, params={"deviceId": agent_id}).json()["content"]
    assert len(listed) == 1


def test_concurrent_task_creations_for_one_device_create_one(
    hub: RunningHub, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    race_task_creations(hub, published.release["id"], monkeypatch)


def test_two_concurrent_final_reports_cannot_both_apply(hub: RunningHub, published: Published) -> None:
    for _ in range(5):
        race_final_reports(hub, published)


def test_tasks_keep_their_rules_on_postgresql(
    postgres_hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = publish(postgres_hub, tmp_path)
    for _ in range(3):
        race_final_reports(postgres_hub, published)
    race_task_creations(postgres_hub, published.release["id"], monkeypatch)
    task_id = published.task["id"]
    assert patch(postgres_hub, task_id, message="nul\x00").status_code == 400
    assert postgres_hub.admin("GET", f"{TASKS}/%00").status_code == 404
    assert postgres_hub.admin("GET", TASKS, params={"deviceId": "\x00"}).status_code == 400
    assert patch(postgres_hub, task_id, state="DOWNLOADING", message="ünïcödé ✓").status_code == 200
    assert read(postgres_hub, task_id)["history"][-1]["message"] == "ünïcödé ✓"


def test_tasks_are_listed_by_device_and_status(hub: RunningHub, published: Published) -> None:
    first = published.task["id"]
    other_agent = add_agent(hub)
    second = new_task(hub, other_agent, published.release["id"])["id"]
    assert patch(hub, first, state="CANCELED").status_code == 200
    third = new_task(hub, published.agent_id, published.release["id"])["id"]
    walk_to(hub, third, "DOWNLOADING")

    def listed(**params: str) -> list[str]:
        response = hub.admin("GET", TASKS, params=params)
        assert response.status_code == 200, response.text
        return [task["id"] for task in response.json()["content"]]

    mine = {"deviceId": published.agent_id}
    assert listed(**mine) == [first, third]
    assert listed(**mine, status="open") == [third]
    assert listed(**mine, status="closed") == [first]
    assert listed(**mine, status="CANCELED") == [first]
    assert listed(**mine, status="DOWNLOADING") == [third]
    assert listed(deviceId=other_agent) == [second]
    everyone = listed()
    assert everyone.index(first) < everyone.index(second) < everyone.index(third)  # oldest first
    assert listed(deviceId="", status="") == everyone  # an empty template parameter filters nothing
    assert {second, third} <= set(listed(status="open"))
    assert first not in listed(status="open")
    assert listed(deviceId="0" * 32) == []
    assert hub.admin("GET", TASKS, params={"status": "finished"}).status_code == 400
    assert hub.admin("GET", TASKS, params={"deviceId": "\x00"}).status_code == 400
    assert hub.request("GET", TASKS).status_code == 401


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TaskState), max_size=8))
def test_the_api_accepts_exactly_the_moves_the_state_machine_allows(
    hub: RunningHub, published: Published, sequence: list[TaskState]
) -> None:
    task_id = new_task(hub, add_agent(hub), published.release["id"])["id"]  # one open task per device
    state, accepted = TaskState.CREATED, 1
    for target in sequence:
        response = patch(hub, task_id, state=target)
        if may_go(state, target):
            assert response.status_code == 200, response.text
            state, accepted = target, accepted + 1
        else:
            assert response.status_code == 409, response.text
    task = read(hub, task_id)
    assert (task["state"], task["eTag"], len(task["history"])) == (state, str(accepted), accepted)


# --- agents ---------------------------------------------------------------------------------------


def gateway_name() -> str:
    return f"gateway-{uuid.uuid4().hex[:12]}"


def test_an_agent_lists_reads_and_reports_on_its_own_tasks(hub: RunningHub, published: Published) -> None:
    gateway = onboard_agent(hub, gateway_name())
    own = new_task(hub, gateway.id, published.release["id"])["id"]
    token = gateway.access_token()

    listed = hub.request("GET", TASKS, token=token, params={"status": "open"})
    assert listed.status_code == 200
    assert [task["id"] for task in listed.json()["content"]] == [own]
    named = hub.request("GET", TASKS, token=token, params={"deviceId": gateway.id})
    assert [task["id"] for task in named.json()["content"]] == [own]

    task = hub.request("GET", f"{TASKS}/{own}", token=token)
    assert task.status_code == 200
    assert task.json()["artifacts"][0]["uri"].startswith(f"{hub.url}/blobs/")

    report = patch(hub, own, token=token, state="DOWNLOADING", progress=0.1)
    assert report.status_code == 200, report.text
    assert report.json()["history"][-1]["actor"] == f"agent:{gateway.id}"
    assert patch(hub, own, token=token, state="INSTALLED").status_code == 409


def test_an_agent_can_neither_see_nor_change_another_agents_task(
    hub: RunningHub, published: Published
) -> None:
    gateway = onboard_agent(hub, gateway_name())
    neighbour = onboard_agent(hub, gateway_name())
    theirs = new_task(hub, neighbour.id, published.release["id"])["id"]
    token = gateway.access_token()

    assert hub.request("GET", TASKS, token=token).json() == {"content": []}
    assert hub.request("GET", TASKS, token=token, params={"deviceId": neighbour.id}).status_code == 403
    assert hub.request("GET", TASKS, token=token, params={"deviceId": published.agent_id}).status_code == 403
    hidden = hub.request("GET", f"{TASKS}/{theirs}", token=token)
    assert hidden.status_code in (403, 404)
    assert hidden.json()["error"] in ("forbidden", "not_found")
    assert neighbour.id not in hidden.text
    assert patch(hub, theirs, token=token, state="CANCELED").status_code in (403, 404)
    assert read(hub, theirs)["state"] == "CREATED"


def test_an_agent_has_no_admin_powers(hub: RunningHub, published: Published) -> None:
    gateway = onboard_agent(hub, gateway_name())
    token = gateway.access_token()
    body = {"deviceId": gateway.id, "softwareType": "FIRMWARE", "softwareReleaseId": published.release["id"]}
    assert hub.request("POST", TASKS, token=token, json=body).status_code == 401
    assert hub.request("GET", f"{FIRMWARE}/releases", token=token).status_code == 401
    assert hub.request("GET", f"{FIRMWARE}/trustedKeys", token=token).status_code == 401
    upload = hub.request(
        "POST", f"{FIRMWARE}/releases", token=token, params={"name": "x"}, data=published.image
    )
    assert upload.status_code == 401


def test_a_task_that_leaves_the_filter_between_the_two_queries_of_a_listing_keeps_its_history(
    tmp_path: Path,
) -> None:
    """A listing reads the tasks, then their histories. The task is cancelled by another connection
    in between: it is still listed as it was read, with its history (it came with none when the second
    query filtered on the state again)."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    engine = open_engine(url)
    create_schema(engine)
    database = Database(engine)
    with database.transaction() as session:
        session.add(
            Agent(
                id="a" * 32,
                name="gw",
                security_profile=SecurityProfile.SHARED_SECRET,
                created_at=1,
                updated_at=1,
                status_updated_at=1,
            )
        )
        session.add(
            Release(
                id="b" * 32,
                sha256="c" * 64,
                name="r",
                version="1.0.0",
                security_counter=0,
                vendor_uuid=None,
                class_uuid=None,
                size=1,
                image_digest="d" * 64,
                signed_by="[]",
                uploaded_at=1,
            )
        )
    task = hub_tasks.create_task(database, "a" * 32, "b" * 32, "admin", 2.0)
    hub_tasks.update_task(database, task.id, TaskChange(TaskState.DOWNLOADING, 0.5), "agent", 3.0)
    other = Database(open_engine(url))
    cancelled: list[bool] = []

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def cancel_meanwhile(*arguments: Any) -> None:
        statement = arguments[2]
        if "FROM task_transitions" in statement and not cancelled:
            cancelled.append(True)
            hub_tasks.update_task(other, task.id, TaskChange(TaskState.CANCELED), "admin", 4.0)

    [listed] = hub_tasks.list_tasks(database, None, OPEN)
    assert cancelled, "the second query ran"
    assert listed.status.state is TaskState.DOWNLOADING
    assert [entry.to_state for entry in listed.history] == [TaskState.CREATED, TaskState.DOWNLOADING]

"""The hub's agent management API (admin side) against a real hub over TLS: agents, If-Match, limits,
data source configurations, boarding configuration, status and offboarding."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.datasources import MAX_DATA_SOURCES, parse_document
from hub.errors import InvalidRequestError
from hub.home import HubSettings
from tests.hub_helpers import (
    AGENTS,
    RunningHub,
    agent_record,
    assert_hub_error,
    boarding_configuration,
    create_agent,
    onboard_agent,
    register,
    running_hub,
)

ISO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"

DOCUMENT: dict[str, Any] = {
    "configurationId": "gateway-v1",
    "description": "what the gateway measures",
    "dataSources": [
        {
            "name": "boiler",
            "description": "boiler sensors",
            "dataPoints": [
                {"id": "dp-1", "name": "temperature", "type": "DOUBLE", "unit": "C"},
                {
                    "id": "dp-2",
                    "name": "running",
                    "type": "BOOLEAN",
                    "unit": "",
                    "customData": {"register": 40001, "scale": [1, 10]},
                },
            ],
            "customData": {"bus": "modbus"},
        }
    ],
}


def agent_path(agent_id: str, suffix: str = "") -> str:
    return f"{AGENTS}/agents/{agent_id}{suffix}"


# --- agents ------------------------------------------------------------------------------------------


def test_a_created_agent_has_the_platform_shape_and_an_etag_header(hub: RunningHub) -> None:
    response = hub.admin(
        "POST",
        f"{AGENTS}/agents",
        json={"name": "GW-0001", "securityProfile": "RSA_3072", "description": "x"},
    )
    assert response.status_code == 201, response.text
    agent = response.json()
    assert set(agent) == {"id", "name", "securityProfile", "description", "eTag", "createdAt", "updatedAt"}
    assert (agent["name"], agent["securityProfile"], agent["description"], agent["eTag"]) == (
        "GW-0001",
        "RSA_3072",
        "x",
        "1",
    )
    assert response.headers["ETag"] == '"1"'
    for field in ("createdAt", "updatedAt"):
        assert re.match(ISO_TIME, agent[field])
    fetched = hub.admin("GET", agent_path(agent["id"]))
    assert fetched.json() == agent
    assert fetched.headers["ETag"] == '"1"'


def test_admin_routes_refuse_a_missing_or_wrong_token_and_an_agents_access_token(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    assert_hub_error(hub.request("GET", f"{AGENTS}/agents"), 401, "unauthorized")
    assert_hub_error(hub.request("GET", f"{AGENTS}/agents", token="not-the-admin-token"), 401)
    assert_hub_error(hub.request("GET", f"{AGENTS}/agents", token=agent.access_token()), 401)
    refused = hub.request(
        "POST", f"{AGENTS}/agents", json={"name": "gw-2", "securityProfile": "SHARED_SECRET"}
    )
    assert_hub_error(refused, 401)
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 1


def test_a_duplicate_name_is_a_conflict_and_creates_nothing(hub: RunningHub) -> None:
    create_agent(hub, "gw-1")
    response = hub.admin("POST", f"{AGENTS}/agents", json={"name": "gw-1", "securityProfile": "RSA_3072"})
    assert_hub_error(response, 409, "conflict")
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 1


def test_a_name_that_differs_only_in_case_is_a_conflict_naming_the_agent_to_use(hub: RunningHub) -> None:
    """The factory names an agent after its board's serial (`GW-0001`): a `gw-0001` beside it would be a
    second agent for the same board, whose tasks never reach it."""
    first = create_agent(hub, "GW-0001")
    response = hub.admin("POST", f"{AGENTS}/agents", json={"name": "gw-0001", "securityProfile": "RSA_3072"})
    body = assert_hub_error(response, 409, "conflict")
    assert (
        "'GW-0001' already exists" in body["error_description"]
        and "only in case" in body["error_description"]
    )
    other = create_agent(hub, "GW-0002")
    renamed = {"name": "gw-0001", "securityProfile": "SHARED_SECRET"}
    response = hub.admin("PUT", agent_path(other["id"]), json=renamed, headers={"If-Match": "1"})
    assert_hub_error(response, 409, "conflict")
    own_case = {"name": "gw-0001", "securityProfile": "SHARED_SECRET"}  # an agent may change its own case
    response = hub.admin("PUT", agent_path(first["id"]), json=own_case, headers={"If-Match": "1"})
    assert response.status_code == 200, response.text
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 2


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "securityProfile": "SHARED_SECRET"},
        {"name": " padded ", "securityProfile": "SHARED_SECRET"},
        {"name": "line\nbreak", "securityProfile": "SHARED_SECRET"},
        {"name": "x" * 129, "securityProfile": "SHARED_SECRET"},
        {"name": "gw", "securityProfile": "RSA_2048"},
        {"name": 7, "securityProfile": "SHARED_SECRET"},
        {"securityProfile": "SHARED_SECRET"},
        {"name": "gw", "securityProfile": "SHARED_SECRET", "description": "d" * 2049},
    ],
)
def test_an_invalid_agent_body_is_refused_and_creates_nothing(hub: RunningHub, body: dict[str, Any]) -> None:
    assert_hub_error(hub.admin("POST", f"{AGENTS}/agents", json=body), 400, "invalid_request")
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 0


def test_malformed_json_is_a_400_and_creates_nothing(hub: RunningHub) -> None:
    response = hub.admin(
        "POST", f"{AGENTS}/agents", data=b'{"name": "gw", ', headers={"Content-Type": "application/json"}
    )
    assert_hub_error(response, 400, "invalid_request")
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 0


def test_the_hub_refuses_agents_beyond_max_agents(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub", HubSettings(max_agents=3)) as hub:
        for number in range(3):
            create_agent(hub, f"gw-{number}")
        response = hub.admin("POST", f"{AGENTS}/agents", json={"name": "gw-3", "securityProfile": "RSA_3072"})
        assert_hub_error(response, 409, "limit_reached")
        assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 3
        first = hub.admin("GET", f"{AGENTS}/agents?size=1").json()["content"][0]
        deleted = hub.admin("DELETE", agent_path(first["id"]), headers={"If-Match": first["eTag"]})
        assert deleted.status_code == 204
        create_agent(hub, "gw-3")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_concurrent_creations_never_pass_max_agents(
    tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    settings = HubSettings(max_agents=4, database_url=url) if url else HubSettings(max_agents=4)
    with running_hub(tmp_path / "hub", settings) as hub:
        start = threading.Barrier(16)

        def create(number: int) -> int:
            with requests.Session() as http:  # a connection of its own: requests at the same moment
                start.wait()
                response = http.post(
                    f"{hub.url}{AGENTS}/agents",
                    json={"name": f"gw-{number}", "securityProfile": "SHARED_SECRET"},
                    headers={"Authorization": f"Bearer {hub.admin_token}"},
                    verify=str(hub.ca),
                    timeout=30,
                )
            return response.status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = sorted(pool.map(create, range(16)))
        assert statuses == [201] * 4 + [409] * 12
        assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 4


def test_agents_are_listed_a_page_at_a_time_and_found_by_exact_name(hub: RunningHub) -> None:
    names = [f"gw-{number}" for number in range(5)]
    for name in names:
        create_agent(hub, name)
    page = hub.admin("GET", f"{AGENTS}/agents", params={"page": 1, "size": 2}).json()
    assert [agent["name"] for agent in page["content"]] == names[2:4]
    assert {key: page[key] for key in page if key != "content"} == {
        "number": 1,
        "size": 2,
        "totalElements": 5,
        "totalPages": 3,
        "first": False,
        "last": False,
        "numberOfElements": 2,
    }
    last = hub.admin("GET", f"{AGENTS}/agents", params={"page": 2, "size": 2}).json()
    assert (last["last"], last["numberOfElements"]) == (True, 1)
    found = hub.admin("GET", f"{AGENTS}/agents", params={"name": "gw-3"}).json()
    assert [agent["name"] for agent in found["content"]] == ["gw-3"]
    assert hub.admin("GET", f"{AGENTS}/agents", params={"name": "gw"}).json()["content"] == []


@pytest.mark.parametrize("query", [{"size": 501}, {"size": 0}, {"page": -1}, {"page": "x"}])
def test_an_out_of_range_page_request_is_a_400(hub: RunningHub, query: dict[str, Any]) -> None:
    assert_hub_error(hub.admin("GET", f"{AGENTS}/agents", params=query), 400, "invalid_request")


def test_control_characters_in_an_agent_id_or_name_are_a_400_on_every_database(
    hub_on_each_database: RunningHub,
) -> None:
    hub = hub_on_each_database
    for path in (agent_path("gw%00"), agent_path("gw%0A", "/boarding/configuration")):
        assert_hub_error(hub.admin("GET", path), 400, "invalid_request")
    assert_hub_error(hub.admin("GET", f"{AGENTS}/agents", params={"name": "gw\x00"}), 400, "invalid_request")


def test_a_description_no_database_can_store_is_a_400_on_every_database(
    hub_on_each_database: RunningHub,
) -> None:
    hub = hub_on_each_database
    body = {"name": "gw-1", "securityProfile": "SHARED_SECRET", "description": "line\x00"}
    assert_hub_error(hub.admin("POST", f"{AGENTS}/agents", json=body), 400, "invalid_request")
    assert hub.admin("GET", f"{AGENTS}/agents").json()["totalElements"] == 0
    agent = create_agent(hub, "gw-1")
    before = agent_record(hub, agent["id"])
    updated = hub.admin("PUT", agent_path(agent["id"]), json=body, headers={"If-Match": "1"})
    assert_hub_error(updated, 400, "invalid_request")
    assert agent_record(hub, agent["id"]) == before


def test_an_unknown_agent_is_a_404(hub: RunningHub) -> None:
    assert_hub_error(hub.admin("GET", agent_path("0" * 32)), 404, "not_found")
    assert_hub_error(hub.admin("GET", agent_path("0" * 32, "/boarding/configuration")), 404)


def test_an_update_needs_if_match_and_refuses_a_stale_etag(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-1")
    body = {"name": "gw-renamed", "securityProfile": "SHARED_SECRET", "description": "new"}
    before = agent_record(hub, agent["id"])
    assert_hub_error(hub.admin("PUT", agent_path(agent["id"]), json=body), 428, "precondition_required")
    stale = hub.admin("PUT", agent_path(agent["id"]), json=body, headers={"If-Match": '"7"'})
    assert_hub_error(stale, 412, "precondition_failed")
    garbage = hub.admin("PUT", agent_path(agent["id"]), json=body, headers={"If-Match": "banana"})
    assert_hub_error(garbage, 412)
    assert agent_record(hub, agent["id"]) == before

    updated = hub.admin("PUT", agent_path(agent["id"]), json=body, headers={"If-Match": '"1"'})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["name"], updated.json()["eTag"], updated.headers["ETag"]) == (
        "gw-renamed",
        "2",
        '"2"',
    )
    again = hub.admin(
        "PUT", agent_path(agent["id"]), json=body | {"description": "v3"}, headers={"If-Match": "2"}
    )
    assert again.json()["eTag"] == "3"
    replay = hub.admin("PUT", agent_path(agent["id"]), json=body, headers={"If-Match": "2"})
    assert_hub_error(replay, 412)


def test_if_match_with_a_weak_etag_never_matches_and_changes_nothing(hub: RunningHub) -> None:
    """RFC 9110 section 13.1.1: `If-Match` uses the strong comparison, so `W/"1"` is not the current
    `"1"`, whatever the resource."""
    agent = create_agent(hub, "gw-1")
    body = {"name": "gw-renamed", "securityProfile": "SHARED_SECRET"}
    configuration = agent_path(agent["id"], "/dataSourceConfiguration")
    before = agent_record(hub, agent["id"])
    for weak in ('W/"1"', "W/1"):
        headers = {"If-Match": weak}
        updated = hub.admin("PUT", agent_path(agent["id"]), json=body, headers=headers)
        assert_hub_error(updated, 412, "precondition_failed")
        assert_hub_error(hub.admin("DELETE", agent_path(agent["id"]), headers=headers), 412)
        assert_hub_error(hub.admin("PUT", configuration, json=DOCUMENT, headers=headers), 412)
    assert agent_record(hub, agent["id"]) == before
    assert hub.admin("GET", configuration).json()["eTag"] == "1"


def test_if_match_is_a_list_of_etags_or_a_star_and_any_strong_one_may_name_the_current(
    hub: RunningHub,
) -> None:
    """RFC 9110 section 13.1.1: the condition holds when any listed tag is the current one (compared
    strongly), or for `*`; a list naming no current tag, or only a weak one, is 412 and changes nothing."""
    agent = create_agent(hub, "gw-1")
    body = {"name": "gw-renamed", "securityProfile": "SHARED_SECRET"}
    path = agent_path(agent["id"])
    before = agent_record(hub, agent["id"])
    for refused in ('"7", "8"', 'W/"1", "2"', 'W/"1"', '"1", banana', '"1" "2"', ","):
        response = hub.admin("PUT", path, json=body, headers={"If-Match": refused})
        assert_hub_error(response, 412, "precondition_failed")
        assert_hub_error(hub.admin("DELETE", path, headers={"If-Match": refused}), 412)
    assert agent_record(hub, agent["id"]) == before

    listed = hub.admin("PUT", path, json=body, headers={"If-Match": '"7", "1"'})
    assert (listed.status_code, listed.headers.get("ETag")) == (200, '"2"'), listed.text
    starred = hub.admin("PUT", path, json=body | {"description": "v3"}, headers={"If-Match": "*"})
    assert (starred.status_code, starred.headers.get("ETag")) == (200, '"3"'), starred.text
    configuration = agent_path(agent["id"], "/dataSourceConfiguration")
    stored = hub.admin("PUT", configuration, json=DOCUMENT, headers={"If-Match": 'W/"1", "1"'})
    assert stored.json()["eTag"] == "2", stored.text
    assert hub.admin("DELETE", path, headers={"If-Match": '"1","2",  "3"'}).status_code == 204


def test_renaming_to_a_taken_name_is_a_conflict(hub: RunningHub) -> None:
    create_agent(hub, "gw-1")
    second = create_agent(hub, "gw-2")
    body = {"name": "gw-1", "securityProfile": "SHARED_SECRET"}
    response = hub.admin("PUT", agent_path(second["id"]), json=body, headers={"If-Match": "1"})
    assert_hub_error(response, 409, "conflict")
    assert hub.admin("GET", agent_path(second["id"])).json()["name"] == "gw-2"


def test_the_profile_of_an_onboarded_agent_cannot_change_until_it_is_offboarded(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    body = {"name": "gw-1", "securityProfile": "RSA_3072"}
    before = agent_record(hub, agent.id)
    response = hub.admin("PUT", agent_path(agent.id), json=body, headers={"If-Match": "1"})
    assert_hub_error(response, 409, "conflict")
    assert agent_record(hub, agent.id) == before
    assert hub.admin("POST", agent_path(agent.id, "/boarding/offboard")).status_code == 200
    changed = hub.admin("PUT", agent_path(agent.id), json=body, headers={"If-Match": "1"})
    assert changed.status_code == 200
    assert changed.json()["securityProfile"] == "RSA_3072"


def test_deleting_an_agent_needs_if_match_and_removes_its_configuration_and_tokens(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    access_token = agent.access_token()
    assert_hub_error(hub.admin("DELETE", agent_path(agent.id)), 428)
    assert_hub_error(hub.admin("DELETE", agent_path(agent.id), headers={"If-Match": "9"}), 412)
    assert hub.admin("GET", agent_path(agent.id)).status_code == 200

    assert hub.admin("DELETE", agent_path(agent.id), headers={"If-Match": '"1"'}).status_code == 204
    assert_hub_error(hub.admin("GET", agent_path(agent.id)), 404)
    assert_hub_error(hub.admin("GET", agent_path(agent.id, "/dataSourceConfiguration")), 404)
    config = hub.request("GET", agent_path(agent.id, "/dataSourceConfiguration"), token=access_token)
    assert_hub_error(config, 401)
    assert_hub_error(agent.request_token(), 401, "invalid_client")


# --- data source configuration -----------------------------------------------------------------------


def test_a_new_agent_has_an_empty_data_source_configuration(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-1")
    response = hub.admin("GET", agent_path(agent["id"], "/dataSourceConfiguration"))
    assert response.json() == {"configurationId": "", "description": "", "dataSources": [], "eTag": "1"}
    assert response.headers["ETag"] == '"1"'


def test_a_data_source_configuration_is_replaced_with_if_match_and_read_back(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-1")
    path = agent_path(agent["id"], "/dataSourceConfiguration")
    assert_hub_error(hub.admin("PUT", path, json=DOCUMENT), 428)
    assert_hub_error(hub.admin("PUT", path, json=DOCUMENT, headers={"If-Match": "2"}), 412)
    stored = hub.admin("PUT", path, json=DOCUMENT, headers={"If-Match": "1"})
    assert stored.status_code == 200, stored.text
    expected = json.loads(json.dumps(DOCUMENT))
    expected["dataSources"][0]["dataPoints"][0]["description"] = ""
    expected["dataSources"][0]["dataPoints"][1]["description"] = ""
    assert stored.json() == expected | {"eTag": "2"}
    assert hub.admin("GET", path).json() == expected | {"eTag": "2"}
    # a client may send back what it read, eTag included
    echoed = hub.admin("PUT", path, json=stored.json(), headers={"If-Match": '"2"'})
    assert echoed.json()["eTag"] == "3"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["dataSources"][0]["dataPoints"].append(d["dataSources"][0]["dataPoints"][0]),
        lambda d: d["dataSources"][0]["dataPoints"][0].update(type="FLOAT"),
        lambda d: d["dataSources"][0]["dataPoints"][0].pop("unit"),
        lambda d: d["dataSources"][0]["dataPoints"][0].update(unknown=1),
        lambda d: d["dataSources"][0].update(dataPoints=[]),
        lambda d: d.update(configurationId=""),
        lambda d: d.update(dataSources=d["dataSources"] * (MAX_DATA_SOURCES + 1)),
        lambda d: d["dataSources"][0].update(customData={"blob": "x" * 9000}),
        lambda d: d["dataSources"][0]["dataPoints"][0].update(name=5),
    ],
    ids=[
        "duplicate-id",
        "unknown-type",
        "no-unit",
        "unknown-field",
        "no-points",
        "empty-id",
        "too-many-sources",
        "huge-custom-data",
        "number-for-name",
    ],
)
def test_an_invalid_data_source_configuration_is_refused_and_changes_nothing(
    hub: RunningHub, mutate: Any
) -> None:
    agent = create_agent(hub, "gw-1")
    path = agent_path(agent["id"], "/dataSourceConfiguration")
    document = json.loads(json.dumps(DOCUMENT))
    mutate(document)
    assert_hub_error(hub.admin("PUT", path, json=document, headers={"If-Match": "1"}), 400, "invalid_request")
    assert hub.admin("GET", path).json()["eTag"] == "1"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(configurationId="gateway\x00v1"),
        lambda d: d.update(description="what\x00"),
        lambda d: d["dataSources"][0].update(name="boiler\x00"),
        lambda d: d["dataSources"][0]["dataPoints"][0].update(unit="\x00C"),
        lambda d: d["dataSources"][0]["customData"].update(bus="mod\x00bus"),
        lambda d: d["dataSources"][0]["dataPoints"][1]["customData"].update({"reg\x00ister": [1]}),
    ],
    ids=["configuration-id", "description", "source-name", "unit", "custom-value", "custom-key"],
)
def test_a_data_source_configuration_holding_a_nul_is_a_400_on_every_database(
    hub_on_each_database: RunningHub, mutate: Any
) -> None:
    """Refused like an agent's description with a NUL, not stored escaped and served back to agents."""
    hub = hub_on_each_database
    agent = create_agent(hub, "gw-1")
    path = agent_path(agent["id"], "/dataSourceConfiguration")
    document = json.loads(json.dumps(DOCUMENT))
    mutate(document)
    refused = hub.admin("PUT", path, json=document, headers={"If-Match": "1"})
    assert "NUL" in assert_hub_error(refused, 400, "invalid_request")["error_description"]
    assert hub.admin("GET", path).json()["eTag"] == "1"


def test_an_agent_reads_its_own_data_source_configuration_but_not_anothers(hub: RunningHub) -> None:
    first = onboard_agent(hub, "gw-1")
    second = onboard_agent(hub, "gw-2")
    token = first.access_token()
    own = hub.request("GET", agent_path(first.id, "/dataSourceConfiguration"), token=token)
    assert own.status_code == 200
    other = hub.request("GET", agent_path(second.id, "/dataSourceConfiguration"), token=token)
    assert_hub_error(other, 403, "forbidden")
    write = hub.request("PUT", agent_path(first.id, "/dataSourceConfiguration"), token=token, json=DOCUMENT)
    assert_hub_error(write, 401)


# --- boarding ----------------------------------------------------------------------------------------


def test_the_boarding_configuration_carries_a_one_agent_iat_and_is_stable(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-1", "RSA_3072")
    status = hub.admin("GET", agent_path(agent["id"], "/boarding/status")).json()
    assert status["status"] == "NOT_ONBOARDED"

    configuration = boarding_configuration(hub, agent["id"])
    content = configuration["content"]
    assert content == {
        "baseUrl": hub.url,
        "iat": content["iat"],
        "clientCredentialProfile": ["RSA_3072"],
        "clientId": agent["id"],
        "tenant": "mers",
    }
    header = jwt.get_unverified_header(content["iat"])
    claims = jwt.decode(content["iat"], options={"verify_signature": False})
    assert header["alg"] == "RS256"
    assert (claims["sub"], claims["ten"]) == (agent["id"], "mers")
    assert claims["exp"] - claims["iat"] == 7 * 24 * 3600
    assert re.match(ISO_TIME, configuration["expiration"])
    assert boarding_configuration(hub, agent["id"]) == configuration
    assert hub.admin("GET", agent_path(agent["id"], "/boarding/status")).json()["status"] == "ONBOARDING"


def test_the_same_iat_is_returned_after_it_was_used(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    configuration = boarding_configuration(hub, agent.id)
    assert boarding_configuration(hub, agent.id) == configuration
    assert hub.admin("GET", agent_path(agent.id, "/boarding/status")).json()["status"] == "ONBOARDED"


def test_offboarding_revokes_and_hands_out_a_fresh_iat(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    old_iat = boarding_configuration(hub, agent.id)["content"]["iat"]
    response = hub.admin("POST", agent_path(agent.id, "/boarding/offboard"))
    assert response.status_code == 200
    assert response.json()["status"] == "NOT_ONBOARDED"
    assert set(response.json()) == {"status", "updatedAt"}
    record = agent_record(hub, agent.id)
    assert record["client_secret"] is None and record["rat_jti"] is None
    assert record["credential_generation"] == 1
    new_iat = boarding_configuration(hub, agent.id)["content"]["iat"]
    assert new_iat != old_iat
    assert_hub_error(register(hub, old_iat, "SHARED_SECRET"), 401, "token_validation_failed")
    assert register(hub, new_iat, "SHARED_SECRET").status_code == 201


def test_offboarding_an_unknown_agent_is_a_404(hub: RunningHub) -> None:
    assert_hub_error(hub.admin("POST", agent_path("f" * 32, "/boarding/offboard")), 404, "not_found")


# --- the validator, as a property --------------------------------------------------------------------

#: any text a client can send (UTF-8) but a NUL, which no text of a configuration may hold
_storable = st.characters(codec="utf-8", exclude_characters="\x00")
_point = st.fixed_dictionaries(
    {
        "id": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
        "name": st.text(_storable, min_size=1, max_size=128),
        "type": st.sampled_from(["INT", "LONG", "DOUBLE", "BOOLEAN", "STRING", "BIG_STRING", "TIMESTAMP"]),
        "unit": st.text(_storable, max_size=32),
    }
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(sources=st.lists(st.lists(_point, min_size=1, max_size=5), max_size=4))
def test_a_valid_configuration_is_stored_exactly_unless_its_ids_repeat(
    sources: list[list[dict[str, Any]]],
) -> None:
    document = {
        "configurationId": "c",
        "dataSources": [{"name": f"s{n}", "dataPoints": points} for n, points in enumerate(sources)],
    }
    ids = [point["id"] for points in sources for point in points]
    if len(ids) != len(set(ids)):
        with pytest.raises(InvalidRequestError, match="used twice"):
            parse_document(document)
        return
    stored = parse_document(document)
    assert [point["id"] for source in stored["dataSources"] for point in source["dataPoints"]] == ids
    assert parse_document(stored) == stored  # what the hub serves, it accepts back


@settings(max_examples=200, deadline=None)
@given(document=st.dictionaries(st.text(max_size=16), _json, max_size=6) | _json)
def test_the_validator_answers_arbitrary_json_with_its_own_error_or_a_stable_document(document: Any) -> None:
    try:
        stored = parse_document(document)
    except InvalidRequestError as exc:
        assert str(exc).startswith("invalid data source configuration")
        return
    assert parse_document(stored) == stored

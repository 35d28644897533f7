"""The station's boarding sources against the real hub over TLS: which agent's configuration a serial
number gets, and which IATs are refused before a board could be sealed with them."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from factory.boarding_source import Boarding, HubSource
from factory.errors import AgentOnboardedError, DuplicateAgentsError, ExitCode, HubRefusedError, InputError
from tests.factory_helpers import DAY, recording_server
from tests.hub_helpers import AGENTS, RunningHub, agent_record, boarding_configuration, onboard_agent


def hub_source(hub: RunningHub) -> HubSource:
    return HubSource(hub.url, hub.ca, hub.admin_token)


def status(hub: RunningHub, agent_id: str) -> str:
    answer: str = hub.admin("GET", f"{AGENTS}/agents/{agent_id}/boarding/status").json()["status"]
    return answer


def test_an_agent_that_onboarded_is_refused_while_its_used_iat_is_still_valid(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "GW-5")
    used = boarding_configuration(hub, agent.id)["content"]["iat"]
    before = agent_record(hub, agent.id)
    with pytest.raises(AgentOnboardedError) as raised:
        hub_source(hub).fresh("GW-5", hub.clock() + DAY)  # the used IAT has six days and more to run
    assert "GW-5" in str(raised.value) and "ONBOARDED" in str(raised.value)
    assert (raised.value.serial_number, raised.value.status) == ("GW-5", "ONBOARDED")
    assert raised.value.exit_code == ExitCode.REFUSED
    assert isinstance(raised.value.facts, Boarding)  # the record names the used IAT
    assert raised.value.facts.iat_jti == jwt.decode(used, options={"verify_signature": False})["jti"]
    assert agent_record(hub, agent.id) == before  # not offboarded: the device keeps its credentials


def test_an_agent_whose_configuration_was_handed_out_gets_the_same_one_again(hub: RunningHub) -> None:
    """ONBOARDING is what handing the configuration out sets: a re-run after a failed attempt goes on."""
    source = hub_source(hub)
    first = source.fresh("GW-6", hub.clock() + DAY)
    assert status(hub, first.client_id) == "ONBOARDING"
    again = source.fresh("GW-6", hub.clock() + DAY)
    assert (again.agent_id, again.iat_jti, again.config) == (first.agent_id, first.iat_jti, first.config)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8443", "127.0.0.1:8443", "https://", "https://[::1"])
def test_a_hub_url_that_is_not_https_is_refused_as_bad_input(tmp_path: Path, url: str) -> None:
    with pytest.raises(InputError) as raised:
        HubSource(url, tmp_path / "ca.pem", "s3cret-admin-token")
    assert raised.value.field == "hub" and "https://" in str(raised.value)
    assert "s3cret-admin-token" not in str(raised.value)


def test_a_redirect_is_not_followed_with_the_admin_token(tmp_path: Path) -> None:
    """requests keeps the Authorization header on a redirect within the same origin: another service
    behind the same proxy would be handed the admin token."""
    with recording_server(tmp_path, tls=True, redirect_to="/elsewhere") as server:
        source = HubSource(server.url, server.ca, "s3cret-admin-token")
        with pytest.raises(HubRefusedError) as raised:
            source.current("GW-1")
        assert raised.value.status == 307 and "redirect" in str(raised.value)
        assert "s3cret-admin-token" not in str(raised.value)
        assert [path for path, _ in server.seen if not path.startswith(AGENTS)] == []


def test_the_agent_is_the_one_named_after_the_serial_number_whatever_the_listing_holds(
    tmp_path: Path,
) -> None:
    """A listing that ignores the name filter: GW-2 gets GW-2's agent, not the first one listed."""
    with recording_server(tmp_path, tls=True, agents=["GW-1", "GW-2"]) as server:
        source = HubSource(server.url, server.ca, "s3cret-admin-token")
        boarding = source.current("GW-2")
        assert boarding is not None and (boarding.agent_id, boarding.client_id) == ("agent-GW-2",) * 2
        assert source.current("GW-3") is None  # no agent: the station creates one (fresh) or refuses


def test_a_listing_that_ignores_the_name_filter_is_read_to_its_last_page(tmp_path: Path) -> None:
    """An agent on the second page was missed, and the station created a second agent with its name."""
    names = [f"SN-{number}" for number in range(150)]
    with recording_server(tmp_path, tls=True, agents=names) as server:
        source = HubSource(server.url, server.ca, "s3cret-admin-token")
        boarding = source.current("SN-120")
        assert boarding is not None and boarding.agent_id == "agent-SN-120"
        listings = [path for path, _ in server.seen if path.split("?")[0].endswith("/agents")]
        assert len(listings) == 2


def test_several_agents_named_after_one_serial_number_are_refused(tmp_path: Path) -> None:
    with recording_server(tmp_path, tls=True, agents=["GW-1", "GW-2", "GW-2"]) as server:
        source = HubSource(server.url, server.ca, "s3cret-admin-token")
        with pytest.raises(DuplicateAgentsError) as raised:
            source.fresh("GW-2", time.time() + DAY)
        assert "GW-2" in str(raised.value) and raised.value.exit_code == ExitCode.HUB
        assert not [path for path, _ in server.seen if "/agents/" in path]  # no configuration was asked for

"""The station's boarding sources against the real hub over TLS: which agent's configuration a serial
number gets, and which IATs are refused before a board could be sealed with them."""

from __future__ import annotations

import jwt
import pytest

from factory.boarding_source import Boarding, HubSource
from factory.errors import AgentOnboardedError, ExitCode
from tests.factory_helpers import DAY
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

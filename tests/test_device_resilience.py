"""The device client when things go wrong: the process killed at every step of a renewal, a device
clock hours off, a hub that fails, hangs or drops connections, a wrong CA, and an authenticating proxy."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from board.interface import BoardingData, Identity
from board.simboard import SimBoard
from hub import oauth
from hub import onboarding as hub_onboarding
from hub.oauth_form import TokenRequest
from hub.state import HubState
from mers.client import LAST_ERROR_FILE, REGISTRATION_SENT_FILE, RenewalStep
from mers.clock import HubClock
from mers.credentials import load_credentials
from mers.errors import EXIT_UNREACHABLE, EXIT_USAGE, HubProtocolError, HubUnreachableError
from mers.http import HubSession
from tests.board_helpers import config
from tests.conftest import run_cli
from tests.device_helpers import (
    BUSY_RETRY_AFTER,
    DAY,
    FAST_HTTP,
    PROFILES,
    Gateway,
    bad_server,
    connect_proxy,
    make_gateway,
    rat_id,
    redirect_credentials_to,
)
from tests.forked_process import ForkedDriver
from tests.hub_helpers import RunningHub, agent_record, running_hub

ROOT = Path(__file__).resolve().parent.parent


def driver(gateway: Gateway, *options: str) -> ForkedDriver:
    """The device client as a process of its own (`device_helpers.renewal_driver`)."""
    return ForkedDriver("tests.device_helpers:renewal_driver", [str(gateway.path), *options])


def assert_recovers(hub: RunningHub, gateway: Gateway) -> float:
    """A fresh process ends authenticated, and a RAT the hub honours is among the stored ones; the
    seconds that process took."""
    process = driver(gateway)
    started = time.monotonic()  # once started: the first start also starts the fork server
    finished = process.wait()
    took = time.monotonic() - started
    assert finished.returncode == 0, finished.stderr
    token = finished.stdout.strip()
    assert token.count(".") == 2
    record = agent_record(hub, gateway.agent_id)
    honoured = {record["rat_jti"], record["previous_rat_jti"]} - {None}
    assert gateway.stored_rat_ids() & honoured, "no stored RAT is one the hub still honours"
    response = hub.request("GET", "/api/firmwaredeployment/v3/installationTasks", token=token)
    assert response.status_code == 200, response.text
    return took


@pytest.mark.parametrize("profile", PROFILES)
def test_a_renewal_killed_at_any_step_recovers_on_the_next_start(
    hub: RunningHub, tmp_path: Path, profile: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", profile)
    with gateway.client() as client:
        client.onboard()
    rounds = 3 if profile == "SHARED_SECRET" else 2
    for _ in range(rounds):
        for step in RenewalStep:
            hub.clock.advance(6.5 * DAY)  # due for renewal again
            killed = driver(gateway, "--kill-at", step.value).wait()
            assert killed.returncode == -signal.SIGKILL, f"the driver did not reach {step}: {killed.stderr}"
            assert_recovers(hub, gateway)
            renewed = json.loads((gateway.board.state.directory / "credentials.json").read_bytes())
            assert renewed["current"]["expiresAt"] > hub.clock() + 6 * DAY


def test_a_renewal_killed_at_evenly_spread_moments_recovers_every_time(
    hub: RunningHub, tmp_path: Path
) -> None:
    """Between the named steps too: a renewal is timed once whole, then killed at 1/13, 2/13 ... 12/13 of
    that time (or not at all, when it ends first), a recovery after each."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    hub.clock.advance(6.5 * DAY)
    whole = assert_recovers(hub, gateway)  # a renewal, timed
    killed = 0
    for moment in range(1, 13):
        hub.clock.advance(6.5 * DAY)
        process = driver(gateway)
        if not process.join(whole * moment / 13):
            process.kill()
        killed += process.wait().returncode == -signal.SIGKILL
        assert_recovers(hub, gateway)
    assert killed >= 6, f"only {killed} of 12 renewals were killed before they ended"


def test_a_lost_renewal_answer_is_recovered_with_the_previous_rat(hub: RunningHub, tmp_path: Path) -> None:
    """The hub renewed, but the answer never reached the device: its RAT is now the hub's previous one."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        held = client.credentials().current
    hub.clock.advance(6.5 * DAY)
    lost = hub.request(
        "PUT",
        held.registration_client_uri.removeprefix(hub.url),
        token=held.rat,
        json={"client_id": gateway.agent_id},
    )
    assert lost.status_code == 200
    assert agent_record(hub, gateway.agent_id)["previous_rat_jti"] == rat_id(held.rat)
    assert_recovers(hub, gateway)
    assert rat_id(held.rat) not in gateway.stored_rat_ids()


def test_a_renewal_retried_while_the_hub_still_works_on_it_is_not_a_call_to_re_onboard(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded hub outlives the device's read timeout on a renewal; the transport sends it again; the
    hub commits the first try and refuses the retry, whose RAT a concurrent renewal used. That renewal was
    the device's own: its RAT is the hub's previous one now, and one more try with it renews."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        held = client.credentials().current
    hub.clock.advance(6.5 * DAY)
    renew = hub_onboarding.renew
    tries: list[str] = []
    retry_arrived, first_committed = threading.Event(), threading.Event()

    def first_try_outlives_the_read_timeout(
        state: HubState, renewer: hub_onboarding.Renewer, request: hub_onboarding.RenewalRequest
    ) -> hub_onboarding.Registration:
        tries.append(renewer.rat_jti)
        if len(tries) == 1:  # held until the device gave up on it and sent it again
            assert retry_arrived.wait(30), "the transport did not send the renewal again"
            try:
                return renew(state, renewer, request)
            finally:
                first_committed.set()
        if len(tries) == 2:  # checked while the first was running; writes once the first committed
            retry_arrived.set()
            assert first_committed.wait(30)
        return renew(state, renewer, request)

    monkeypatch.setattr(hub_onboarding, "renew", first_try_outlives_the_read_timeout)
    with gateway.client() as client:
        token = client.access_token()
        renewed = client.credentials()
    assert tries == [rat_id(held.rat)] * 3
    record = agent_record(hub, gateway.agent_id)
    assert rat_id(renewed.current.rat) == record["rat_jti"]
    response = hub.request("GET", "/api/firmwaredeployment/v3/installationTasks", token=token)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("profile", PROFILES)
def test_a_token_answer_lost_after_the_hub_granted_it_is_recovered_with_a_new_assertion(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    """The hub granted a token (spending the assertion), then failed before answering, as a gateway's
    load balancer does when it times out: the transport sends the same assertion again, which the hub
    refuses as spent, and the client signs a new one."""
    gateway = make_gateway(hub, tmp_path / "gw", profile=profile)
    with gateway.client() as client:
        client.onboard()
    granted: list[str] = []
    grant = oauth.grant_access_token

    def answer_lost_the_first_time(state: HubState, request: TokenRequest) -> oauth.AccessTokenGrant:
        result = grant(state, request)
        granted.append(request.client_assertion)
        if len(granted) == 1:
            raise RuntimeError("the hub fails after granting, before answering")
        return result

    monkeypatch.setattr(oauth, "grant_access_token", answer_lost_the_first_time)
    with gateway.client() as client:
        token = client.access_token()
    assert len(granted) == 2 and granted[0] != granted[1]
    response = hub.request("GET", "/api/firmwaredeployment/v3/installationTasks", token=token)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("skew", [2 * 3600.0, -2 * 3600.0])
@pytest.mark.parametrize("profile", PROFILES)
def test_a_device_clock_two_hours_off_still_onboards_and_gets_tokens(
    hub: RunningHub, tmp_path: Path, skew: float, profile: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", profile)
    with gateway.client(skew=skew) as client:
        client.onboard()
        token = client.access_token()
        assert client.clock.offset == pytest.approx(-skew, abs=2)
        response = hub.request("GET", "/api/firmwaredeployment/v3/installationTasks", token=token)
        assert response.status_code == 200
        hub.clock.advance(6.5 * DAY)
        before = client.credentials().current.rat
        client.access_token()
        assert client.credentials().current.rat != before, "due by the hub's time: renewed"


def test_renewal_decisions_follow_the_hub_clock_not_the_device_clock(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        before = client.credentials().current.rat
    with gateway.client(skew=10 * DAY) as ahead:  # locally the credentials look long expired
        ahead.access_token()
        assert ahead.credentials().current.rat == before, "no renewal: the hub says 7 days remain"
    hub.clock.advance(6.5 * DAY)
    with gateway.client(skew=-10 * DAY) as behind:  # locally they look fresh
        behind.access_token()
        assert behind.credentials().current.rat != before, "renewed: the hub says under 25 h remain"


def test_a_wall_clock_step_after_the_hub_time_was_learned_changes_no_decision(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    step = [-30 * 365 * DAY]  # a gateway without an RTC boots decades in the past
    clock = HubClock(lambda: hub.clock() + step[0], elapsed=hub.clock)
    with gateway.client(clock=clock) as client:
        client.onboard()
        token = client.access_token()
        before = client.credentials().current.rat
        step[0] = 0.0  # NTP sets the wall clock right while the client runs
        assert client.access_token() == token, "the cached token still has its half hour"
        assert client.credentials().current.rat == before, "no renewal: the hub says 7 days remain"
        hub.clock.advance(6.5 * DAY)
        client.access_token()
        assert client.credentials().current.rat != before, "renewed: the hub says under 25 h remain"


@pytest.mark.parametrize("mode", ["500", "hang", "drop"])
def test_a_misbehaving_hub_gets_bounded_retries_then_a_clear_error(
    hub: RunningHub, tmp_path: Path, mode: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    hub.clock.advance(6.5 * DAY)  # the next call renews: the most delicate moment to fail
    with bad_server(mode) as server:
        redirect_credentials_to(gateway, server.url, server.ca_pem)
        stored = (gateway.board.state.directory / "credentials.json").read_bytes()
        started = time.monotonic()
        with gateway.client() as client, pytest.raises(HubUnreachableError) as failure:
            client.access_token()
        elapsed = time.monotonic() - started
        assert server.connections == FAST_HTTP.retries + 1
        assert (gateway.board.state.directory / "credentials.json").read_bytes() == stored
    expected = {
        "500": "kept failing: 500: the database is down",
        "hang": "after 3 attempts",
        "drop": "after 3",
    }
    assert expected[mode] in str(failure.value)
    assert elapsed < (FAST_HTTP.read_timeout + 1) * (FAST_HTTP.retries + 1) + 5


def test_a_retry_after_longer_than_the_backoff_limit_waits_only_the_limit(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with bad_server("busy") as server:
        ca.write_bytes(server.ca_pem)
        session = HubSession(server.url, ca, HubClock(), settings=FAST_HTTP)
        started = time.monotonic()
        with pytest.raises(HubUnreachableError, match="kept failing: 503"):
            session.request("GET", "/api/firmwaredeployment/v3/installationTasks", bearer="token")
        elapsed = time.monotonic() - started
        session.close()
        assert server.connections == FAST_HTTP.retries + 1
    # obeying the header would take BUSY_RETRY_AFTER per retry (10 s); the cap is backoff_max (0.05 s)
    assert elapsed < BUSY_RETRY_AFTER, f"waited {elapsed:.1f} s for {FAST_HTTP.retries} retries"


def test_an_answer_cut_short_after_its_headers_is_asked_for_again(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with bad_server("cut-once") as server:
        ca.write_bytes(server.ca_pem)
        session = HubSession(server.url, ca, HubClock(), settings=FAST_HTTP)
        try:
            answer = session.request("GET", "/api/firmwaredeployment/v3/installationTasks", bearer="token")
        finally:
            session.close()
        assert (answer.status, answer.json()) == (200, {"answer": "whole"})
        assert server.connections == 2


def test_answers_always_cut_short_end_after_bounded_retries(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with bad_server("cut") as server:
        ca.write_bytes(server.ca_pem)
        session = HubSession(server.url, ca, HubClock(), settings=FAST_HTTP)
        with pytest.raises(HubUnreachableError) as failure:
            session.request("GET", "/api/firmwaredeployment/v3/installationTasks", bearer="token")
        session.close()
        assert server.connections == FAST_HTTP.retries + 1
    assert f"kept cutting its answer short ({FAST_HTTP.retries + 1} attempts)" in str(failure.value)


@pytest.mark.parametrize(
    ("mode", "reached"), [("closed", False), ("drop", True), ("500", True), ("cut-once", True)]
)
def test_a_request_knows_whether_an_earlier_try_may_have_reached_the_hub(
    tmp_path: Path, mode: str, reached: bool
) -> None:
    """What the registration's diagnosis rests on: a try that never connected did not reach the hub; one
    whose connection dropped after the request, or that got a 5xx or half an answer, may have."""
    ca = tmp_path / "ca.pem"
    with bad_server("drop" if mode == "closed" else mode) as server:
        ca.write_bytes(server.ca_pem)
        url = server.url
    if mode == "closed":  # the server is gone: nothing listens on its port any more
        session = HubSession(url, ca, HubClock(), settings=FAST_HTTP)
        with pytest.raises(HubUnreachableError) as failure:
            session.request("POST", "/api/agentmanagement/v3/register", json={})
        assert failure.value.reached_the_hub is reached
        return
    with bad_server(mode) as server:
        ca.write_bytes(server.ca_pem)
        session = HubSession(server.url, ca, HubClock(), settings=FAST_HTTP)
        try:
            answer = session.request("POST", "/api/agentmanagement/v3/register", json={})
        except HubUnreachableError as failure:
            assert failure.reached_the_hub is reached
        else:
            assert answer.repeated is reached
        finally:
            session.close()


def test_a_registration_that_never_left_the_device_leaves_no_note(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with running_hub(tmp_path / "gone") as gone:
        elsewhere = make_gateway(gone, tmp_path / "gw-gone")
    with elsewhere.client() as client, pytest.raises(HubUnreachableError):
        client.onboard()  # its hub stopped: connection refused on every try
    assert elsewhere.board.state.read(REGISTRATION_SENT_FILE) is None
    with gateway.client() as client:
        client.onboard()
    assert gateway.board.state.read(REGISTRATION_SENT_FILE) is None


def test_the_cli_reports_an_unreachable_hub_on_one_line(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    with bad_server("drop") as server:
        redirect_credentials_to(gateway, server.url, server.ca_pem)
        result = run_cli("mers", "datasources", "--board", gateway.path, "--retries", "1", "--timeout", "2")
        assert server.connections == 2
    assert result.returncode == EXIT_UNREACHABLE
    assert "cannot reach the hub" in result.error_line and "after 2 attempts" in result.error_line
    # a port nothing listens on: the cause in a few words, not urllib3's layers around it and the URL
    with bad_server("drop") as closed:
        redirect_credentials_to(gateway, closed.url, closed.ca_pem)
    result = run_cli("mers", "datasources", "--board", gateway.path, "--retries", "1", "--timeout", "2")
    assert result.returncode == EXIT_UNREACHABLE
    assert result.error_line.endswith(
        f"cannot reach the hub at {closed.url} after 2 attempts: [Errno 111] Connection refused"
    ), result.error_line


def test_a_hub_whose_certificate_is_not_from_the_boarding_ca_is_refused(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    with bad_server("500") as server:
        redirect_credentials_to(gateway, server.url, hub.ca.read_bytes())  # the server's CA is another one
        with gateway.client() as client, pytest.raises(HubUnreachableError, match="TLS to"):
            client.access_token()


def test_the_environment_cannot_redirect_or_untrust_the_hub(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    hostile = {
        "REQUESTS_CA_BUNDLE": str(tmp_path / "none.pem"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    result = run_cli("mers", "onboard", "--board", gateway.path, env=hostile)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_all_hub_traffic_goes_through_the_boarding_proxy_with_its_credentials(
    hub: RunningHub, tmp_path: Path, profile: str
) -> None:
    with connect_proxy() as proxy:
        network = {
            "proxy": f"http://127.0.0.1:{proxy.port}",
            "username": proxy.username,
            "password": proxy.password,
        }
        gateway = make_gateway(hub, tmp_path / "gw", profile, network=json.dumps(network).encode())
        result = run_cli("mers", "onboard", "--board", gateway.path)
        assert result.returncode == 0, result.stderr
        data = run_cli("mers", "datasources", "--board", gateway.path)
        assert data.returncode == 0, data.stderr
        host = hub.url.removeprefix("https://")
        assert proxy.tunnels and set(proxy.tunnels) == {host}
        assert proxy.refused == 0
        status = run_cli("mers", "status", "--board", gateway.path)
        assert (
            f"proxy: http://127.0.0.1:{proxy.port}" in status.stdout and proxy.password not in status.stdout
        )


def test_a_proxy_that_refuses_the_credentials_is_a_clear_error(hub: RunningHub, tmp_path: Path) -> None:
    with connect_proxy() as proxy:
        network = {"proxy": f"http://127.0.0.1:{proxy.port}", "username": "gw", "password": "wrong"}
        gateway = make_gateway(hub, tmp_path / "gw", network=json.dumps(network).encode())
        result = run_cli("mers", "onboard", "--board", gateway.path, "--retries", "0")
        assert proxy.refused >= 1 and not proxy.tunnels
    assert result.returncode == EXIT_UNREACHABLE and "407" in result.error_line
    assert "wrong" not in result.stderr


@pytest.mark.parametrize(
    "proxy",
    [
        "https://gw:pw-s3cret@proxy.example:3128",  # a scheme other than http
        "http://gw:pw-s3cret@:3128",  # no host
        "gw:pw-s3cret@proxy.example:3128",  # no scheme: urlsplit reads "gw" as one
        "pw-s3cret:x@proxy.example:3128",  # no scheme, the password first
    ],
)
def test_a_proxy_url_refused_is_never_quoted_with_its_password(
    hub: RunningHub, tmp_path: Path, proxy: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", network=json.dumps({"proxy": proxy}).encode())
    onboard = run_cli("mers", "onboard", "--board", gateway.path)
    assert onboard.returncode == EXIT_USAGE and "http://host:port" in onboard.error_line
    status = run_cli("mers", "status", "--board", gateway.path)
    status_json = run_cli("mers", "status", "--json", "--board", gateway.path)
    last_error = gateway.board.state.read(LAST_ERROR_FILE) or b""
    assert b"http://host:port" in last_error
    for shown in (onboard.stderr, status.stdout, status_json.stdout, last_error.decode()):
        assert "pw-s3cret" not in shown


def test_a_hub_that_never_tells_its_time_is_refused_before_the_iat_is_spent(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A proxy that strips `Server-Time`, on a gateway whose clock has no RTC: the registration answer's
    expiry cannot be judged in hub time, and refusing it after the hub recorded the registration would
    leave a used IAT and no credentials. The hub's time is asked first, and nothing is registered."""
    with bad_server("timeless") as server:
        board = SimBoard.create(tmp_path / "gw", Identity("SN-1", "Acme", "gw-100", "B"))
        board.write_boarding_data(BoardingData(config(baseUrl=server.url), server.ca_pem))
        with Gateway(board, "agent-1", hub).client() as client, pytest.raises(HubProtocolError, match="time"):
            client.onboard()
        assert server.requests and not any(line.startswith("POST") for line in server.requests)
    assert load_credentials(board.state) is None

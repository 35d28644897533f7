"""The device client against the real hub over TLS on 127.0.0.1: onboarding, tokens, renewal,
offboarding and re-onboarding, boarding import, tasks and data sources; the CLI run in-process (`run_cli`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from board.simboard import SimBoard
from hub import oauth
from hub import onboarding as hub_onboarding
from hub.home import HubSettings
from hub.onboarding import Registration
from mers.boarding import IMPORT_FILE
from mers.client import REGISTRATION_SENT_FILE, OnboardOutcome
from mers.credentials import load_credentials
from mers.errors import (
    EXIT_NOT_ONBOARDED,
    EXIT_REFUSED,
    EXIT_STORAGE,
    EXIT_USAGE,
    HubProtocolError,
    HubRefusedError,
    IatExpiredError,
    IatUsedError,
    NotOnboardedError,
    ReonboardingRequiredError,
)
from mers.http import try_may_have_reached_the_hub
from mers.tasks import TaskClient, TaskState
from mers.tokens import TOKEN_FILE
from signing.keys import KeyAlgorithm
from tests.board_helpers import record_fsyncs
from tests.conftest import CliResult, run_cli
from tests.device_helpers import DAY, PROFILES, Gateway, bundle_file, lock_board, make_gateway, rat_id
from tests.firmware_helpers import add_agent, new_task, trust, upload
from tests.hub_helpers import AGENTS, RunningHub, agent_record, running_hub
from tests.signing_helpers import make_image, signer_for


def mers(board: Path, *args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    return run_cli("mers", *args, env={"MERS_BOARD": str(board), **(env or {})})


@pytest.mark.parametrize("profile", PROFILES)
def test_onboarding_tokens_and_renewal_work_against_the_real_hub(
    hub: RunningHub, tmp_path: Path, profile: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", profile)
    with gateway.client() as client:
        result = client.onboard()
        assert result.outcome is OnboardOutcome.REGISTERED and result.client_id == gateway.agent_id
        assert agent_record(hub, gateway.agent_id)["boarding_status"] == "ONBOARDED"
        token = client.access_token()
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == gateway.agent_id
        assert client.access_token() == token, "a valid token is cached, not fetched again"
        # the token works on the hub's API
        assert client.data_source_configuration()["dataSources"] == []

        hub.clock.advance(1800)  # the token (30 min) is due: a new one, with the same credentials
        first_rat = client.credentials().current.rat
        refreshed = client.access_token()
        assert refreshed != token and client.credentials().current.rat == first_rat

        hub.clock.advance(6 * DAY)  # under 25 h left of 7 days: renewed through the RAT
        renewed = client.access_token()
        stored = client.credentials()
        assert stored.current.rat != first_rat and stored.previous is None
        assert stored.current.expires_at == pytest.approx(hub.clock() + 7 * DAY, abs=5)
        record = agent_record(hub, gateway.agent_id)
        assert record["rat_jti"] == rat_id(stored.current.rat)
        assert record["previous_rat_jti"] is None or profile == "RSA_3072"  # same key: hub keeps it
        assert client.access_token() == renewed


def test_onboarding_into_a_state_directory_not_yet_created_makes_it_survive_a_power_cut(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    state = gateway.board.state.directory
    shutil.rmtree(state)  # as on a gateway's first boot
    synced = record_fsyncs(monkeypatch)
    with gateway.client() as client:
        client.onboard()
    assert load_credentials(gateway.board.state) is not None
    assert state.parent.resolve() in synced, "the new directory's entry, not only the files in it"


def test_renewal_follows_a_shortened_credential_lifetime(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub", HubSettings(credential_lifetime=26 * 3600)) as short_hub:
        gateway = make_gateway(short_hub, tmp_path / "gw")
        with gateway.client() as client:
            client.onboard()
            before = client.credentials().current
            short_hub.clock.advance(3600 + 60)
            assert client.renew() is False, "under 25 h but over half the 26 h granted left: not due"
            short_hub.clock.advance(12 * 3600)
            client.access_token()
            after = client.credentials().current
            assert after.rat != before.rat and after.expires_at > before.expires_at


def test_a_lifetime_under_the_margins_renews_and_refreshes_at_half_of_it(tmp_path: Path) -> None:
    settings = HubSettings(credential_lifetime=24 * 3600, access_token_lifetime=100)
    with running_hub(tmp_path / "hub", settings) as short_hub:
        gateway = make_gateway(short_hub, tmp_path / "gw")
        with gateway.client() as client:
            client.onboard()
            token = client.access_token()
            rat = client.credentials().current.rat
            for _ in range(3):
                assert client.access_token() == token, "a 100 s token is cached for its first half"
            assert client.credentials().current.rat == rat, "24 h granted: not renewed at once"
            short_hub.clock.advance(51)
            assert client.access_token() != token, "under half of the token's 100 s left: a new one"
            assert client.credentials().current.rat == rat
            short_hub.clock.advance(12 * 3600)
            client.access_token()
            assert client.credentials().current.rat != rat, "under half of the 24 h left: renewed"


def test_credentials_expired_while_offline_are_renewed_through_the_rat(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        hub.clock.advance(30 * DAY)  # a month offline: credentials expired, the RAT lives a year
        client.access_token()
        assert client.credentials().current.expires_at > hub.clock() + 6 * DAY


@pytest.mark.parametrize("profile", PROFILES)
def test_cli_onboards_once_then_says_so_and_status_shows_no_secret(
    hub: RunningHub, tmp_path: Path, profile: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", profile)
    not_yet = mers(gateway.path, "datasources")
    assert not_yet.returncode == EXIT_NOT_ONBOARDED and "mers onboard" in not_yet.error_line

    first = mers(gateway.path, "onboard")
    assert first.returncode == 0, first.stderr
    assert f"onboarded as {gateway.agent_id} ({profile}" in first.stdout
    again = mers(gateway.path, "onboard")
    assert again.returncode == 0 and "already onboarded" in again.stdout and "nothing to do" in again.stdout

    data = mers(gateway.path, "datasources", "--json")
    assert data.returncode == 0, data.stderr
    assert json.loads(data.stdout)["dataSources"] == []

    result = mers(gateway.path, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "onboarded" and status["profile"] == profile
    assert status["client_id"] == gateway.agent_id and status["credentials_expire_at"]
    assert status["token_expires_at"], "datasources fetched and cached a token"
    state = gateway.board.state
    stored = load_credentials(state)
    assert stored is not None
    token = json.loads(state.read("access-token.json") or b"{}")["token"]
    board_config = json.loads(gateway.board.boarding_data().config)  # type: ignore[union-attr]
    secrets = [stored.current.rat, token, board_config["content"]["iat"]]
    secrets += [stored.current.client_secret] if stored.current.client_secret else []
    text = mers(gateway.path, "status").stdout
    for secret in secrets:
        assert secret not in result.stdout and secret not in text
    for name in (
        "credentials.json",
        "access-token.json",
        *(["agent-key.pem"] if profile == "RSA_3072" else []),
    ):
        assert stat.S_IMODE(os.stat(state.directory / name).st_mode) == 0o600, name


def test_board_is_found_through_the_option_and_a_missing_one_is_one_line(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    result = run_cli(
        "mers", "onboard", "--board", gateway.path, env={"MERS_BOARD": str(tmp_path / "nothing")}
    )
    assert result.returncode == 0, result.stderr
    missing = run_cli("mers", "status", "--board", tmp_path / "nothing.toml")
    assert missing.returncode == 4 and "cannot open the board" in missing.error_line


def test_offboarded_gateway_is_told_to_reonboard_and_recovers_with_an_imported_iat(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw", "RSA_3072")
    assert mers(gateway.path, "onboard").returncode == 0
    lock_board(gateway.board)  # as it left the factory: boarding data can no longer be written to it
    response = hub.admin("POST", f"{AGENTS}/agents/{gateway.agent_id}/boarding/offboard")
    assert response.status_code == 200, response.text

    refused = mers(gateway.path, "datasources")
    assert refused.returncode == EXIT_REFUSED
    assert (
        "re-onboarding is needed" in refused.error_line and "mers boarding import FILE" in refused.error_line
    )
    status = json.loads(mers(gateway.path, "status", "--json").stdout)
    assert "ReonboardingRequiredError" in status["last_error"]

    bundle = bundle_file(tmp_path / "usb.json", hub, gateway.agent_id)
    imported = mers(gateway.path, "boarding", "import", bundle)
    assert imported.returncode == 0, imported.stderr
    assert "in the state directory (board locked)" in imported.stdout and "onboarded as" in imported.stdout
    assert gateway.board.state.read(IMPORT_FILE) is not None
    assert mers(gateway.path, "datasources").returncode == 0
    assert mers(gateway.path, "onboard").stdout.startswith("already onboarded")
    status = json.loads(mers(gateway.path, "status", "--json").stdout)
    assert status["last_error"] is None, status  # overcome by the onboarding since: not the state now


def test_boarding_import_on_an_unlocked_board_writes_the_board_and_keeps_credentials_until_success(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        before = client.credentials()
    # the plain configuration form with --ca; the IAT registered with already: a no-op
    same = tmp_path / "same.json"
    same.write_bytes(gateway.board.boarding_data().config)  # type: ignore[union-attr]
    result = mers(gateway.path, "boarding", "import", same, "--ca", hub.ca)
    assert result.returncode == 0 and "already onboarded" in result.stdout
    hub.admin("POST", f"{AGENTS}/agents/{gateway.agent_id}/boarding/offboard")
    fresh = bundle_file(tmp_path / "fresh.json", hub, gateway.agent_id)
    stored_only = mers(gateway.path, "boarding", "import", fresh, "--no-onboard")
    assert stored_only.returncode == 0 and "on the board" in stored_only.stdout
    assert load_credentials(gateway.board.state) == before, "not replaced before a registration"
    assert (
        json.loads(mers(gateway.path, "status", "--json").stdout)["state"] == "onboarded-new-boarding-pending"
    )
    assert mers(gateway.path, "onboard").returncode == 0
    after = load_credentials(gateway.board.state)
    assert after is not None and after.current.rat != before.current.rat and after.iat_id != before.iat_id


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json", "is not JSON"),
        (b'{"boardingConfiguration": {"content": {}}, "ca": "x"}', "boarding data"),
        (b'{"content": {}}', "--ca"),
        (b"[1]", "not a JSON object"),
    ],
)
def test_a_bad_import_file_is_refused_and_changes_nothing(
    hub: RunningHub, tmp_path: Path, content: bytes, expected: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    before = gateway.board.boarding_data()
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    result = mers(gateway.path, "boarding", "import", bad)
    assert result.returncode == EXIT_USAGE and expected in result.error_line
    assert SimBoard.open(gateway.path).boarding_data() == before
    assert gateway.board.state.read(IMPORT_FILE) is None


def test_a_used_iat_is_reported_and_stores_nothing(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    clone = SimBoard.create(tmp_path / "clone", gateway.board.identity)
    clone.write_boarding_data(gateway.board.boarding_data())  # type: ignore[arg-type]
    result = mers(clone.directory, "onboard")
    assert result.returncode == EXIT_REFUSED and "IAT works once" in result.error_line
    assert load_credentials(clone.state) is None
    with Gateway(clone, gateway.agent_id, hub).client() as clone_client, pytest.raises(IatUsedError) as used:
        clone_client.onboard()
    assert not used.value.own_registration  # the clone never had an answer lost: another board used it


@pytest.mark.parametrize(
    ("response", "error", "reached"),
    [
        (None, NewConnectionError(None, "refused"), False),  # type: ignore[arg-type]
        (None, ConnectTimeoutError("connect timed out"), False),
        (None, SSLError("handshake"), False),
        (None, ProxyError("proxy refused", OSError("refused")), False),
        (None, ReadTimeoutError(None, "/", "read timed out"), True),  # type: ignore[arg-type]
        (None, ProtocolError("connection dropped"), True),
        (object(), None, True),  # an answer: a 5xx the policy retries
    ],
)
def test_a_failed_try_may_have_reached_the_hub_only_once_connected(
    response: object | None, error: Exception | None, reached: bool
) -> None:
    assert try_may_have_reached_the_hub(response, error) is reached


class CrashAfterTheHubsAnswer(Exception):
    """Stands for the device losing power between the hub's 201 and the credentials write."""


def test_a_registration_whose_answer_was_never_stored_is_explained_and_recovered_by_the_operator(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")

    def crash(*_args: object) -> None:
        raise CrashAfterTheHubsAnswer

    with monkeypatch.context() as patched:
        patched.setattr("mers.client.save_credentials", crash)
        with gateway.client() as client, pytest.raises(CrashAfterTheHubsAnswer):
            client.onboard()
    assert agent_record(hub, gateway.agent_id)["iat_used"]  # the hub registered the device
    refused = mers(gateway.path, "onboard")
    assert refused.returncode == EXIT_REFUSED
    assert "This device sent a registration with it at 20" in refused.error_line
    assert f"offboard agent {gateway.agent_id}" in refused.error_line
    assert load_credentials(gateway.board.state) is None
    # the operator's way out: a new boarding configuration, imported, and onboarding works
    hub.admin("POST", f"{AGENTS}/agents/{gateway.agent_id}/boarding/offboard")
    imported = mers(
        gateway.path, "boarding", "import", bundle_file(tmp_path / "new.json", hub, gateway.agent_id)
    )
    assert imported.returncode == 0, imported.stderr
    assert load_credentials(gateway.board.state) is not None
    assert gateway.board.state.read(REGISTRATION_SENT_FILE) is None


def test_a_registration_answer_lost_on_the_network_is_explained(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub registered the device, then failed before answering (a load balancer timing out): the
    transport sends the registration again, and the hub refuses the IAT as used."""
    gateway = make_gateway(hub, tmp_path / "gw")
    register = hub_onboarding.register

    def register_then_fail(*args: Any) -> Registration:
        register(*args)
        raise RuntimeError("the hub fails after registering, before answering")

    monkeypatch.setattr(hub_onboarding, "register", register_then_fail)
    with gateway.client() as client, pytest.raises(IatUsedError, match="a moment ago") as lost:
        client.onboard()
    assert lost.value.own_registration
    monkeypatch.undo()
    with gateway.client() as client, pytest.raises(IatUsedError, match="sent a registration with it at 20"):
        client.onboard()  # told again, with the time of the lost registration


def test_an_expired_iat_asks_the_operator_for_a_new_boarding_configuration(
    hub: RunningHub, tmp_path: Path
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    hub.clock.advance(8 * DAY)
    with gateway.client() as client, pytest.raises(IatExpiredError, match="new boarding configuration"):
        client.onboard()
    with gateway.client() as client, pytest.raises(NotOnboardedError):
        client.access_token()


def test_tasks_are_listed_fetched_and_reported_for_this_agent_only(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer], payload=os.urandom(4000))
    release = upload(hub, image).json()
    mine = new_task(hub, gateway.agent_id, release["id"])
    theirs = new_task(hub, add_agent(hub), release["id"])
    with gateway.client() as client:
        client.onboard()
        tasks = TaskClient(client)
        assert [task.id for task in tasks.open_tasks()] == [mine["id"]]
        task = tasks.task(mine["id"])
        assert task.state is TaskState.CREATED and task.artifacts[0].uri.startswith(hub.url)
        assert task.artifacts[0].size == image.stat().st_size
        reported = tasks.report(mine["id"], state=TaskState.DOWNLOADING, progress=0.5, message="halfway")
        assert (reported.state, reported.progress, reported.message) == (
            TaskState.DOWNLOADING,
            0.5,
            "halfway",
        )
        with pytest.raises(HubRefusedError, match="no installation task") as refused:
            tasks.task(theirs["id"])
        assert refused.value.status == 404
        with pytest.raises(HubRefusedError) as illegal:
            tasks.report(mine["id"], state=TaskState.ACTIVATED)
        assert illegal.value.status == 409
    listing = mers(gateway.path, "tasks", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    listed = json.loads(listing.stdout)
    assert [(t["id"], t["state"], t["progress"]) for t in listed] == [(mine["id"], "DOWNLOADING", 0.5)]
    assert "sig=" not in listing.stdout, "signed URLs are credentials"
    shown = mers(gateway.path, "tasks", "report", mine["id"], "--state", "DOWNLOADED", "--progress", "1")
    assert shown.returncode == 0 and "DOWNLOADED" in shown.stdout


def test_an_empty_task_list_says_so(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    listing = mers(gateway.path, "tasks", "list")
    assert (listing.returncode, listing.stdout) == (0, "no open installation task\n"), listing.stderr
    listing = mers(gateway.path, "tasks", "list", "--json")
    assert (listing.returncode, json.loads(listing.stdout)) == (0, [])


def test_reonboarding_error_keeps_the_stored_credentials(hub: RunningHub, tmp_path: Path) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        hub.admin("POST", f"{AGENTS}/agents/{gateway.agent_id}/boarding/offboard")
        before = (gateway.board.state.directory / "credentials.json").read_bytes()
        with pytest.raises(ReonboardingRequiredError):
            client.access_token()
        assert (gateway.board.state.directory / "credentials.json").read_bytes() == before


# --- answers the device must not store -------------------------------------------------------------------


def hub_answers(monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    """Have the real hub's register and renew answers carry `changes` (a value, or a function of the
    answer's value): a broken or hostile hub, at the wire."""
    to_json = Registration.to_json

    def changed(registration: Registration) -> dict[str, Any]:
        body = to_json(registration)
        for name, value in changes.items():
            body[name] = value(body[name]) if callable(value) else value
        return body

    monkeypatch.setattr(Registration, "to_json", changed)


def assert_answers_refused(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match: str, **changes: Any
) -> None:
    """A registration and a renewal whose answers carry `changes` are refused as not the protocol, and
    store nothing: no credentials, then the credentials held before the renewal, byte for byte."""
    registering, renewing = make_gateway(hub, tmp_path / "reg"), make_gateway(hub, tmp_path / "ren")
    with renewing.client() as client:
        client.onboard()
    held = (renewing.board.state.directory / "credentials.json").read_bytes()
    hub_answers(monkeypatch, **changes)
    with registering.client() as client, pytest.raises(HubProtocolError, match=match):
        client.onboard()
    assert load_credentials(registering.board.state) is None
    with renewing.client() as client, pytest.raises(HubProtocolError, match=match):
        client.renew(force=True)
    assert (renewing.board.state.directory / "credentials.json").read_bytes() == held


@pytest.mark.parametrize(
    "uri",
    [
        lambda uri: uri.replace("https://127.0.0.1:", "https://localhost:"),
        lambda uri: uri.replace("https://127.0.0.1:", "https://127.0.0.1:1"),
        lambda uri: uri.replace("https://", "https://collector.example/?"),
        "https://collector.example/api/agentmanagement/v3/register/x",
    ],
)
def test_a_registration_uri_off_the_hubs_origin_is_refused_before_the_rat_goes_there(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: Any
) -> None:
    assert_answers_refused(hub, tmp_path, monkeypatch, "origin", registration_client_uri=uri)


UNSENDABLE = ["\u20ac", "\r\nX-Injected: 1", " and more", "\x00"]


@pytest.mark.parametrize("suffix", UNSENDABLE)
def test_a_rat_the_transport_cannot_send_is_refused_before_it_is_stored(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    assert_answers_refused(
        hub, tmp_path, monkeypatch, "b64token", registration_access_token=lambda rat: rat + suffix
    )


@pytest.mark.parametrize("suffix", UNSENDABLE)
def test_an_access_token_the_transport_cannot_send_is_refused_before_it_is_cached(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
    to_json = oauth.AccessTokenGrant.to_json

    def unsendable(grant: oauth.AccessTokenGrant) -> dict[str, Any]:
        return {**to_json(grant), "access_token": grant.issued.token + suffix}

    monkeypatch.setattr(oauth.AccessTokenGrant, "to_json", unsendable)
    with gateway.client() as client, pytest.raises(HubProtocolError, match="b64token") as refused:
        client.access_token()
    assert suffix.strip() not in str(refused.value)
    assert gateway.board.state.read(TOKEN_FILE) is None


def test_tokens_stored_before_they_were_checked_never_go_into_a_header(
    hub: RunningHub, tmp_path: Path
) -> None:
    """A cached access token that cannot be sent is replaced; a stored RAT that cannot be sent is a
    damaged state, reported without quoting it (it is a credential), rather than an untyped traceback or
    "cannot reach the hub" forever."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        good = client.access_token()
    cache = json.loads(gateway.board.state.read(TOKEN_FILE) or b"")
    gateway.board.state.write(TOKEN_FILE, json.dumps({**cache, "token": good + "\r\nX: 1"}).encode())
    with gateway.client() as client:
        assert client.access_token().count(".") == 2
    path = gateway.board.state.directory / "credentials.json"
    stored = json.loads(path.read_bytes())
    stored["current"]["rat"] += "\u20ac"
    path.write_text(json.dumps(stored))
    renew = mers(gateway.path, "renew", "--force")
    assert renew.returncode == EXIT_STORAGE, renew.stderr
    assert "b64token" in renew.error_line and stored["current"]["rat"][:40] not in renew.stderr


@pytest.mark.parametrize(
    "expires",
    [lambda expires: expires * 1000, lambda _: 10**400, lambda _: 1, lambda expires: expires + 400 * DAY],
)
def test_a_credential_expiry_that_is_not_a_time_in_the_coming_year_is_refused_before_it_is_stored(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expires: Any
) -> None:
    assert_answers_refused(
        hub, tmp_path, monkeypatch, "client_secret_expires_at", client_secret_expires_at=expires
    )


@pytest.mark.parametrize("stored", [1796635660000.0, float("nan"), float("inf")])
def test_status_shows_an_unusable_stored_expiry_in_its_place(
    hub: RunningHub, tmp_path: Path, stored: float
) -> None:
    """Stored by a client that did not check the hub's answer (milliseconds, NaN, Infinity): `mers
    status` shows the value as unusable, with everything else, rather than a traceback."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        client.access_token()
    for name, field in (("credentials.json", "current"), (TOKEN_FILE, None)):
        document = json.loads(gateway.board.state.read(name) or b"")
        (document[field] if field else document)["expiresAt"] = stored
        gateway.board.state.write(name, json.dumps(document).encode())
    shown = mers(gateway.path, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "onboarded" and status["client_id"] == gateway.agent_id
    assert status["credentials_expire_at"] == f"unusable: {stored!r} is not a time in epoch seconds"
    assert status["token_expires_at"] == status["credentials_expire_at"]
    text = mers(gateway.path, "status")
    assert text.returncode == 0 and "credentials expire at: unusable" in text.stdout, text.stderr


@pytest.mark.parametrize("stored", [1796635660000.0, float("nan"), float("inf")])
def test_an_unusable_stored_expiry_makes_the_renewal_due(
    hub: RunningHub, tmp_path: Path, stored: float
) -> None:
    """No comparison with NaN holds, and milliseconds are centuries away: either way the set was never
    renewed again, until it expired for real and the gateway had to be onboarded anew. Renewing now
    replaces it with a set whose expiry is checked."""
    gateway = make_gateway(hub, tmp_path / "gw")
    with gateway.client() as client:
        client.onboard()
        document = json.loads(gateway.board.state.read("credentials.json") or b"")
        document["current"]["expiresAt"] = stored
        gateway.board.state.write("credentials.json", json.dumps(document).encode())
        assert client.renew() is True
        renewed, now = client.credentials().current.expires_at, client.clock.now()
    assert now < renewed < now + 8 * DAY

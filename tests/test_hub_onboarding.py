"""Registration and renewal against a real hub over TLS (docs/design.md §6): the whole life of an agent of
each profile, and every refusal leaving the agent exactly as it was."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub.models import Agent
from tests.hub_helpers import (
    AGENTS,
    OnboardedAgent,
    RunningHub,
    agent_record,
    assert_hub_error,
    at_once,
    b64url,
    boarding_configuration,
    create_agent,
    onboard_agent,
    register,
    rsa_jwk,
    writes_held,
)

DAY = 24 * 3600


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    """Agent keys, made once: RSA-3072 generation is slow."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=3072) for _ in range(2)]


def new_agent_iat(hub: RunningHub, name: str, profile: str = "SHARED_SECRET") -> tuple[str, str]:
    agent = create_agent(hub, name, profile)
    return agent["id"], boarding_configuration(hub, agent["id"])["content"]["iat"]


def status_of(hub: RunningHub, agent_id: str) -> str:
    status: str = hub.admin("GET", f"{AGENTS}/agents/{agent_id}/boarding/status").json()["status"]
    return status


def renew_raw(hub: RunningHub, agent: OnboardedAgent, rat: str, body: dict[str, Any]) -> requests.Response:
    return hub.request("PUT", agent.registration_client_uri.removeprefix(hub.url), token=rat, json=body)


def data_source_read(hub: RunningHub, agent_id: str, access_token: str) -> requests.Response:
    return hub.request("GET", f"{AGENTS}/agents/{agent_id}/dataSourceConfiguration", token=access_token)


# --- the whole life ----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["SHARED_SECRET", "RSA_3072"])
def test_an_agent_registers_renews_is_offboarded_and_registers_again(
    hub_on_each_database: RunningHub, profile: str, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1", profile, private_key=rsa_keys[0] if profile == "RSA_3072" else None)
    assert status_of(hub, agent.id) == "ONBOARDED"
    first_token = agent.access_token()
    assert data_source_read(hub, agent.id, first_token).status_code == 200

    hub.clock.advance(6 * DAY)
    old_secret = agent.client_secret
    renewed = agent.renew(rsa_keys[1] if profile == "RSA_3072" else None)
    assert renewed.status_code == 200, renewed.text
    if profile == "SHARED_SECRET":
        assert agent.client_secret != old_secret
    assert renewed.json()["client_secret_expires_at"] == pytest.approx(hub.clock() + 7 * DAY, abs=5)
    second_token = agent.access_token()
    assert data_source_read(hub, agent.id, second_token).status_code == 200

    offboarded = hub.admin("POST", f"{AGENTS}/agents/{agent.id}/boarding/offboard")
    assert offboarded.json()["status"] == "NOT_ONBOARDED"
    assert_hub_error(data_source_read(hub, agent.id, second_token), 401)
    assert_hub_error(agent.request_token(), 401, "invalid_client")
    assert_hub_error(agent.renew(), 401, "token_validation_failed")

    new_iat = boarding_configuration(hub, agent.id)["content"]["iat"]
    again = register(hub, new_iat, profile, rsa_keys[0] if profile == "RSA_3072" else None)
    assert again.status_code == 201, again.text
    agent.adopt(again.json(), rsa_keys[0] if profile == "RSA_3072" else None)
    assert data_source_read(hub, agent.id, agent.access_token()).status_code == 200
    assert_hub_error(data_source_read(hub, agent.id, first_token), 401)


def test_a_registration_answer_has_the_platform_fields_for_each_profile(
    hub: RunningHub, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    response = register(hub, iat, "SHARED_SECRET")
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert set(body) == {
        "client_id",
        "client_secret",
        "client_secret_expires_at",
        "registration_access_token",
        "registration_client_uri",
        "grant_types",
        "token_endpoint_auth_method",
    }
    assert body["client_id"] == agent_id
    assert body["registration_client_uri"] == f"{hub.url}{AGENTS}/register/{agent_id}"
    assert body["token_endpoint_auth_method"] == "client_secret_jwt"
    assert body["grant_types"] == ["client_credentials"]
    assert isinstance(body["client_secret_expires_at"], int)

    rsa_id, rsa_iat = new_agent_iat(hub, "gw-2", "RSA_3072")
    rsa_body = register(hub, rsa_iat, "RSA_3072", rsa_keys[0]).json()
    assert "client_secret" not in rsa_body
    assert rsa_body["token_endpoint_auth_method"] == "private_key_jwt"
    assert rsa_body["jwks"] == {"keys": [rsa_jwk(rsa_keys[0].public_key())]}
    assert isinstance(rsa_body["client_secret_expires_at"], int)
    assert rsa_body["registration_client_uri"].endswith(f"/register/{rsa_id}")


# --- IAT refusals ------------------------------------------------------------------------------------


def test_a_reused_iat_is_rejected_and_changes_nothing(hub: RunningHub) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    assert register(hub, iat, "SHARED_SECRET").status_code == 201
    before = agent_record(hub, agent_id)
    assert_hub_error(register(hub, iat, "SHARED_SECRET"), 401, "token_validation_failed")
    assert agent_record(hub, agent_id) == before


def test_an_expired_iat_is_rejected_and_changes_nothing(hub: RunningHub) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    before = agent_record(hub, agent_id)
    hub.clock.advance(7 * DAY + 1)
    assert_hub_error(register(hub, iat, "SHARED_SECRET"), 401, "token_validation_failed")
    assert agent_record(hub, agent_id) == before
    assert status_of(hub, agent_id) == "ONBOARDING"


def test_an_iat_signed_by_another_key_is_rejected(hub: RunningHub) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(iat, options={"verify_signature": False})
    forged = jwt.encode(claims, forger, algorithm="RS256", headers=jwt.get_unverified_header(iat))
    before = agent_record(hub, agent_id)
    assert_hub_error(register(hub, forged, "SHARED_SECRET"), 401, "token_validation_failed")
    unsigned = jwt.encode(claims, "", algorithm="none")
    assert_hub_error(register(hub, unsigned, "SHARED_SECRET"), 401, "token_validation_failed")
    assert agent_record(hub, agent_id) == before


def test_tokens_of_other_kinds_do_not_register(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    _, iat = new_agent_iat(hub, "gw-2")
    assert_hub_error(register(hub, agent.rat, "SHARED_SECRET"), 401, "token_validation_failed")
    assert_hub_error(register(hub, agent.access_token(), "SHARED_SECRET"), 401, "token_validation_failed")
    assert_hub_error(hub.request("POST", f"{AGENTS}/register", json={}), 401)
    # and an IAT is no RAT
    assert_hub_error(renew_raw(hub, agent, iat, {"client_id": agent.id}), 401, "token_validation_failed")


def test_concurrent_registrations_with_one_iat_make_one_onboarding(hub_on_each_database: RunningHub) -> None:
    hub = hub_on_each_database
    agent_id, iat = new_agent_iat(hub, "gw-1")

    def attempt() -> requests.Response:
        return requests.post(
            f"{hub.url}{AGENTS}/register",
            json={},
            headers={"Authorization": f"Bearer {iat}"},
            verify=str(hub.ca),
            timeout=30,
        )

    statuses = at_once([attempt] * 4)
    assert statuses.count(201) == 1, statuses
    assert all(status in (201, 401, 429) for status in statuses), statuses
    assert status_of(hub, agent_id) == "ONBOARDED"


def test_a_registration_in_progress_gets_429_until_its_claim_goes_stale(hub: RunningHub) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    with hub.state.database.transaction() as session:  # a client that crashed mid-registration
        agent = session.get(Agent, agent_id)
        assert agent is not None
        agent.registering_since = hub.clock()
    before = agent_record(hub, agent_id)
    assert_hub_error(register(hub, iat, "SHARED_SECRET"), 429, "too_many_requests")
    assert agent_record(hub, agent_id) == before
    hub.clock.advance(hub.state.settings.registration_timeout + 1)
    assert register(hub, iat, "SHARED_SECRET").status_code == 201


# --- bodies ------------------------------------------------------------------------------------------


def test_real_client_jwk_encodings_are_accepted(hub: RunningHub, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    _, iat = new_agent_iat(hub, "gw-1", "RSA_3072")
    jwk = rsa_jwk(rsa_keys[0].public_key(), leading_zero=True)
    response = hub.request("POST", f"{AGENTS}/register", token=iat, json={"jwks": {"keys": [jwk]}})
    assert response.status_code == 201, response.text
    assert response.json()["jwks"]["keys"][0]["n"] == rsa_jwk(rsa_keys[0].public_key())["n"]

    _, padded_iat = new_agent_iat(hub, "gw-2", "RSA_3072")
    numbers = rsa_keys[1].public_key().public_numbers()
    padded = {
        "kty": "RSA",
        "kid": "k",
        "n": b64url(numbers.n.to_bytes(384, "big")) + "==",
        "e": "AQAB",
        "alg": "RS256",
        "use": "sig",
    }
    response = hub.request("POST", f"{AGENTS}/register", token=padded_iat, json={"jwks": {"keys": [padded]}})
    assert response.status_code == 201, response.text


def _small_key_jwk() -> dict[str, str]:
    return rsa_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())


def _bad_bodies(key: rsa.RSAPrivateKey) -> list[Any]:
    good = rsa_jwk(key.public_key())
    return [
        {},
        {"jwks": {"keys": []}},
        {"jwks": {"keys": [good, good]}},
        {"jwks": {"keys": [good | {"kty": "EC"}]}},
        {"jwks": {"keys": [_small_key_jwk()]}},
        {"jwks": {"keys": [good | {"n": "not base64!"}]}},
        {"jwks": {"keys": [good | {"e": "AAI"}]}},  # e = 2
        {"jwks": {"keys": [{"kty": "RSA"}]}},
        {"jwks": "keys"},
        [1, 2],
    ]


def test_a_bad_registration_body_is_refused_and_leaves_the_iat_usable(
    hub: RunningHub, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1", "RSA_3072")
    before = agent_record(hub, agent_id)
    for body in _bad_bodies(rsa_keys[0]):
        response = hub.request("POST", f"{AGENTS}/register", token=iat, json=body)
        assert_hub_error(response, 400, "invalid_request")
    malformed = hub.request(
        "POST",
        f"{AGENTS}/register",
        token=iat,
        data=b'{"jwks": ',
        headers={"Content-Type": "application/json"},
    )
    assert_hub_error(malformed, 400, "invalid_request")
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    ec_jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(ec_key.x.to_bytes(32, "big")),
        "n": "AQAB",
        "e": "AQAB",
    }
    assert_hub_error(
        hub.request("POST", f"{AGENTS}/register", token=iat, json={"jwks": {"keys": [ec_jwk]}}), 400
    )
    assert agent_record(hub, agent_id) == before
    assert register(hub, iat, "RSA_3072", rsa_keys[0]).status_code == 201


#: bodies no registration or renewal accepts, each as `requests` keyword arguments
MALFORMED_BODIES: dict[str, dict[str, Any]] = {
    "broken-json": {"data": b'{"jwks": ', "headers": {"Content-Type": "application/json"}},
    "wrong-shape": {"json": {"jwks": "keys", "client_id": 5}},
    "not-an-object": {"json": [1, 2]},
    "not-json": {"data": b"jwks=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_a_registration_is_authenticated_before_its_body_is_judged(
    hub: RunningHub, body: dict[str, Any]
) -> None:
    """A caller without a valid IAT gets the 401 it would get with a good body: it learns nothing of what
    a body must be. With the IAT, the same body is a 400, and the IAT stays usable."""
    agent_id, iat = new_agent_iat(hub, "gw-1", "RSA_3072")
    used_id, used_iat = new_agent_iat(hub, "gw-2")
    assert register(hub, used_iat, "SHARED_SECRET").status_code == 201
    before = agent_record(hub, agent_id)
    path = f"{AGENTS}/register"
    assert_hub_error(hub.request("POST", path, **body), 401, "unauthorized")
    assert_hub_error(hub.request("POST", path, token="not.a.jwt", **body), 401, "token_validation_failed")
    assert_hub_error(hub.request("POST", path, token=used_iat, **body), 401, "token_validation_failed")
    assert_hub_error(hub.request("POST", path, token=iat, **body), 400, "invalid_request")
    assert agent_record(hub, agent_id) == before
    assert status_of(hub, used_id) == "ONBOARDED"


@pytest.mark.parametrize(
    "encoded",
    [
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        "{}".encode("utf-16"),
        b'{"client_name": "\\ud800"}',  # a lone surrogate escape, in a field the hub ignores
    ],
    ids=["utf-8-bom", "utf-16", "lone-surrogate"],
)
def test_a_registration_body_reads_as_fastapi_reads_json(hub: RunningHub, encoded: bytes) -> None:
    """The body is read by the route, after the IAT is checked: it takes what FastAPI's own parsing took."""
    _, iat = new_agent_iat(hub, "gw-1")
    headers = {"Content-Type": "application/json"}
    answer = hub.request("POST", f"{AGENTS}/register", token=iat, data=encoded, headers=headers)
    assert answer.status_code == 201, answer.text


RENEWAL_BODIES = MALFORMED_BODIES | {
    "no-client-id": {"json": {}},
    "another-client": {"json": {"client_id": "someone-else"}},
}


@pytest.mark.parametrize("body", RENEWAL_BODIES.values(), ids=RENEWAL_BODIES.keys())
def test_a_renewal_is_authenticated_before_its_body_is_judged(hub: RunningHub, body: dict[str, Any]) -> None:
    """Without a RAT, with a forged one or with one whose successor was used, a bad body is the 401 a good
    one would be; with the current RAT, a 400."""
    agent = onboard_agent(hub, "gw-1")
    superseded = agent.rat
    assert agent.renew().status_code == 200
    assert agent.renew().status_code == 200  # the successor of `superseded` is used
    before = agent_record(hub, agent.id)
    path = agent.registration_client_uri.removeprefix(hub.url)
    assert_hub_error(hub.request("PUT", path, **body), 401, "unauthorized")
    assert_hub_error(hub.request("PUT", path, token="not.a.jwt", **body), 401, "token_validation_failed")
    assert_hub_error(hub.request("PUT", path, token=superseded, **body), 401, "token_validation_failed")
    assert_hub_error(hub.request("PUT", path, token=agent.rat, **body), 400, "invalid_request")
    assert agent_record(hub, agent.id) == before
    assert agent.renew().status_code == 200


def test_a_shared_secret_agent_may_not_register_a_key(
    hub: RunningHub, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    agent_id, iat = new_agent_iat(hub, "gw-1")
    before = agent_record(hub, agent_id)
    body = {"jwks": {"keys": [rsa_jwk(rsa_keys[0].public_key())]}}
    assert_hub_error(hub.request("POST", f"{AGENTS}/register", token=iat, json=body), 400, "invalid_request")
    assert agent_record(hub, agent_id) == before
    assert (
        hub.request("POST", f"{AGENTS}/register", token=iat, json={"client_name": "ignored"}).status_code
        == 201
    )


# --- renewal -----------------------------------------------------------------------------------------


def test_a_renewal_answer_is_a_full_new_set_with_200(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    old = (agent.rat, agent.client_secret)
    response = agent.renew()
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["registration_client_uri"] == f"{hub.url}{AGENTS}/register/{agent.id}"
    assert body["registration_access_token"] != old[0] and body["client_secret"] != old[1]


def test_the_previous_rat_still_renews_while_the_new_set_is_unused(hub_on_each_database: RunningHub) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    first_rat, first_secret = agent.rat, agent.client_secret
    lost = renew_raw(hub, agent, first_rat, {"client_id": agent.id})  # the answer never reaches the agent
    assert lost.status_code == 200
    # meanwhile the agent keeps working with what it holds
    assert agent.request_token().status_code == 200
    assert agent.client_secret == first_secret
    recovered = agent.renew()
    assert recovered.status_code == 200, recovered.text
    assert agent.access_token()
    # the set whose answer was lost was replaced unseen
    stale = lost.json()
    assert_hub_error(renew_raw(hub, agent, stale["registration_access_token"], {"client_id": agent.id}), 401)


def test_concurrent_renewals_with_the_previous_rat_leave_no_caller_with_a_dead_set(
    hub_on_each_database: RunningHub,
) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    first_rat = agent.rat
    assert renew_raw(hub, agent, first_rat, {"client_id": agent.id}).status_code == 200  # answer lost
    answers: list[requests.Response] = []

    def renew_with_the_previous_rat() -> requests.Response:
        answer = renew_raw(hub, agent, first_rat, {"client_id": agent.id})
        answers.append(answer)
        return answer

    with ThreadPoolExecutor(1) as background, writes_held(hub, agent.id) as wait_for:
        statuses = background.submit(at_once, [renew_with_the_previous_rat] * 2)
        wait_for("UPDATE agents", 2)  # both read the agent before either could write
    assert sorted(statuses.result()) == [200, 409]
    refused = next(answer for answer in answers if answer.status_code == 409)
    assert_hub_error(refused, 409, "conflict")
    winner = next(answer for answer in answers if answer.status_code == 200)
    agent.adopt(winner.json())
    assert agent.request_token().status_code == 200


def test_a_renewal_that_lost_the_race_to_one_with_the_same_rat_is_a_conflict_and_may_renew_again(
    hub_on_each_database: RunningHub,
) -> None:
    """Two renewals with the current RAT (a gateway's own try and the transport's resend of it): one
    wins; the other is told 409, not 401 (which means "onboard again"), and its RAT, now the previous
    one, renews again."""
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    rat = agent.rat

    def renew_with_the_current_rat() -> requests.Response:
        return renew_raw(hub, agent, rat, {"client_id": agent.id})

    with ThreadPoolExecutor(1) as background, writes_held(hub, agent.id) as wait_for:
        statuses = background.submit(at_once, [renew_with_the_current_rat] * 2)
        wait_for("UPDATE agents", 2)  # both checked the RAT before either could write
    assert sorted(statuses.result()) == [200, 409]
    again = renew_with_the_current_rat()
    assert again.status_code == 200, again.text
    agent.adopt(again.json())
    assert agent.request_token().status_code == 200


def test_a_rat_is_rejected_once_its_successor_was_used(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    first_rat = agent.rat
    assert agent.renew().status_code == 200
    assert agent.renew().status_code == 200  # the successor RAT is used
    before = agent_record(hub, agent.id)
    assert_hub_error(
        renew_raw(hub, agent, first_rat, {"client_id": agent.id}), 401, "token_validation_failed"
    )
    assert agent_record(hub, agent.id) == before


def test_a_rat_is_rejected_once_the_new_credentials_were_used(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    first_rat, first_secret = agent.rat, agent.client_secret
    assert agent.renew().status_code == 200
    assert agent.access_token()  # the new secret is used
    assert_hub_error(
        renew_raw(hub, agent, first_rat, {"client_id": agent.id}), 401, "token_validation_failed"
    )
    old_credentials = OnboardedAgent(
        hub, agent.id, "SHARED_SECRET", first_rat, "", client_secret=first_secret
    )
    assert_hub_error(old_credentials.request_token(), 401, "invalid_client")


def test_renewing_with_the_same_rsa_key_keeps_the_previous_rat_usable(
    hub: RunningHub, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    agent = onboard_agent(hub, "gw-1", "RSA_3072", private_key=rsa_keys[0])
    first_rat = agent.rat
    lost = renew_raw(
        hub, agent, first_rat, {"client_id": agent.id, "jwks": {"keys": [rsa_jwk(rsa_keys[0].public_key())]}}
    )
    assert lost.status_code == 200
    # a token with the (unchanged) key proves nothing about the lost answer
    assert agent.access_token()
    assert agent.renew().status_code == 200


def test_a_renewal_for_another_client_or_with_a_wrong_body_is_refused(hub: RunningHub) -> None:
    first = onboard_agent(hub, "gw-1")
    second = onboard_agent(hub, "gw-2")
    before = agent_record(hub, first.id)
    # a RAT only renews its own agent
    assert_hub_error(
        renew_raw(hub, first, second.rat, {"client_id": first.id}), 401, "token_validation_failed"
    )
    assert_hub_error(renew_raw(hub, first, first.rat, {"client_id": second.id}), 400, "invalid_request")
    assert_hub_error(renew_raw(hub, first, first.rat, {}), 400, "invalid_request")
    assert_hub_error(hub.request("PUT", f"{AGENTS}/register/{first.id}", json={"client_id": first.id}), 401)
    assert agent_record(hub, first.id) == before


def test_expired_credentials_give_no_token_but_the_rat_renews_them(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    hub.clock.advance(7 * DAY + 1)
    before = agent_record(hub, agent.id)
    assert_hub_error(agent.request_token(), 401, "invalid_client")
    assert agent_record(hub, agent.id) == before
    assert agent.renew().status_code == 200
    assert agent.access_token()


def test_a_renewal_path_no_rat_names_is_the_401_whatever_its_shape(hub: RunningHub) -> None:
    agent = onboard_agent(hub, "gw-1")
    path = f"{AGENTS}/register/{'x' * 65}"
    body = {"client_id": "x" * 65}
    assert_hub_error(hub.request("PUT", path, json=body), 401, "unauthorized")
    assert_hub_error(hub.request("PUT", path, token=agent.rat, json=body), 401, "token_validation_failed")

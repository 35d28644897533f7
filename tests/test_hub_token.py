"""The OAuth token endpoint and the token key, against a real hub over TLS: what real agent clients send is
accepted, every forged, stale or malformed assertion is refused with a 4xx JSON error and changes
nothing. Plus property tests of the form parser."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.assertions import DEVICE_ASSERTION_LIFETIME
from hub.errors import HubSetupError, InvalidRequestError
from hub.home import HubSettings
from hub.models import SpentAssertion
from hub.oauth_form import MAX_FIELDS, parse_form
from mers import tokens as device_tokens
from tests.device_helpers import make_gateway
from tests.hub_helpers import (
    AGENTS,
    JWT_BEARER,
    OnboardedAgent,
    RunningHub,
    agent_record,
    assert_hub_error,
    at_once,
    client_assertion,
    onboard_agent,
    running_hub,
    token_form,
)

TOKEN = f"{AGENTS}/oauth/token"
ACCESS_AUDIENCE = "urn:mers:hub:access"


@pytest.fixture(scope="module")
def agent_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture
def secret_agent(hub: RunningHub) -> OnboardedAgent:
    return onboard_agent(hub, "gw-secret")


@pytest.fixture
def rsa_agent(hub: RunningHub, agent_key: rsa.RSAPrivateKey) -> OnboardedAgent:
    return onboard_agent(hub, "gw-rsa", "RSA_3072", private_key=agent_key)


def post_assertion(hub: RunningHub, assertion: str) -> requests.Response:
    return hub.request("POST", TOKEN, data=token_form(assertion))


def hand_made_jwt(header: dict[str, Any], claims: dict[str, Any], sign: Any, *, pad: bool = False) -> str:
    """A JWT built byte by byte, for what PyJWT will not produce: padded segments, forged algorithms."""

    def encode(data: bytes) -> str:
        text = base64.urlsafe_b64encode(data).decode("ascii")
        return text if pad else text.rstrip("=")

    signing_input = f"{encode(json.dumps(header).encode())}.{encode(json.dumps(claims).encode())}"
    return f"{signing_input}.{encode(sign(signing_input.encode('ascii')))}"


def standard_claims(hub: RunningHub, client_id: str, **overrides: Any) -> dict[str, Any]:
    token = client_assertion(client_id, "x" * 32, hub.clock(), **overrides)
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def hub_public_key(hub: RunningHub) -> rsa.RSAPublicKey:
    """The access-token key from `token_key`, whose PEM comes without line breaks (as the platform's)."""
    value = hub.request("GET", f"{AGENTS}/oauth/token_key").json()["value"]
    body = value.removeprefix("-----BEGIN PUBLIC KEY-----").removesuffix("-----END PUBLIC KEY-----")
    key = serialization.load_der_public_key(base64.b64decode(body))
    assert isinstance(key, rsa.RSAPublicKey)
    return key


# --- what real clients send --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["SHARED_SECRET", "RSA_3072"])
def test_an_onboarded_agent_gets_an_access_token_with_tenant_scopes_and_generation(
    hub: RunningHub, profile: str, agent_key: rsa.RSAPrivateKey
) -> None:
    agent = onboard_agent(hub, "gw-1", profile, private_key=agent_key if profile == "RSA_3072" else None)
    response = agent.request_token()
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert abs(int(response.headers["Server-Time"]) - hub.clock()) < 5
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "jti", "scope"}
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 1800)
    assert body["scope"] == "mdsp:core:Agent.Default mdsp:core:FirmwareDeployment.Agent"
    claims = jwt.decode(
        body["access_token"],
        hub_public_key(hub),
        algorithms=["RS256"],
        audience=ACCESS_AUDIENCE,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert (claims["sub"], claims["ten"], claims["cgen"], claims["jti"]) == (agent.id, "mers", 0, body["jti"])
    assert claims["scope"] == ["mdsp:core:Agent.Default", "mdsp:core:FirmwareDeployment.Agent"]
    assert claims["exp"] - claims["iat"] == 1800


def test_the_token_key_is_served_in_the_platform_shape(hub: RunningHub) -> None:
    key = hub.request("GET", f"{AGENTS}/oauth/token_key").json()
    assert set(key) == {"kid", "alg", "value", "kty", "use", "n", "e"}
    assert (key["alg"], key["kty"], key["use"]) == ("SHA256withRSA", "RSA", "sig")
    assert "\n" not in key["value"] and key["value"].startswith("-----BEGIN PUBLIC KEY-----")
    numbers = hub_public_key(hub).public_numbers()
    assert int.from_bytes(base64.urlsafe_b64decode(key["n"] + "=="), "big") == numbers.n
    assert hub.request("GET", f"{AGENTS}/oauth/token_keys").json() == {"keys": [key]}


def test_rs384_assertions_are_accepted(hub: RunningHub, rsa_agent: OnboardedAgent) -> None:
    assert rsa_agent.request_token(algorithm="RS384").status_code == 200


@pytest.mark.parametrize("audience", ["southgate", ["southgate"], ["elsewhere", "southgate"]])
def test_aud_may_be_a_string_or_an_array_containing_southgate(
    hub: RunningHub, secret_agent: OnboardedAgent, audience: Any
) -> None:
    assert secret_agent.request_token(aud=audience).status_code == 200


def test_padded_base64url_segments_are_accepted(
    hub: RunningHub, secret_agent: OnboardedAgent, rsa_agent: OnboardedAgent, agent_key: rsa.RSAPrivateKey
) -> None:
    secret = (secret_agent.client_secret or "").encode()
    hs256 = hand_made_jwt(
        {"alg": "HS256", "typ": "JWT"},
        standard_claims(hub, secret_agent.id),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
        pad=True,
    )
    assert "=" in hs256
    assert post_assertion(hub, hs256).status_code == 200
    rs384 = hand_made_jwt(
        {"alg": "RS384"},
        standard_claims(hub, rsa_agent.id, aud="southgate"),
        lambda data: agent_key.sign(data, padding.PKCS1v15(), hashes.SHA384()),
        pad=True,
    )
    assert "=" in rs384
    assert post_assertion(hub, rs384).status_code == 200


def test_raw_and_percent_encoded_form_bodies_are_both_accepted(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    raw = (
        f"grant_type=client_credentials&client_assertion_type={JWT_BEARER}"
        f"&client_assertion={secret_agent.assertion()}"
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert hub.request("POST", TOKEN, data=raw.encode(), headers=headers).status_code == 200
    encoded = urllib.parse.urlencode(token_form(secret_agent.assertion()), safe="")
    assert "%3A" in encoded
    assert hub.request("POST", TOKEN, data=encoded.encode(), headers=headers).status_code == 200


def test_assertions_within_the_clock_leeway_are_accepted(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    now = hub.clock()
    late = client_assertion(secret_agent.id, secret_agent.key, now - 330, lifetime=300)  # expired 30 s ago
    early = client_assertion(secret_agent.id, secret_agent.key, now + 30)  # a clock 30 s fast
    assert post_assertion(hub, late).status_code == 200
    assert post_assertion(hub, early).status_code == 200


# --- forged and stale assertions ---------------------------------------------------------------------


def _refused(hub: RunningHub, agent: OnboardedAgent, assertion: str, status: int, code: str) -> None:
    before = agent_record(hub, agent.id)
    assert_hub_error(post_assertion(hub, assertion), status, code)
    assert agent_record(hub, agent.id) == before


def test_an_unsigned_assertion_is_refused(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    unsigned = jwt.encode(standard_claims(hub, secret_agent.id), "", algorithm="none")
    _refused(hub, secret_agent, unsigned, 401, "invalid_client")
    forged = hand_made_jwt({"alg": "none"}, standard_claims(hub, secret_agent.id), lambda _data: b"")
    _refused(hub, secret_agent, forged, 401, "invalid_client")


def test_an_hmac_keyed_with_the_agents_public_key_is_refused(
    hub: RunningHub, rsa_agent: OnboardedAgent, agent_key: rsa.RSAPrivateKey
) -> None:
    """Algorithm confusion: the public key is public, so an HS256 keyed with it proves nothing."""
    public_pem = agent_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for key in (
        public_pem,
        json.dumps(rsa_agent.hub.request("GET", f"{AGENTS}/oauth/token_key").json()).encode(),
    ):
        forged = hand_made_jwt(
            {"alg": "HS256", "typ": "JWT"},
            standard_claims(hub, rsa_agent.id),
            lambda data, key=key: hmac.new(key, data, hashlib.sha256).digest(),
        )
        _refused(hub, rsa_agent, forged, 401, "invalid_client")


def test_an_algorithm_outside_the_profiles_set_is_refused(
    hub: RunningHub, secret_agent: OnboardedAgent, rsa_agent: OnboardedAgent, agent_key: rsa.RSAPrivateKey
) -> None:
    rs512 = client_assertion(rsa_agent.id, agent_key, hub.clock(), algorithm="RS512")
    _refused(hub, rsa_agent, rs512, 401, "invalid_client")
    hs384 = client_assertion(secret_agent.id, secret_agent.key, hub.clock(), algorithm="HS384")
    _refused(hub, secret_agent, hs384, 401, "invalid_client")
    # a shared-secret agent cannot switch to a key of its own
    own_key = client_assertion(secret_agent.id, agent_key, hub.clock())
    _refused(hub, secret_agent, own_key, 401, "invalid_client")


def test_a_wrong_secret_or_key_is_refused(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    wrong = client_assertion(secret_agent.id, "a-guessed-secret-of-enough-length-0000", hub.clock())
    _refused(hub, secret_agent, wrong, 401, "invalid_client")
    unknown = client_assertion("0" * 32, "a-guessed-secret-of-enough-length-0000", hub.clock())
    assert_hub_error(post_assertion(hub, unknown), 401, "invalid_client")


@pytest.mark.parametrize(
    ("when", "lifetime"),
    [(-400, 300), (-7200, 3600), (120, 300)],
    ids=["expired-beyond-leeway", "long-expired", "not-yet-valid-beyond-leeway"],
)
def test_an_assertion_outside_its_validity_is_refused(
    hub: RunningHub, secret_agent: OnboardedAgent, when: float, lifetime: float
) -> None:
    assertion = client_assertion(secret_agent.id, secret_agent.key, hub.clock() + when, lifetime=lifetime)
    _refused(hub, secret_agent, assertion, 400, "invalid_grant")


def test_a_not_yet_valid_nbf_beyond_the_leeway_is_refused(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    now = int(hub.clock())
    _refused(hub, secret_agent, secret_agent.assertion(nbf=now + 120), 400, "invalid_grant")


def test_an_assertion_valid_for_too_long_is_refused(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    assertion = client_assertion(secret_agent.id, secret_agent.key, hub.clock(), lifetime=2 * 3600)
    _refused(hub, secret_agent, assertion, 400, "invalid_grant")


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "elsewhere"},
        {"aud": ["elsewhere"]},
        {"aud": None},
        {"iss": "someone-else"},
        {"ten": "another-tenant"},
        {"exp": "tomorrow"},
        {"iat": True},
        {"exp": 10**30},
        {"jti": ""},
        {"jti": 7},
        {"jti": "j" * 256},
    ],
    ids=[
        "aud-string",
        "aud-array",
        "no-aud",
        "iss",
        "tenant",
        "exp-text",
        "iat-bool",
        "exp-huge",
        "jti-empty",
        "jti-number",
        "jti-long",
    ],
)
def test_an_authentic_assertion_with_wrong_claims_is_refused(
    hub: RunningHub, secret_agent: OnboardedAgent, claims: dict[str, Any]
) -> None:
    _refused(hub, secret_agent, secret_agent.assertion(**claims), 400, "invalid_grant")


def test_an_assertion_naming_another_subject_is_refused(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    other = onboard_agent(hub, "gw-other")
    # signed with our secret, claiming to be the other agent: its credentials do not verify it
    assertion = client_assertion(other.id, secret_agent.key, hub.clock())
    _refused(hub, other, assertion, 401, "invalid_client")
    anonymous = {k: v for k, v in standard_claims(hub, secret_agent.id).items() if k not in ("iss", "sub")}
    secret = (secret_agent.client_secret or "").encode()
    unnamed = hand_made_jwt(
        {"alg": "HS256"}, anonymous, lambda data: hmac.new(secret, data, hashlib.sha256).digest()
    )
    _refused(hub, secret_agent, unnamed, 401, "invalid_client")


def test_an_assertion_without_a_jti_is_refused(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    claims = {k: v for k, v in standard_claims(hub, secret_agent.id).items() if k != "jti"}
    secret = (secret_agent.client_secret or "").encode()
    assertion = hand_made_jwt(
        {"alg": "HS256"}, claims, lambda data: hmac.new(secret, data, hashlib.sha256).digest()
    )
    _refused(hub, secret_agent, assertion, 400, "invalid_grant")


# --- one assertion, one token ------------------------------------------------------------------------


def spent_assertions(hub: RunningHub) -> int:
    with hub.state.database.transaction() as session:
        return session.query(SpentAssertion).count()


def test_an_assertion_buys_one_token_and_its_replay_changes_nothing(hub_on_each_database: RunningHub) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    assert agent.renew().status_code == 200  # the previous set is kept until the new one is used...
    assertion = agent.assertion()
    assert post_assertion(hub, assertion).status_code == 200  # ...and this retires it
    before = agent_record(hub, agent.id)
    replayed = post_assertion(hub, assertion)
    assert_hub_error(replayed, 400, "invalid_grant")
    assert "already used" in replayed.json()["error_description"]
    assert agent_record(hub, agent.id) == before
    assert post_assertion(hub, agent.assertion()).status_code == 200  # a new one, as clients make


@pytest.mark.parametrize(
    "claims", [{"jti": "a\x00b"}, {"jti": "line\nbreak"}, {"sub": "gw\x00", "iss": "gw\x00"}]
)
def test_control_characters_in_jti_or_client_are_refused_on_every_database(
    hub_on_each_database: RunningHub, claims: dict[str, str]
) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    response = post_assertion(hub, agent.assertion(**claims))
    assert response.status_code in (400, 401), response.text  # never a 500 (PostgreSQL text holds no NUL)
    assert response.json()["error"] in ("invalid_grant", "invalid_client")


def test_one_assertion_sent_many_times_at_once_buys_one_token(hub_on_each_database: RunningHub) -> None:
    hub = hub_on_each_database
    agent = onboard_agent(hub, "gw-1")
    assertion = agent.assertion()

    def send() -> requests.Response:
        return requests.post(f"{hub.url}{TOKEN}", data=token_form(assertion), verify=str(hub.ca), timeout=60)

    statuses = at_once([send] * 6)
    assert sorted(statuses) == [200] + [400] * 5, statuses


def test_spent_jtis_are_forgotten_once_their_assertions_would_be_refused_anyway(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    assertion = secret_agent.assertion()  # valid for 300 s; the hub's leeway is 60 s
    assert post_assertion(hub, assertion).status_code == 200
    assert spent_assertions(hub) == 1
    hub.clock.advance(300 + 60 + 1)
    assert post_assertion(hub, secret_agent.assertion()).status_code == 200
    assert spent_assertions(hub) == 1  # only the new one
    _refused(hub, secret_agent, assertion, 400, "invalid_grant")  # and the old one is refused as expired


def test_a_rejected_assertion_with_renewed_credentials_keeps_the_previous_set(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    first_rat = secret_agent.rat
    assert secret_agent.renew().status_code == 200
    expired = client_assertion(secret_agent.id, secret_agent.key, hub.clock() - 4000, lifetime=300)
    _refused(hub, secret_agent, expired, 400, "invalid_grant")
    renewal = hub.request(
        "PUT", f"{AGENTS}/register/{secret_agent.id}", token=first_rat, json={"client_id": secret_agent.id}
    )
    assert renewal.status_code == 200


# --- agents that may not have tokens -----------------------------------------------------------------


def test_an_offboarded_agent_gets_no_token_and_its_tokens_die(
    hub: RunningHub, rsa_agent: OnboardedAgent
) -> None:
    access_token = rsa_agent.access_token()
    path = f"{AGENTS}/agents/{rsa_agent.id}/dataSourceConfiguration"
    assert hub.request("GET", path, token=access_token).status_code == 200
    assert hub.admin("POST", f"{AGENTS}/agents/{rsa_agent.id}/boarding/offboard").status_code == 200
    _refused(hub, rsa_agent, rsa_agent.assertion(), 401, "invalid_client")
    assert_hub_error(hub.request("GET", path, token=access_token), 401)


def test_credentials_expire_after_seven_days(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    hub.clock.advance(7 * 24 * 3600 - 60)
    assert secret_agent.request_token().status_code == 200
    hub.clock.advance(61)
    _refused(hub, secret_agent, secret_agent.assertion(), 401, "invalid_client")


# --- malformed requests ------------------------------------------------------------------------------


def _malformed_bodies(assertion: str) -> list[tuple[bytes, str]]:
    good = token_form(assertion)
    form = "application/x-www-form-urlencoded"
    return [
        (b"", form),
        (b"grant_type", form),
        (urllib.parse.urlencode(good).encode() + b"&grant_type=client_credentials", form),
        (urllib.parse.urlencode(good | {"grant_type": "password"}).encode(), form),
        (urllib.parse.urlencode(good | {"client_assertion_type": "x"}).encode(), form),
        (urllib.parse.urlencode(good | {"client_assertion": "not-a-jwt"}).encode(), form),
        (urllib.parse.urlencode(good | {"client_assertion": "a.b.c"}).encode(), form),
        (urllib.parse.urlencode({k: v for k, v in good.items() if k != "client_assertion"}).encode(), form),
        (urllib.parse.urlencode(good).encode() + b"&x=%ff", form),
        (b"\xff\xfe" + urllib.parse.urlencode(good).encode(), form),
        ("&".join(f"f{n}=1" for n in range(MAX_FIELDS + 1)).encode(), form),
        (json.dumps(good).encode(), "application/json"),
        (urllib.parse.urlencode(good | {"client_assertion": "e" * 9000}).encode(), form),
    ]


def test_a_malformed_token_request_is_a_400_with_server_time_and_changes_nothing(
    hub: RunningHub, secret_agent: OnboardedAgent
) -> None:
    before = agent_record(hub, secret_agent.id)
    for body, content_type in _malformed_bodies(secret_agent.assertion()):
        response = hub.request("POST", TOKEN, data=body, headers={"Content-Type": content_type})
        assert_hub_error(response, 400, "invalid_request")
        assert "Server-Time" in response.headers
    assert agent_record(hub, secret_agent.id) == before


def test_an_oversized_token_request_is_refused(hub: RunningHub, secret_agent: OnboardedAgent) -> None:
    body = urllib.parse.urlencode(token_form(secret_agent.assertion()) | {"padding": "p" * 20000}).encode()
    response = hub.request(
        "POST", TOKEN, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert 400 <= response.status_code < 500
    assert set(response.json()) == {"error", "error_description"}


def test_a_hub_refuses_an_assertion_limit_below_what_devices_sign_and_grants_them_at_it(
    tmp_path: Path,
) -> None:
    """A `max_assertion_lifetime` of 120 s was accepted, and then every device token request refused."""
    assert device_tokens.ASSERTION_LIFETIME == DEVICE_ASSERTION_LIFETIME
    too_short = HubSettings(max_assertion_lifetime=DEVICE_ASSERTION_LIFETIME - 1)
    refusal = f"max_assertion_lifetime must be from {DEVICE_ASSERTION_LIFETIME} to"
    with (
        pytest.raises(HubSetupError, match=refusal),
        running_hub(tmp_path / "too-short", too_short),
    ):
        pass
    shortest = HubSettings(max_assertion_lifetime=DEVICE_ASSERTION_LIFETIME)
    with running_hub(tmp_path / "hub", shortest) as strict:
        gateway = make_gateway(strict, tmp_path / "gw")
        with gateway.client() as client:
            client.onboard()
            assert client.access_token().count(".") == 2


def test_the_token_endpoint_documents_its_form_body(hub: RunningHub) -> None:
    spec = hub.request("GET", "/openapi.json").json()
    body = spec["paths"][TOKEN]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    assert set(body["schema"]["required"]) == {"grant_type", "client_assertion_type", "client_assertion"}


# --- the form parser, as properties ------------------------------------------------------------------

_field_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(_field_text.filter(bool), _field_text, max_size=MAX_FIELDS))
def test_any_encoded_form_parses_back_to_its_fields(fields: dict[str, str]) -> None:
    assert parse_form(urllib.parse.urlencode(fields).encode("ascii")) == fields


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_body_parses_or_is_refused_with_our_own_error(body: bytes) -> None:
    try:
        fields = parse_form(body)
    except InvalidRequestError:
        return
    assert len(fields) <= MAX_FIELDS
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in fields.items())

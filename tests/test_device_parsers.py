"""Pure pieces of the device client: the hub clock, network configuration, answers and assertions, and
the reprs of values holding a secret, on the device and the hub."""

from __future__ import annotations

import json
from collections.abc import Callable

import jwt
import pytest

from board.interface import BoardingData
from hub.assertions import ClientKey
from hub.models import SecurityProfile
from hub.onboarding import Registration
from hub.tokens import IssuedToken
from mers.boarding import BoardingSource, CredentialProfile, parse_boarding, parse_network
from mers.client import ClientSettings
from mers.clock import HubClock
from mers.credentials import CredentialSet, StoredCredentials
from mers.errors import BoardingDataError, HubProtocolError
from mers.onboarding import MAX_CREDENTIAL_LIFETIME, parse_credential_set
from mers.tokens import AccessToken, client_assertion
from tests.board_helpers import ca_bundle, config, iat


def test_the_clock_learns_the_offset_and_ignores_a_bad_header() -> None:
    clock = HubClock(lambda: 1000.0)
    assert not clock.synchronised and clock.now() == 1000.0
    for bad in ("soon", "nan", "-5", "inf"):
        clock.observe({"server-time": bad})
        assert not clock.synchronised
    clock.observe({"server-time": "8200"}, round_trip=2.0)
    assert clock.offset == pytest.approx(8200 + 0.5 - 999.0)


def test_hub_time_runs_on_the_monotonic_clock_whatever_the_wall_clock_does() -> None:
    wall, elapsed = [1000.0], [50.0]
    clock = HubClock(lambda: wall[0], elapsed=lambda: elapsed[0])
    clock.observe({"server-time": "8200"})
    wall[0] += 30 * 365 * 86400.0  # NTP steps the wall clock of an RTC-less gateway by decades
    assert clock.now() == pytest.approx(8200.5)
    elapsed[0] += 60.0
    wall[0] -= 3600.0
    assert clock.now() == pytest.approx(8260.5)


def test_the_margins_are_at_most_half_the_lifetime_and_whole_when_it_is_unknown() -> None:
    settings = ClientSettings()
    written_before = {"rat": "r", "registrationClientUri": "https://hub/r", "expiresAt": 90000.0}
    held = CredentialSet.from_json(written_before)
    assert held.lifetime is None and settings.renewal_margin(held) == settings.renew_margin
    held = CredentialSet.from_json({**written_before, "issuedAt": 3600.0})
    assert settings.renewal_margin(held) == (90000.0 - 3600.0) / 2
    assert settings.renewal_margin(CredentialSet("r", "u", 8 * 86400.0, None, 86400.0)) == 25 * 3600
    assert settings.token_refresh_margin(AccessToken("t", 1100.0, "s", 1000.0)) == 50.0
    assert settings.token_refresh_margin(AccessToken("t", 2800.0, "s", 1000.0)) == settings.token_margin
    assert settings.token_refresh_margin(AccessToken("t", 2800.0, "s")) == settings.token_margin


def test_proxy_credentials_are_folded_into_the_url_and_hidden_from_display() -> None:
    config = parse_network(b'{"proxy": "http://proxy:3128", "username": "gw 1", "password": "p@ss:word"}')
    assert config.proxy_url == "http://gw%201:p%40ss%3Aword@proxy:3128"
    assert config.display == "http://proxy:3128"


@pytest.mark.parametrize(
    ("proxy", "display"),
    [
        ("http://proxy:3128/", "http://proxy:3128"),
        ("http://PROXY.example", "http://proxy.example"),
        ("http://[::1]:3128", "http://[::1]:3128"),
    ],
)
def test_the_proxy_shown_is_the_proxy_connected_to(proxy: str, display: str) -> None:
    assert parse_network(json.dumps({"proxy": proxy}).encode()).display == display


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"proxy": 1}',
        b'{"proxy": "socks5://p:1"}',
        b'{"proxy": "http://p:1", "user": "x"}',
        b'{"proxy": "http://p:1", "username": "x"}',
        b'{"proxy": "http://p:31x8"}',
        b'{"proxy": "http://p:99999"}',
        b'{"proxy": "http://[::1:3128"}',
        b'{"proxy": "http://ho st:3128"}',
        b'{"proxy": "http://h\\u0007st:3128"}',
        b'{"proxy": "http://h%zz:3128"}',
        b'{"proxy": "http://host:3128\\\\@elsewhere"}',
        b'{"proxy": "http://host:3128/path"}',
        b'{"proxy": "http://host:3128?@elsewhere"}',
        b'{"proxy": "http://host:3128#@elsewhere"}',
        b"nope",
    ],
)
def test_a_bad_network_configuration_is_refused(raw: bytes) -> None:
    with pytest.raises(BoardingDataError):
        parse_network(raw)


GOOD_ANSWER = {
    "client_id": "a",
    "client_secret": "s",
    "client_secret_expires_at": 5,
    "registration_access_token": "r",
    "registration_client_uri": "https://hub/x",
}


def parse(answer: dict[str, object], base_url: str = "https://hub", now: float = 0.0) -> CredentialSet:
    return parse_credential_set(answer, "a", CredentialProfile.SHARED_SECRET, base_url, now)


def test_a_registration_answer_without_what_the_profile_needs_is_refused() -> None:
    good = GOOD_ANSWER
    assert parse(good).rat == "r"
    for broken in (
        {**good, "client_id": "b"},
        {**good, "client_secret": None},
        {**good, "registration_access_token": ""},
        {**good, "registration_client_uri": "http://hub/x"},
        {**good, "client_secret_expires_at": True},
    ):
        with pytest.raises(HubProtocolError):
            parse(broken)


@pytest.mark.parametrize(
    ("base_url", "uri"),
    [
        ("https://hub.example", "https://HUB.Example:443/api/agentmanagement/v3/register/a"),
        ("https://hub.example:443", "https://hub.example/x"),
        ("https://Hub.example:8443/prefix", "https://hub.example:8443/other"),
        ("https://[::1]:8443", "https://[::1]:8443/x"),
    ],
)
def test_a_registration_uri_on_the_hubs_own_origin_is_taken_whatever_its_spelling(
    base_url: str, uri: str
) -> None:
    assert parse({**GOOD_ANSWER, "registration_client_uri": uri}, base_url).registration_client_uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "https://elsewhere.example/x",
        "https://hub.example.elsewhere.example/x",
        "https://hub.example:8443/x",
        "https://hub.example:99999/x",
        "https://hub.example@elsewhere.example/x",
        "https://user:pass@hub.example/x",
        "https:///x",
        "https://[hub.example/x",  # urlsplit raises ValueError
    ],
)
def test_a_registration_uri_off_the_hubs_origin_is_refused(uri: str) -> None:
    with pytest.raises(HubProtocolError, match="origin"):
        parse({**GOOD_ANSWER, "registration_client_uri": uri}, "https://hub.example")


def test_an_assertion_carries_the_claims_of_design_section_6() -> None:
    token = client_assertion("agent", "mers", "s" * 48, 1_700_000_000.7)
    claims = jwt.decode(
        token, b"s" * 48, algorithms=["HS256"], audience="southgate", options={"verify_exp": False}
    )
    assert claims["iss"] == claims["sub"] == "agent" and claims["ten"] == "mers"
    assert claims["iat"] == claims["nbf"] == 1_700_000_000 and claims["exp"] == 1_700_000_300
    assert claims["schemas"] == ["urn:siemens:mindsphere:v1"] and claims["jti"]


SECRET = "s3cret-Value"  # stands for every secret below
BOARDING = BoardingData(
    config(iat=iat(secret=SECRET)),
    ca_bundle(),
    json.dumps({"proxy": "http://proxy:3128", "username": "gw", "password": SECRET}).encode(),
)
SECRET_SET = CredentialSet(f"rat-{SECRET}", "https://hub/x", 1.0, f"secret-{SECRET}")


@pytest.mark.parametrize(
    "build",
    [
        lambda: SECRET_SET,
        lambda: StoredCredentials(
            "agent-1", "t", CredentialProfile.SHARED_SECRET, "https://hub", "i", BOARDING, SECRET_SET
        ),
        lambda: AccessToken(f"token-{SECRET}", 1.0, "set"),
        lambda: parse_network(BOARDING.network or b""),
        lambda: parse_boarding(BOARDING, BoardingSource.IMPORTED),
        lambda: Registration(
            "a", SecurityProfile.SHARED_SECRET, SECRET, None, 1.0, SECRET, "jti", "https://hub/x"
        ),
        lambda: ClientKey.shared_secret(SECRET),
        lambda: IssuedToken(f"token-{SECRET}", "jti", 0.0, 1.0),
        lambda: BOARDING,
    ],
    ids=[
        "CredentialSet",
        "StoredCredentials",
        "AccessToken",
        "NetworkConfig",
        "Boarding",
        "Registration",
        "ClientKey",
        "IssuedToken",
        "BoardingData",
    ],
)
def test_no_secret_appears_in_a_repr(build: Callable[[], object]) -> None:
    """A secret in a repr ends up in a log line or a traceback the first time someone prints the object."""
    value = build()
    iat_in_boarding = json.loads(BOARDING.config)["content"]["iat"]
    for shown in (repr(value), str(value)):
        assert SECRET not in shown and iat_in_boarding not in shown
        assert "gw:" not in shown  # the proxy URL with its credentials


NOW = 1_750_000_000.0


@pytest.mark.parametrize("expires", [NOW + 1, NOW + 7 * 86400, int(NOW + MAX_CREDENTIAL_LIFETIME)])
def test_a_credential_expiry_in_the_coming_year_by_the_hubs_clock_is_taken(expires: float) -> None:
    assert parse({**GOOD_ANSWER, "client_secret_expires_at": expires}, now=NOW).expires_at == expires


@pytest.mark.parametrize(
    "expires",
    [
        str(int(NOW + 7 * 86400) * 1000),  # milliseconds
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",  # a float JSON reads as Infinity
        "1" + "0" * 400,  # an int no float holds
        str(int(NOW)),  # expired as it is handed out
        str(int(NOW - 86400)),
        str(int(NOW + MAX_CREDENTIAL_LIFETIME + 1)),
        "0",
        f'"{int(NOW + 86400)}"',
    ],
)
def test_a_credential_expiry_that_is_not_a_time_in_the_coming_year_is_refused(expires: str) -> None:
    """As the wire carries it: JSON text, which Python's parser reads into NaN, Infinity or a huge int."""
    document = json.loads(
        json.dumps(GOOD_ANSWER).replace(
            '"client_secret_expires_at": 5', f'"client_secret_expires_at": {expires}'
        )
    )
    assert document["client_secret_expires_at"] != GOOD_ANSWER["client_secret_expires_at"]
    with pytest.raises(HubProtocolError, match="client_secret_expires_at"):
        parse(document, now=NOW)

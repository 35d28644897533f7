"""The four HTTPS clients of the project (the device's hub session and image fetcher, the factory's hub
source, the operator's admin client) live in packages the table keeps apart, so each makes its own
session. They must agree on what makes them safe, and this contract holds them to it: the CA given,
nothing from the environment (a proxy, a CA bundle), and a redirect never followed (it would carry a
token or a signed URL to another address)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from factory.boarding_source import HubSource
from hub.admin_client import AdminClient, HubConnection
from mers.clock import HubClock
from mers.download import BlobFetcher
from mers.http import HubSession
from tests.device_helpers import FAST_HTTP, BadServer, bad_server
from tests.installer_helpers import TEST_DOWNLOAD


def mers_hub_session(server: BadServer, ca: Path) -> None:
    session = HubSession(server.url, ca, HubClock(), settings=FAST_HTTP)
    try:
        session.request("GET", "/api/agentmanagement/v3/oauth/token_key", bearer="a-token")
    finally:
        session.close()


def mers_image_fetcher(server: BadServer, ca: Path) -> None:
    url = f"{server.url}/blobs/image?expires=1&signature=secret"
    with BlobFetcher(url, ca, settings=TEST_DOWNLOAD) as fetcher:
        fetcher.probe()


def factory_hub_source(server: BadServer, ca: Path) -> None:
    HubSource(server.url, ca, "an-admin-token").current("GW-0001")


def hub_admin_client(server: BadServer, ca: Path) -> None:
    with AdminClient(HubConnection(server.url, ca, "an-admin-token")) as client:
        client.list_agents()


CLIENTS: dict[str, Callable[[BadServer, Path], None]] = {
    "mers hub session": mers_hub_session,
    "mers image fetcher": mers_image_fetcher,
    "factory hub source": factory_hub_source,
    "hub admin client": hub_admin_client,
}


@pytest.mark.parametrize("client", list(CLIENTS.values()), ids=list(CLIENTS))
def test_each_https_client_uses_its_ca_ignores_the_environment_and_never_follows_a_redirect(
    client: Callable[[BadServer, Path], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what requests would take from the environment: a proxy that is not there, a CA bundle that is not
    # the server's (either one, obeyed, means the server below never sees the request)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "absent.pem"))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(tmp_path / "absent.pem"))
    with bad_server("redirect") as server:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(server.ca_pem)
        with contextlib.suppress(Exception):  # each client refuses a 302 in its own words
            client(server, ca)
    assert server.requests, "the client did not reach the server it was given"
    assert all("/elsewhere" not in line for line in server.requests), server.requests


@pytest.mark.parametrize("client", list(CLIENTS.values()), ids=list(CLIENTS))
def test_each_https_client_refuses_a_server_its_ca_did_not_sign(
    client: Callable[[BadServer, Path], None], tmp_path: Path
) -> None:
    with bad_server("redirect") as server, bad_server("redirect") as other:
        ca = tmp_path / "other-ca.pem"
        ca.write_bytes(other.ca_pem)
        with contextlib.suppress(Exception):
            client(server, ca)
    assert server.connections >= 1, "the client did not even try the server it was given"
    assert server.requests == [], "a request went to a server the CA does not vouch for"
    # and once is enough: the certificate is the same at every try, and the retries' backoff held a
    # device's call for over a minute
    assert server.connections == 1, f"{server.connections} tries of a certificate the CA did not sign"

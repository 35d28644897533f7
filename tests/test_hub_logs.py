"""No secret and no signed URL in what `mers-hub serve` prints, even at its most verbose.

The hub runs as the operator runs it (a `mers-hub serve --log-level debug` subprocess) and goes through a
fleet's life over HTTPS: onboarding with IATs, both credential profiles, tokens, a renewal, an offboarding,
a release, a task, a blob download through its signed URL, and refused attempts with stolen or tampered
credentials (refusals are what operators log most). Then every credential handed out, and the signature
of every signed URL, is searched for in the server's whole output. The output must also show the requests
(method, path and status), so the check cannot pass on an empty log.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
import sqlalchemy
from cryptography.hazmat.primitives.asymmetric import rsa

from hub.home import HubHome
from signing.keys import KeyAlgorithm
from tests.conftest import run_cli
from tests.firmware_helpers import new_task, trust, upload
from tests.hub_helpers import AGENTS, FIRMWARE, boarding_configuration, create_agent, onboard_agent, register
from tests.served_hub import ServedHub, serving
from tests.signing_helpers import make_image, signer_for, succeeded


def exercise_the_hub(hub: ServedHub, directory: Path) -> tuple[list[str], list[str]]:
    """Run a fleet's life against `hub`; return the secrets it handed out and the request lines it must
    have logged."""
    secrets = [hub.admin_token]
    # an agent with a shared secret: onboarded, a token, a renewal, its old RAT refused afterwards
    shared = onboard_agent(hub, "gateway-shared")
    secrets += [shared.rat, shared.client_secret or ""]
    first_rat = shared.rat
    secrets.append(shared.access_token())
    assert shared.renew().status_code == 200
    secrets += [shared.rat, shared.client_secret or ""]
    assert shared.request_token().status_code == 200
    stale = hub.request(
        "PUT",
        shared.registration_client_uri.removeprefix(hub.url),
        token=first_rat,
        json={"client_id": shared.id},
    )
    assert stale.status_code == 401, stale.text
    # an RSA_3072 agent, then offboarded: its token refused
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    keyed = onboard_agent(hub, "gateway-rsa", "RSA_3072", private_key=key)
    secrets.append(keyed.rat)
    keyed_token = keyed.access_token()
    secrets.append(keyed_token)
    offboarded = hub.admin("POST", f"{AGENTS}/agents/{keyed.id}/boarding/offboard")
    assert offboarded.status_code == 200, offboarded.text
    assert hub.request("GET", f"{FIRMWARE}/installationTasks", token=keyed_token).status_code == 401
    # an IAT used twice: the second registration is refused
    spare = create_agent(hub, "gateway-spare")
    iat = boarding_configuration(hub, spare["id"])["content"]["iat"]
    secrets.append(iat)
    assert register(hub, iat, "SHARED_SECRET").status_code == 201
    assert register(hub, iat, "SHARED_SECRET").status_code == 401
    # a release, a task for the shared-secret agent, its signed URL as the agent reads it
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    release = upload(hub, make_image(directory, [signer], payload=b"rootfs " * 4000))
    assert release.status_code == 201, release.text
    task = new_task(hub, shared.id, release.json()["id"])
    token = shared.access_token()
    secrets.append(token)
    seen = hub.request("GET", f"{FIRMWARE}/installationTasks/{task['id']}", token=token)
    assert seen.status_code == 200, seen.text
    uri = seen.json()["artifacts"][0]["uri"]
    parts = urlsplit(uri)
    secrets += [value for _, value in parse_qsl(parts.query) if len(value) >= 16]
    secrets.append(parts.query)
    assert hub.http.get(uri, verify=str(hub.ca), timeout=30).status_code == 200
    tampered = uri[:-4] + ("AAAA" if not uri.endswith("AAAA") else "BBBB")
    assert hub.http.get(tampered, verify=str(hub.ca), timeout=30).status_code == 403
    # the URL secret and the admin token never appear either, even as a wrong guess's echo
    url_secret = HubHome(hub.root).url_secret.read_bytes()
    secrets += [url_secret.hex(), base64.urlsafe_b64encode(url_secret).decode().rstrip("=")]
    expected_lines = [
        f"POST {AGENTS}/register 201",
        f"POST {AGENTS}/register 401",
        f"POST {AGENTS}/oauth/token 200",
        f"GET {FIRMWARE}/installationTasks/{task['id']} 200",
        f"GET {parts.path} 200",
        f"GET {parts.path} 403",
    ]
    return [secret for secret in secrets if secret], expected_lines


def test_serve_logs_requests_but_no_credential_or_signed_url(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(run_cli("mers-hub", "init", root))
    with serving(root, "--log-level", "debug") as hub:
        secrets, expected_lines = exercise_the_hub(hub, tmp_path)
        log = hub.stop()
    for line in expected_lines:
        assert line in log, f"{line!r} is not in the server's log"
    leaked = [secret[:12] + "..." for secret in secrets if secret in log]
    assert not leaked, f"the server's log holds {len(leaked)} credentials: {leaked}"


#: what every client secret the hub makes looks like (`secrets.token_urlsafe(48)`)
CLIENT_SECRET_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{64}(?![A-Za-z0-9_-])")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Empty (the hub's own SQLite file), or a fresh PostgreSQL database."""
    yield "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def refuse_credential_writes(url: str) -> None:
    """Make the database itself refuse any write of an agent's client secret, with an error of its own,
    as a locked or failing database would (a trigger: immediate, where a lock would take the busy timeout)."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql(
                    "CREATE TRIGGER refuse BEFORE UPDATE OF client_secret ON agents "
                    "BEGIN SELECT RAISE(ABORT, 'the database refuses this write'); END"
                )
            else:
                connection.exec_driver_sql(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'the database refuses this write'; END $$"
                )
                connection.exec_driver_sql(
                    "CREATE TRIGGER refuse BEFORE UPDATE OF client_secret ON agents "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
    finally:
        engine.dispose()


def test_a_failed_database_write_is_logged_without_its_parameters(tmp_path: Path, database_url: str) -> None:
    """The new client secret of a renewal the database refused must not reach the log in the error's
    text (SQLAlchemy quotes a failed statement's parameters unless told not to)."""
    root = tmp_path / "hub"
    succeeded(run_cli("mers-hub", "init", root, *(["--database-url", database_url] if database_url else [])))
    with serving(root, "--log-level", "debug") as hub:
        agent = onboard_agent(hub, "gateway-shared")
        rat_jti = jwt.decode(agent.rat, options={"verify_signature": False})["jti"]
        refuse_credential_writes(database_url or f"sqlite:///{HubHome(root).default_database}")
        assert agent.renew().status_code == 500
        log = hub.stop()
    assert "the database refuses this write" in log, "the database's error is not in the log"
    assert re.search(r"PUT \S+/register/\S+ 500 \(failed\)", log), "the failed request has no access line"
    held = {"the RAT": agent.rat, "the RAT's id": rat_jti, "the client secret": agent.client_secret or ""}
    leaked = [name for name, value in held.items() if value in log]
    leaked += ["a string shaped like a client secret"] * len(CLIENT_SECRET_SHAPE.findall(log))
    assert not leaked, f"the server's log holds {leaked}"


def test_a_path_with_control_characters_cannot_forge_a_log_line(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(run_cli("mers-hub", "init", root))
    forged = "mers.hub.access GET /api/agentmanagement/v3/agents 200"
    with serving(root) as hub:
        response = hub.request("GET", "/nope%0D%0A" + forged.replace(" ", "%20") + "%1B%5B2J")
        assert response.status_code == 404
        log = hub.stop()
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(forged)], log
    assert "\x1b" not in log and "\r" not in log
    assert "GET /nope\\r\\n" + forged + "\\x1b[2J 404" in log


def test_an_upload_cut_short_by_its_client_is_one_access_line_not_a_traceback(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(run_cli("mers-hub", "init", root))
    with serving(root, "--log-level", "debug") as hub:
        trust(hub, signer_for(KeyAlgorithm.ED25519))
        host, port = urlsplit(hub.url).hostname or "", urlsplit(hub.url).port or 0
        context = ssl.create_default_context(cafile=str(hub.ca))
        with (
            socket.create_connection((host, port)) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(
                f"POST {FIRMWARE}/releases?name=cut HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {hub.admin_token}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {10 << 20}\r\n\r\n".encode()
                + bytes(1 << 20)
            )
        deadline = time.monotonic() + 30
        while "(client disconnected)" not in hub.log.read_text():
            assert time.monotonic() < deadline, hub.log.read_text()
            time.sleep(0.05)
        log = hub.stop()
    assert f"POST {FIRMWARE}/releases - (client disconnected)" in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert not [name for name in os.listdir(HubHome(root).blobs) if not name.startswith(".")]

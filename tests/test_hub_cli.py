"""`mers-hub` (run in-process, `run_cli`; `serve` and uploads as real processes): `init`, `serve` (started on
a free port, stopped by a signal), and the admin commands against real hubs over TLS: the in-process `hub`
fixture through `--url/--token-file/--ca`, and a `mers-hub serve` subprocess through `--dir`.

`--json` output is compared with what the API itself answers, so "exactly the API's JSON" is checked
rather than assumed. Failures are one line on stderr with the documented exit code, and the admin token
never appears in any output.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

from hub import admin_client
from hub.admin_client import AdminClient, HubConnection, ImageShrankError
from hub.home import HubHome, HubSettings
from hub.releases import UPLOAD_PREFIX
from tests.conftest import BIN_DIR, CliResult, run_cli
from tests.hub_helpers import (
    AGENTS,
    FIRMWARE,
    RunningHub,
    boarding_configuration,
    create_agent,
    onboard_agent,
)
from tests.served_hub import ServedHub, serving
from tests.signing_helpers import key_hash, succeeded

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3

MIB = 1 << 20

Argv = list[str | Path]


def mers_hub(*args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    return run_cli("mers-hub", *args, env=env)


def flags(hub: RunningHub) -> Argv:
    """Name the in-process hub explicitly, as an operator on another machine would."""
    return ["--url", hub.url, "--token-file", hub.root / "admin-token", "--ca", hub.ca]


def api_json(*args: str | Path) -> Any:
    """The `--json` output of a successful admin command."""
    return json.loads(succeeded(mers_hub(*args, "--json")).stdout)


def without_secrets(result: CliResult, *secrets: str) -> CliResult:
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr
    return result


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHub]:
    root = tmp_path_factory.mktemp("served") / "hub"
    succeeded(mers_hub("init", root))
    with serving(root) as hub:
        yield hub


# --- signed images, made by `mers-sign` ---------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseKey:
    private: Path
    public: Path


def release_key(directory: Path, name: str = "release") -> ReleaseKey:
    private = directory / f"{name}.pem"
    succeeded(run_cli("mers-sign", "keygen", "--type", "ecdsa-p256", "-o", private))
    return ReleaseKey(private, directory / f"{name}.pub.pem")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> ReleaseKey:
    return release_key(tmp_path_factory.mktemp("keys"))


def signed_image(directory: Path, key: ReleaseKey, version: str, *, size: int = 4096) -> Path:
    payload = directory / f"payload-{version}"
    if size > MIB:
        with payload.open("wb") as handle:
            handle.write(os.urandom(4096))
            handle.truncate(size)
    else:
        payload.write_bytes(os.urandom(size))
    image = directory / f"rootfs-{version}.signed"
    succeeded(
        run_cli(
            "mers-sign", "sign", "--key", key.private, "--version", version, "--security-counter", "2",
            payload, image,
        )
    )  # fmt: skip
    return image


# --- init ---------------------------------------------------------------------------------------------


def test_init_prints_the_admin_token_once_and_where_the_ca_and_the_token_are(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    result = succeeded(mers_hub("init", root))
    home = HubHome(root)
    token = home.admin_token.read_text().strip()
    assert result.stdout.count(token) == 1
    assert str(home.ca_certificate) in result.stdout
    assert str(home.admin_token) in result.stdout
    assert result.stderr == ""


def test_init_writes_the_tenant_public_url_and_hostnames_it_is_given(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(
        mers_hub(
            "init", root, "--tenant", "acme", "--public-url", "https://hub.example.com:8443/",
            "--hostname", "hub.example.com", "--hostname", "10.1.2.3",
        )
    )  # fmt: skip
    assert HubHome(root).settings() == HubSettings(tenant="acme", public_url="https://hub.example.com:8443")
    leaf = x509.load_pem_x509_certificates(HubHome(root).server_certificate.read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.example.com" in names.get_values_for_type(x509.DNSName)
    assert "10.1.2.3" in {str(address) for address in names.get_values_for_type(x509.IPAddress)}


def test_init_refuses_a_non_empty_directory_with_one_line_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root))
    before = {path: path.read_bytes() for path in root.iterdir() if path.is_file()}
    result = mers_hub("init", root)
    assert result.returncode == EXIT_SETUP
    assert "not empty" in result.error_line
    assert result.stdout == ""
    assert {path: path.read_bytes() for path in root.iterdir() if path.is_file()} == before


def test_init_with_an_unreachable_database_says_so_in_one_line_and_can_simply_run_again(
    tmp_path: Path,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    root = tmp_path / "hub"
    url = f"postgresql+psycopg://mers:hunter2@127.0.0.1:{port}/hub"
    result = mers_hub("init", root, "--database-url", url)
    assert result.returncode == EXIT_SETUP
    assert "cannot create the hub's tables" in result.error_line
    assert "hunter2" not in result.stderr
    assert list(root.iterdir()) == []
    succeeded(mers_hub("init", root))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sqlite:///{tmp}/no/such/directory/hub.db", "cannot create the hub's database"),
        ("postgresql+psycopg://mers:hunter2@127.0.0.1:abc/hub", "unusable database URL"),
    ],
)
def test_init_with_an_unusable_database_url_says_so_in_one_line(
    tmp_path: Path, url: str, reason: str
) -> None:
    root = tmp_path / "hub"
    result = mers_hub("init", root, "--database-url", url.format(tmp=tmp_path))
    assert result.returncode == EXIT_SETUP, result.stderr
    assert reason in result.error_line
    assert "hunter2" not in result.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "options",
    [
        ["--public-url", "http://hub.example.com"],
        ["--public-url", "https://"],
        ["--hostname", "hub_example!"],
        ["--tenant", " "],
    ],
)
def test_init_refuses_unusable_options_as_usage_errors_and_creates_nothing(
    tmp_path: Path, options: list[str]
) -> None:
    result = mers_hub("init", tmp_path / "hub", *options)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hub").exists()


# --- serve --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_on_port_zero_publishes_its_url_and_a_stop_signal_ends_it_cleanly(
    tmp_path: Path, stop: signal.Signals
) -> None:
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root))
    with serving(root) as served_hub:
        assert served_hub.url.startswith("https://127.0.0.1:")
        assert not served_hub.url.endswith(":0")
        document = requests.get(
            f"{served_hub.url}/openapi.json", verify=str(served_hub.ca), timeout=30
        ).json()
        assert document["info"]["title"] == "mers hub"
        served_hub.process.send_signal(stop)
        assert served_hub.process.wait(timeout=60) == 0, served_hub.log.read_text()
    assert not HubHome(root).url_file.exists()
    log = served_hub.log.read_text()
    assert "Traceback" not in log
    assert served_hub.url in log  # it says where it listens


@pytest.mark.parametrize(
    ("wildcard", "hostnames", "local_host", "device_host"),
    [
        ("0.0.0.0", ["gw-hub.test", "10.9.8.7"], "127.0.0.1", "gw-hub.test"),
        ("0.0.0.0", [], "127.0.0.1", "127.0.0.1"),
        ("::", [], "localhost", "localhost"),  # the certificate names 127.0.0.1 and localhost, not ::1
    ],
)
def test_serve_on_every_address_gives_devices_the_name_init_certified(
    tmp_path: Path, wildcard: str, hostnames: list[str], local_host: str, device_host: str
) -> None:
    """`--host 0.0.0.0` (the README's way): nobody connects to 0.0.0.0, so the local CLI's DIR/url names
    loopback, and devices (boarding data, signed URLs) get init's first --hostname, which the certificate
    matches. Both used to be https://0.0.0.0:PORT, which failed even for the local admin commands."""
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root, *(option for name in hostnames for option in ("--hostname", name))))
    with serving(root, "--host", wildcard) as served_hub:
        port = served_hub.url.rsplit(":", 1)[1]
        assert served_hub.url == f"https://{local_host}:{port}"
        agent = served_hub.admin(
            "POST",
            "/api/agentmanagement/v3/agents",
            json={"name": "gw-1", "securityProfile": "SHARED_SECRET"},
        ).json()
        boarding = served_hub.admin(
            "GET", f"/api/agentmanagement/v3/agents/{agent['id']}/boarding/configuration"
        ).json()
        assert boarding["content"]["baseUrl"] == f"https://{device_host}:{port}"
        succeeded(mers_hub("agent", "list", "--dir", root))  # the local CLI reaches it through DIR/url


def test_serve_speaks_only_tls(served: ServedHub) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(served.url.replace("https://", "http://") + "/openapi.json", timeout=30)


def test_serve_refuses_a_directory_that_is_not_a_hub_with_one_line(tmp_path: Path) -> None:
    result = mers_hub("serve", tmp_path, "--port", "0")
    assert result.returncode == EXIT_SETUP
    assert "hub directory" in result.error_line
    assert not HubHome(tmp_path).url_file.exists()


def test_serve_refuses_a_database_url_in_hub_toml_that_is_no_url_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root))
    settings = HubSettings(database_url="postgresql+psycopg://mers:hunter2@127.0.0.1:abc/hub")
    HubHome(root).settings_file.write_text(settings.to_toml())
    result = mers_hub("serve", root, "--port", "0")
    assert result.returncode == EXIT_SETUP, result.stderr
    assert "unusable database URL" in result.error_line
    assert "hunter2" not in result.stderr
    assert not HubHome(root).url_file.exists()


@pytest.mark.parametrize("damaged", ["server_key", "server_certificate"])
def test_serve_refuses_a_damaged_tls_key_or_certificate_with_one_line(tmp_path: Path, damaged: str) -> None:
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root))
    path: Path = getattr(HubHome(root), damaged)
    path.write_bytes(path.read_bytes()[:200])  # cut short, as a failed copy leaves it
    result = mers_hub("serve", root, "--port", "0")
    assert result.returncode == EXIT_SETUP, result.stderr
    assert f"cannot use {HubHome(root).server_certificate}" in result.error_line
    assert not HubHome(root).url_file.exists()


def test_serve_refuses_a_port_in_use_with_one_line(served: ServedHub, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mers_hub("serve", served.root, "--port", str(port))
    assert result.returncode == EXIT_SETUP
    assert f"cannot listen on 127.0.0.1:{port}" in result.error_line
    assert HubHome(served.root).url_file.read_text().strip() == served.url  # the running hub's, untouched


# --- which hub, and whether to trust it ---------------------------------------------------------------


def test_an_admin_command_needs_a_hub_directory_or_url_token_and_ca(hub: RunningHub) -> None:
    result = mers_hub("agent", "list", "--url", hub.url, "--ca", hub.ca, env={"MERS_HUB_DIR": ""})
    assert result.returncode == EXIT_USAGE
    assert "--token-file" in result.stderr


def test_an_admin_command_names_a_hub_that_is_not_running(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    succeeded(mers_hub("init", root))
    result = mers_hub("agent", "list", "--dir", root)
    assert result.returncode == EXIT_SETUP
    assert "is the hub running?" in result.error_line


def test_an_admin_command_refuses_a_directory_that_is_not_a_hub(tmp_path: Path) -> None:
    result = mers_hub("agent", "list", "--dir", tmp_path)
    assert result.returncode == EXIT_SETUP
    assert "not a hub directory" in result.error_line


def test_a_hub_whose_certificate_does_not_chain_to_the_given_ca_is_refused(
    hub: RunningHub, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    succeeded(mers_hub("init", other))
    result = mers_hub(
        "agent", "list", "--url", hub.url, "--token-file", hub.root / "admin-token", "--ca", other / "ca.pem"
    )
    assert result.returncode == EXIT_SETUP
    assert "TLS" in result.error_line and "certificate verify failed" in result.error_line
    without_secrets(result, hub.admin_token)


def test_the_hubs_ca_is_used_even_when_requests_ca_bundle_names_another(
    hub: RunningHub, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    succeeded(mers_hub("init", other))
    result = mers_hub("agent", "list", *flags(hub), env={"REQUESTS_CA_BUNDLE": str(other / "ca.pem")})
    succeeded(result)


def test_an_unreachable_hub_is_one_line(hub: RunningHub) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = mers_hub(
        "agent",
        "list",
        "--url",
        f"https://127.0.0.1:{port}",
        "--token-file",
        hub.root / "admin-token",
        "--ca",
        hub.ca,
    )
    assert result.returncode == EXIT_SETUP
    assert f"cannot reach https://127.0.0.1:{port}" in result.error_line
    assert "Connection refused" in result.error_line


def test_a_wrong_admin_token_is_refused_by_the_hub_and_never_printed(hub: RunningHub, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-the-admin-token-but-a-secret-all-the-same\n")
    result = mers_hub("agent", "list", "--url", hub.url, "--token-file", token_file, "--ca", hub.ca)
    assert result.returncode == EXIT_REFUSED
    assert "HTTP 401" in result.error_line
    without_secrets(result, "not-the-admin-token-but-a-secret-all-the-same", hub.admin_token)


def test_a_wrong_path_under_the_hubs_url_reports_the_hubs_not_found(hub: RunningHub) -> None:
    """A path prefix that is not the hub's: its 404s carry the hub's error document, so the hub's reason
    is what the operator reads."""
    result = mers_hub(
        "agent",
        "list",
        "--url",
        hub.url + "/elsewhere",
        "--token-file",
        hub.root / "admin-token",
        "--ca",
        hub.ca,
    )
    assert result.returncode == EXIT_REFUSED
    assert "HTTP 404" in result.error_line


def test_the_url_option_overrides_the_directorys_url_and_localhost_is_in_the_certificate(
    served: ServedHub,
) -> None:
    localhost = served.url.replace("127.0.0.1", "localhost")
    succeeded(mers_hub("agent", "list", "--dir", served.root, "--url", localhost))


def test_mers_hub_dir_in_the_environment_names_the_hub_when_no_option_does(served: ServedHub) -> None:
    succeeded(mers_hub("agent", "list", env={"MERS_HUB_DIR": str(served.root)}))


# --- agents -------------------------------------------------------------------------------------------


def agent_document(hub: RunningHub, agent_id: str) -> Any:
    return hub.admin("GET", f"{AGENTS}/agents/{agent_id}").json()


def test_agent_create_prints_the_new_agent_and_its_json_is_the_apis_document(hub: RunningHub) -> None:
    line = succeeded(mers_hub("agent", "create", "gw-1", *flags(hub))).stdout
    [agent] = hub.admin("GET", f"{AGENTS}/agents", params={"name": "gw-1"}).json()["content"]
    assert f"created agent gw-1 ({agent['id']})" in line
    created = api_json(
        "agent", "create", "gw-2", "--profile", "rsa_3072", "--description", "line 3", *flags(hub)
    )
    assert created == agent_document(hub, created["id"])
    assert (created["securityProfile"], created["description"]) == ("RSA_3072", "line 3")
    # the command it suggests works as printed: it names the hub as this command was told to
    suggested = line.split("boarding configuration: ", 1)[1].strip()
    words = shlex.split(suggested)
    assert words[0] == "mers-hub"
    configuration = json.loads(succeeded(mers_hub(*words[1:])).stdout)
    assert configuration["content"]["clientId"] == agent["id"]


def test_creating_an_agent_whose_name_is_taken_is_refused_with_the_hubs_reason(hub: RunningHub) -> None:
    create_agent(hub, "gw-taken")
    result = without_secrets(mers_hub("agent", "create", "gw-taken", *flags(hub)), hub.admin_token)
    assert result.returncode == EXIT_REFUSED
    assert "gw-taken" in result.error_line and "HTTP 409" in result.error_line


def test_agent_list_json_is_the_apis_page_and_the_table_names_every_agent(hub: RunningHub) -> None:
    for name in ("gw-a", "gw-b"):
        create_agent(hub, name)
    page = api_json("agent", "list", *flags(hub))
    assert page == hub.admin("GET", f"{AGENTS}/agents", params={"page": 0, "size": 100}).json()
    table = succeeded(mers_hub("agent", "list", *flags(hub))).stdout
    for agent in page["content"]:
        assert agent["id"] in table and agent["name"] in table


def test_agent_list_says_which_page_it_shows_and_how_to_get_the_next(hub: RunningHub) -> None:
    for name in ("gw-p1", "gw-p2", "gw-p3"):
        create_agent(hub, name)
    first = succeeded(mers_hub("agent", "list", "--size", "2", *flags(hub))).stdout
    assert "page 1 of 2 (3 agents); next: --page 1" in first
    second = api_json("agent", "list", "--size", "2", "--page", "1", *flags(hub))
    assert len(second["content"]) == 1 and second["last"] is True


def test_agent_show_takes_an_id_or_a_name_and_shows_the_boarding_status(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-show")
    by_name = succeeded(mers_hub("agent", "show", "gw-show", *flags(hub))).stdout
    assert by_name == succeeded(mers_hub("agent", "show", agent["id"], *flags(hub))).stdout
    assert "NOT_ONBOARDED" in by_name and agent["id"] in by_name
    assert api_json("agent", "show", "gw-show", *flags(hub)) == agent_document(hub, agent["id"])


def test_an_agent_description_with_control_characters_is_shown_escaped(hub: RunningHub) -> None:
    description = "line 3\nagent gw-other (0000)\x1b]0;title\x07"
    created = hub.admin(
        "POST",
        f"{AGENTS}/agents",
        json={"name": "gw-1", "securityProfile": "RSA_3072", "description": description},
    )
    assert created.status_code == 201, created.text
    for command in (["agent", "list"], ["agent", "show", "gw-1"]):
        shown = succeeded(mers_hub(*command, *flags(hub))).stdout
        assert "\x1b" not in shown and "\x07" not in shown, command
        assert not [line for line in shown.splitlines() if line.startswith("agent gw-other")], command
        assert "line 3\\nagent gw-other (0000)\\x1b]0;title\\x07" in shown, command


def test_a_name_that_is_another_agents_id_is_refused_as_ambiguous(hub: RunningHub) -> None:
    first = create_agent(hub, "gw-first")
    create_agent(hub, first["id"])
    result = mers_hub("agent", "show", first["id"], *flags(hub))
    assert result.returncode == EXIT_REFUSED
    assert "ambiguous" in result.error_line


def test_agent_config_json_is_exactly_the_boarding_configuration_and_the_human_view_hides_the_iat(
    hub: RunningHub,
) -> None:
    agent = create_agent(hub, "gw-config")
    result = succeeded(mers_hub("agent", "config", "gw-config", "--json", *flags(hub)))
    configuration = boarding_configuration(hub, agent["id"])
    assert json.loads(result.stdout) == configuration  # the whole output parses: nothing else is printed
    assert result.stderr == ""
    human = succeeded(mers_hub("agent", "config", "gw-config", *flags(hub))).stdout
    assert configuration["content"]["iat"] not in human
    assert agent["id"] in human and configuration["content"]["baseUrl"] in human


def test_agent_offboard_sets_an_onboarded_agent_back_and_issues_a_new_iat(hub: RunningHub) -> None:
    onboarded = onboard_agent(hub, "gw-off")
    used_iat = boarding_configuration(hub, onboarded.id)["content"]["iat"]
    status = api_json("agent", "offboard", "gw-off", *flags(hub))
    assert status["status"] == "NOT_ONBOARDED"
    current = hub.admin("GET", f"{AGENTS}/agents/{onboarded.id}/boarding/status").json()
    assert current["status"] == "NOT_ONBOARDED"
    assert boarding_configuration(hub, onboarded.id)["content"]["iat"] != used_iat


def test_agent_delete_removes_the_agent_and_a_second_delete_finds_nothing(hub: RunningHub) -> None:
    agent = create_agent(hub, "gw-del")
    result = succeeded(mers_hub("agent", "delete", "gw-del", *flags(hub)))
    assert f"deleted agent gw-del ({agent['id']})" in result.stdout
    assert hub.admin("GET", f"{AGENTS}/agents/{agent['id']}").status_code == 404
    again = mers_hub("agent", "delete", agent["id"], *flags(hub))
    assert again.returncode == EXIT_REFUSED
    assert "no agent has the id or name" in again.error_line


def test_agent_delete_with_json_prints_nothing_since_the_api_answers_no_content(hub: RunningHub) -> None:
    create_agent(hub, "gw-quiet")
    assert succeeded(mers_hub("agent", "delete", "gw-quiet", "--json", *flags(hub))).stdout == ""


# --- releases -----------------------------------------------------------------------------------------


def trust(hub: RunningHub, key: ReleaseKey) -> None:
    body = {"name": key.public.name, "pem": key.public.read_text()}
    response = hub.admin("POST", f"{FIRMWARE}/trustedKeys", json=body)
    assert response.status_code == 201, response.text


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_trust_add_names_the_key_after_its_file_and_trust_list_shows_it(
    hub: RunningHub, key: ReleaseKey
) -> None:
    added = succeeded(mers_hub("release", "trust", "add", key.public, *flags(hub))).stdout
    listing = api_json("release", "trust", "list", *flags(hub))
    assert listing == hub.admin("GET", f"{FIRMWARE}/trustedKeys").json()
    [entry] = listing["content"]
    assert entry["name"] == "release"
    assert entry["keyHash"] == key_hash(key.public)
    assert entry["keyHash"] in added
    table = succeeded(mers_hub("release", "trust", "list", *flags(hub))).stdout
    assert entry["keyHash"] in table and "ecdsa-p256" in table


def test_release_trust_add_refuses_a_private_key_before_sending_it(hub: RunningHub, key: ReleaseKey) -> None:
    result = mers_hub("release", "trust", "add", key.private, *flags(hub))
    assert result.returncode == EXIT_SETUP
    assert "private key" in result.error_line
    assert hub.admin("GET", f"{FIRMWARE}/trustedKeys").json()["content"] == []


def test_release_upload_sends_a_signed_image_and_release_list_shows_it(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    image = signed_image(tmp_path, key, "1.2.3")
    uploaded = api_json("release", "upload", image, "--name", "rootfs", *flags(hub))
    assert uploaded["name"] == "rootfs"
    assert uploaded["version"].startswith("1.2.3")
    assert (uploaded["sha256"], uploaded["size"]) == (sha256_of(image), image.stat().st_size)
    listing = api_json("release", "list", *flags(hub))
    assert listing == hub.admin("GET", f"{FIRMWARE}/releases").json()
    assert listing["content"] == [uploaded]
    table = succeeded(mers_hub("release", "list", *flags(hub))).stdout
    assert uploaded["id"] in table and "rootfs" in table


def test_uploading_the_same_bytes_again_answers_with_the_release_that_holds_them(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    image = signed_image(tmp_path, key, "2.0.0")
    first = succeeded(mers_hub("release", "upload", image, *flags(hub))).stdout
    second = succeeded(mers_hub("release", "upload", image, *flags(hub))).stdout
    [release] = hub.admin("GET", f"{FIRMWARE}/releases").json()["content"]
    assert first.startswith(f"uploaded release {release['id']}")
    assert second.startswith(f"already uploaded (the same bytes): release {release['id']}")


def test_an_image_signed_by_an_untrusted_key_is_refused_with_the_hubs_reason(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    image = signed_image(tmp_path, release_key(tmp_path, "stranger"), "1.0.0")
    result = mers_hub("release", "upload", image, *flags(hub))
    assert result.returncode == EXIT_REFUSED
    assert "release_rejected, HTTP 422" in result.error_line
    assert hub.admin("GET", f"{FIRMWARE}/releases").json()["content"] == []


def test_an_upload_the_hub_refuses_before_reading_it_still_reports_the_hubs_reason(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    """No key is trusted, so the hub answers at once; the client is still sending 32 MiB."""
    image = signed_image(tmp_path, key, "1.0.0", size=32 * MIB)
    result = mers_hub("release", "upload", image, *flags(hub))
    assert result.returncode == EXIT_REFUSED
    assert "no release trust key" in result.error_line


#: runs the command from a small, fresh interpreter and prints its peak RSS: a child's ru_maxrss starts
#: at its parent's RSS at fork time, so measuring straight from pytest would report pytest's memory
_PEAK_RSS_LAUNCHER = """
import resource, subprocess, sys
completed = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(completed.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(completed.returncode)
"""


def upload_peak_rss_kib(hub: RunningHub, image: Path) -> int:
    command = [sys.executable, "-c", _PEAK_RSS_LAUNCHER, str(BIN_DIR / "mers-hub"), "release", "upload"]
    completed = subprocess.run(
        [*command, str(image), *map(str, flags(hub))], capture_output=True, check=False
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return int(completed.stdout)


def test_an_upload_streams_the_image_rather_than_reading_it_into_memory(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    small = upload_peak_rss_kib(hub, signed_image(tmp_path, key, "1.0.0", size=2 * MIB))
    large = upload_peak_rss_kib(hub, signed_image(tmp_path, key, "1.0.1", size=192 * MIB))
    assert large - small < 16 * 1024, f"uploading 192 MiB took {large - small} KiB more than 2 MiB"


def test_an_upload_shows_a_progress_bar_when_stderr_is_a_terminal(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    image = signed_image(tmp_path, key, "1.0.0", size=4 * MIB)
    controller, terminal = pty.openpty()
    try:
        completed = subprocess.run(
            [str(BIN_DIR / "mers-hub"), "release", "upload", str(image), *map(str, flags(hub))],
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=300,
            check=False,
        )
        os.close(terminal)
        shown = read_all(controller)
    finally:
        os.close(controller)
    assert completed.returncode == 0, shown
    assert "uploading" in shown and "100%" in shown
    assert completed.stdout.decode().startswith("uploaded release")


def test_an_upload_of_a_pipe_is_refused_in_one_line_before_anything_is_sent(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    """A pipe has no size to declare (fstat says 0): the hub would get an empty body, the image after it."""
    trust(hub, key)
    image = signed_image(tmp_path, key, "1.0.0")
    result = run_cli(
        "mers-hub",
        "release",
        "upload",
        "/dev/stdin",
        *flags(hub),
        input_bytes=image.read_bytes(),
        process=True,  # /dev/stdin is then a pipe
    )
    assert result.returncode == EXIT_SETUP
    assert "not a regular file" in result.error_line
    assert hub.admin("GET", f"{FIRMWARE}/releases").json()["content"] == []


def admin(hub: RunningHub) -> AdminClient:
    token = (hub.root / "admin-token").read_text().strip()
    return AdminClient(HubConnection(hub.url, hub.ca, token))


def test_an_image_that_shrinks_during_its_upload_ends_it_at_once_and_the_hub_stores_nothing(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a client left waiting for the hub's answer fails here in seconds, not in ten minutes
    monkeypatch.setattr(admin_client, "UPLOAD_READ_TIMEOUT", 10.0)
    trust(hub, key)
    image = signed_image(tmp_path, key, "1.0.0", size=MIB)
    declared = image.stat().st_size

    def truncate_after_the_first_chunk(_sent: int) -> None:
        if image.stat().st_size == declared:
            os.truncate(image, declared // 2)

    with admin(hub) as client, pytest.raises(ImageShrankError, match=r"ended .* short"):
        client.upload_release(image, "rootfs", truncate_after_the_first_chunk)
    deadline = time.monotonic() + 10
    while list(hub.state.blobs.glob(f"{UPLOAD_PREFIX}*")):
        assert time.monotonic() < deadline, "the hub still holds the partial upload"
        time.sleep(0.02)
    assert hub.admin("GET", f"{FIRMWARE}/releases").json()["content"] == []


def test_an_image_that_grows_during_its_upload_is_sent_only_up_to_its_declared_size(
    hub: RunningHub, key: ReleaseKey, tmp_path: Path
) -> None:
    trust(hub, key)
    image = signed_image(tmp_path, key, "1.0.0", size=MIB)
    declared, digest = image.stat().st_size, sha256_of(image)
    sent: list[int] = []

    def grow_after_the_first_chunk(size: int) -> None:
        if not sent:
            with image.open("ab") as handle:
                handle.write(os.urandom(64 << 10))
        sent.append(size)

    with admin(hub) as client:
        upload = client.upload_release(image, "rootfs", grow_after_the_first_chunk)
    assert sum(sent) == declared, "no byte beyond the Content-Length"
    assert upload.created
    assert (upload.release["size"], upload.release["sha256"]) == (declared, digest)


def read_all(fd: int) -> str:
    """What a pseudo-terminal received, once its writer has gone (Linux then answers EIO)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


# --- installation tasks -------------------------------------------------------------------------------


@pytest.fixture
def release_id(hub: RunningHub, key: ReleaseKey, tmp_path: Path) -> str:
    """A release on the hub, uploaded through the API."""
    trust(hub, key)
    image = signed_image(tmp_path, key, "3.1.4")
    response = hub.admin("POST", f"{FIRMWARE}/releases", params={"name": "rootfs"}, data=image.read_bytes())
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


def without_fresh_urls(document: Any) -> Any:
    """A task document without its artifacts' signed URLs, which the hub signs anew on every GET."""
    tasks = document.get("content", [document])
    for task in tasks:
        for artifact in task["artifacts"]:
            artifact.pop("uri")
            artifact.pop("validUntil")
    return document


def test_task_create_for_a_named_agent_and_task_list_finds_it_open(hub: RunningHub, release_id: str) -> None:
    agent = create_agent(hub, "gw-task")
    created = api_json("task", "create", "--device", "gw-task", "--release", release_id, *flags(hub))
    assert (created["deviceId"], created["softwareReleaseId"]) == (agent["id"], release_id)
    assert created["state"] == "CREATED"
    listing = api_json("task", "list", "--device", "gw-task", "--status", "open", *flags(hub))
    expected = hub.admin(
        "GET", f"{FIRMWARE}/installationTasks", params={"deviceId": agent["id"], "status": "open"}
    ).json()
    assert without_fresh_urls(listing) == without_fresh_urls(expected)
    assert [task["id"] for task in listing["content"]] == [created["id"]]
    table = succeeded(mers_hub("task", "list", "--status", "created", *flags(hub))).stdout
    assert created["id"] in table and "CREATED" in table
    assert api_json("task", "list", "--status", "closed", *flags(hub))["content"] == []


def test_task_show_gives_history_and_checksum_and_leaves_the_signed_url_to_json(
    hub: RunningHub, release_id: str
) -> None:
    agent = create_agent(hub, "gw-detail")
    task = api_json("task", "create", "--device", agent["id"], "--release", release_id, *flags(hub))
    human = succeeded(mers_hub("task", "show", task["id"], *flags(hub))).stdout
    assert "new -> CREATED" in human and task["artifacts"][0]["checksum"] in human
    assert "/blobs/" not in human
    shown = api_json("task", "show", task["id"], *flags(hub))
    assert "/blobs/" in shown["artifacts"][0]["uri"]
    current = hub.admin("GET", f"{FIRMWARE}/installationTasks/{task['id']}").json()
    assert without_fresh_urls(shown) == without_fresh_urls(current)


def test_a_task_message_with_control_characters_is_shown_escaped(hub: RunningHub, release_id: str) -> None:
    agent = create_agent(hub, "gw-noisy")
    task = api_json("task", "create", "--device", agent["id"], "--release", release_id, *flags(hub))
    message = "disk full\nstate ACTIVATED (forged)\x1b[2J\x07"
    reported = hub.admin("PATCH", f"{FIRMWARE}/installationTasks/{task['id']}", json={"message": message})
    assert reported.status_code == 200, reported.text
    for command in (["task", "list"], ["task", "show", task["id"]]):
        shown = succeeded(mers_hub(*command, *flags(hub))).stdout
        assert "\x1b" not in shown and "\x07" not in shown, command
        assert not [line for line in shown.splitlines() if line.startswith("state ACTIVATED")], command
        assert "disk full\\nstate ACTIVATED (forged)\\x1b[2J\\x07" in shown, command


def test_task_cancel_cancels_an_open_task_and_is_refused_once_it_is_closed(
    hub: RunningHub, release_id: str
) -> None:
    agent = create_agent(hub, "gw-cancel")
    task = api_json("task", "create", "--device", "gw-cancel", "--release", release_id, *flags(hub))
    canceled = api_json("task", "cancel", task["id"], *flags(hub))
    assert canceled["state"] == "CANCELED"
    again = mers_hub("task", "cancel", task["id"], *flags(hub))
    assert again.returncode == EXIT_REFUSED
    assert "HTTP 409" in again.error_line
    closed = api_json("task", "list", "--device", agent["id"], "--status", "closed", *flags(hub))
    assert [entry["id"] for entry in closed["content"]] == [task["id"]]


def test_a_status_the_hub_does_not_know_is_refused_with_the_hubs_reason(hub: RunningHub) -> None:
    result = mers_hub("task", "list", "--status", "finished", *flags(hub))
    assert result.returncode == EXIT_REFUSED
    assert "'finished'" in result.error_line and "HTTP 400" in result.error_line


def test_a_task_names_its_release_by_version_and_the_list_names_its_device(
    hub: RunningHub, release_id: str
) -> None:
    agent = create_agent(hub, "gw-by-name")
    created = api_json("task", "create", "--device", "gw-by-name", "--release", "3.1.4", *flags(hub))
    assert (created["deviceId"], created["softwareReleaseId"]) == (agent["id"], release_id)
    table = succeeded(mers_hub("task", "list", *flags(hub))).stdout
    row = next(line for line in table.splitlines() if created["id"] in line)
    assert "gw-by-name" in row and agent["id"] not in row
    unknown = mers_hub("task", "create", "--device", "gw-by-name", "--release", "9.9.9", *flags(hub))
    assert unknown.returncode == EXIT_REFUSED
    assert "no release has the id or version '9.9.9'" in unknown.error_line


def test_a_task_for_an_unknown_release_is_refused_with_the_hubs_reason(hub: RunningHub) -> None:
    create_agent(hub, "gw-nothing")
    result = mers_hub("task", "create", "--device", "gw-nothing", "--release", "0" * 32, *flags(hub))
    assert result.returncode == EXIT_REFUSED
    assert "HTTP 404" in result.error_line


# --- everything through DIR, against `mers-hub serve` ------------------------------------------------


def test_an_operator_with_only_the_hub_directory_runs_the_whole_firmware_round(
    served: ServedHub, key: ReleaseKey, tmp_path: Path
) -> None:
    where: Argv = ["--dir", served.root]
    outputs: list[CliResult] = []

    def run(*args: str | Path) -> Any:
        result = succeeded(mers_hub(*args, "--json", *where))
        outputs.append(result)
        return json.loads(result.stdout) if result.stdout else None

    agent = run("agent", "create", "gw-dir")
    configuration = run("agent", "config", "gw-dir")
    assert configuration["content"]["clientId"] == agent["id"]
    assert configuration["content"]["baseUrl"] == served.url
    run("release", "trust", "add", key.public, "--name", "round-trip")
    release = run("release", "upload", signed_image(tmp_path, key, "5.0.0"))
    task = run("task", "create", "--device", "gw-dir", "--release", release["id"])
    assert [entry["id"] for entry in run("task", "list", "--device", "gw-dir")["content"]] == [task["id"]]
    assert run("task", "cancel", task["id"])["state"] == "CANCELED"
    run("agent", "delete", "gw-dir")
    assert run("agent", "list", "--size", "1")["totalElements"] == 0
    for result in outputs:
        without_secrets(result, served.admin_token)


@pytest.mark.parametrize(("command", "missing"), [("init", "sqlalchemy"), ("serve", "uvicorn")])
def test_the_server_side_without_the_hub_extra_is_one_line_naming_it(
    tmp_path: Path, command: str, missing: str
) -> None:
    """`pip install mers` alone gives the admin commands; `init` and `serve` say which extra they need."""
    hidden = ("fastapi", "uvicorn", "starlette", "sqlalchemy", "psycopg")
    probe = (
        "import sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None  # as if the extra were not installed\n"
        "from hub.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, command, str(tmp_path / "hub")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    expected = f"mers-hub: error: the hub's server needs {missing}: pip install 'mers[hub]'"
    assert done.stderr.strip() == expected
    assert not (tmp_path / "hub").exists()

"""The hub's OpenAPI document describes what it serves, and schemathesis, generating requests from that
document (valid and invalid), finds no server error: bad input is always answered with a 4xx."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import BIN_DIR
from tests.hub_helpers import RunningHub


def test_the_openapi_document_lists_the_agent_management_and_firmware_paths(hub: RunningHub) -> None:
    document = hub.request("GET", "/openapi.json").json()
    paths = set(document["paths"])
    assert "/api/agentmanagement/v3/register" in paths
    assert "/api/agentmanagement/v3/oauth/token" in paths
    assert "/api/firmwaredeployment/v3/installationTasks/{task_id}" in paths or any(
        path.startswith("/api/firmwaredeployment/v3/installationTasks/") for path in paths
    )


def test_schemathesis_finds_no_server_error(hub: RunningHub, tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            str(BIN_DIR / "schemathesis"),
            "run",
            f"{hub.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {hub.admin_token}",
            "--tls-verify",
            str(hub.ca),
            "--max-examples",
            "15",
            "--seed",
            "20261122",
            "--workers",
            "2",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # its example database and reports stay out of the work tree
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]

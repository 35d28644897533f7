"""Helpers for the hub's firmware deployment tests: trusting a release key, uploading a signed image,
an agent row to give tasks to, and a task with its signed artifact URL."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from hub.models import Agent, SecurityProfile
from signing.keys import KeyAlgorithm, SoftwareSigner
from tests.hub_helpers import FIRMWARE, HubAPI, RunningHub
from tests.signing_helpers import make_image, signer_for


def trust(hub: HubAPI, signer: SoftwareSigner, name: str = "release key") -> dict[str, Any]:
    response = hub.admin(
        "POST", f"{FIRMWARE}/trustedKeys", json={"name": name, "pem": signer.public_key.pem().decode()}
    )
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    return key


def upload(hub: HubAPI, image: Path | bytes, name: str = "gateway firmware") -> requests.Response:
    body = image.read_bytes() if isinstance(image, Path) else image
    return hub.admin(
        "POST",
        f"{FIRMWARE}/releases",
        params={"name": name},
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )


def stored_files(hub: RunningHub) -> list[str]:
    """Every file in the blob directory, temporary ones included."""
    return sorted(os.listdir(hub.state.blobs))


def add_agent(hub: RunningHub, name: str = "") -> str:
    """An agent row, straight into the database: tasks need an agent, not an onboarded one."""
    agent_id = uuid.uuid4().hex
    now = hub.clock()
    with hub.state.database.transaction() as session:
        session.add(
            Agent(
                id=agent_id,
                name=name or f"gateway-{agent_id[:8]}",
                security_profile=SecurityProfile.SHARED_SECRET,
                created_at=now,
                updated_at=now,
                status_updated_at=now,
            )
        )
    return agent_id


@dataclass(frozen=True)
class Published:
    """A trusted, uploaded release and a task installing it."""

    image: bytes
    release: dict[str, Any]
    agent_id: str
    task: dict[str, Any]

    @property
    def uri(self) -> str:
        uri: str = self.task["artifacts"][0]["uri"]
        return uri


def publish(hub: RunningHub, directory: Path, payload: bytes | None = None) -> Published:
    """Trust a key, upload an image signed with it, and create a task for a new agent."""
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(directory, [signer], payload=payload if payload is not None else os.urandom(5000))
    response = upload(hub, image)
    assert response.status_code == 201, response.text
    release = response.json()
    agent_id = add_agent(hub)
    task = new_task(hub, agent_id, release["id"])
    return Published(image.read_bytes(), release, agent_id, task)


def new_task(hub: HubAPI, agent_id: str, release_id: str) -> dict[str, Any]:
    body = {"deviceId": agent_id, "softwareType": "FIRMWARE", "softwareReleaseId": release_id}
    response = hub.admin("POST", f"{FIRMWARE}/installationTasks", json=body)
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


def get(hub: RunningHub, uri: str, **kwargs: Any) -> requests.Response:
    """GET a signed URL with no credential but the URL itself."""
    return hub.http.get(uri, verify=str(hub.ca), timeout=30, **kwargs)

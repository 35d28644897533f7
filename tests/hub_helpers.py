"""A real hub for tests: a directory made by `create_hub`, served by uvicorn over TLS on 127.0.0.1 in a
background thread, with a clock tests can move forward (so tokens age without sleeping)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from hub.home import HubSettings
from hub.server import bind, build_server
from hub.setup import create_hub
from hub.state import HubState

AGENTS = "/api/agentmanagement/v3"
FIRMWARE = "/api/firmwaredeployment/v3"


@dataclass
class MovableClock:
    """Real time plus an offset tests advance."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class RunningHub:
    """A hub being served: its URL, its CA, its admin token, and a requests session that trusts the CA."""

    root: Path
    url: str
    admin_token: str
    clock: MovableClock
    state: HubState
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # verify per request: requests prefers REQUESTS_CA_BUNDLE from the environment over Session.verify
        kwargs.setdefault("verify", str(self.ca))
        return self.http.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.request(method, path, token=self.admin_token, **kwargs)


@contextmanager
def running_hub(root: Path, settings: HubSettings | None = None) -> Iterator[RunningHub]:
    """Create a hub in `root` and serve it until the block ends."""
    created = create_hub(root, settings=settings)
    clock = MovableClock()
    sock = bind("127.0.0.1", 0)
    server = build_server(created.home, sock, clock=clock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the hub stopped while starting"
        assert time.monotonic() < deadline, "the hub did not start within 30 s"
        time.sleep(0.01)
    hub = RunningHub(root, server.url, created.admin_token, clock, server.hub)
    try:
        yield hub
    finally:
        hub.http.close()
        server.should_exit = True
        server.force_exit = True  # idle keep-alive TLS connections would hold a graceful exit for 5 s
        thread.join(timeout=30)
        sock.close()

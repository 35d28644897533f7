"""A hub served by `mers-hub serve` as a real subprocess, as an operator runs it: started on a free port,
found through `DIR/url`, stopped by SIGTERM, its whole output kept in a log file next to the hub."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from hub.home import HubHome
from tests.conftest import BIN_DIR

START_DEADLINE = 60.0


@dataclass(frozen=True)
class ServedHub:
    root: Path
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def admin_token(self) -> str:
        return (self.root / "admin-token").read_text().strip()

    def clock(self) -> float:
        """The subprocess keeps real time."""
        return time.time()

    def request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # verify per request: requests prefers REQUESTS_CA_BUNDLE from the environment over Session.verify
        kwargs.setdefault("verify", str(self.ca))
        return self.http.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.request(method, path, token=self.admin_token, **kwargs)

    def stop(self) -> str:
        """SIGTERM, wait for a clean exit, and return everything the server printed."""
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.log.read_text()
        return self.log.read_text()


def wait_for_url(root: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    """DIR/url once `serve` listens, polled with a deadline; fails at once if the server exits."""
    url_file = HubHome(root).url_file
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if url_file.is_file() and (text := url_file.read_text().strip()):
            return text
        assert process.poll() is None, f"serve exited with {process.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {url_file} within {START_DEADLINE} s: {log.read_text()}"
        time.sleep(0.02)


@contextmanager
def serving(root: Path, *options: str) -> Iterator[ServedHub]:
    """`mers-hub serve ROOT --port 0 OPTIONS`, stopped (SIGTERM) when the block ends if still running."""
    log = root.parent / f"{root.name}-serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(BIN_DIR / "mers-hub"), "serve", str(root), "--port", "0", *options],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    http = requests.Session()
    try:
        yield ServedHub(root, wait_for_url(root, process, log), process, log, http)
    finally:
        http.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

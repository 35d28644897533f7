"""Benchmark the hub: many agents onboarding at once, and blob downloads against `openssl s_server`.

1. `mers-hub init` and `mers-hub serve --port 0` (real subprocesses, TLS on 127.0.0.1);
2. the admin creates N agents (some RSA_3072, the rest SHARED_SECRET) and fetches their boarding
   configurations (not timed);
3. N simulated agents (threads), all released at once, each register with its IAT and fetch an access
   token with a client assertion, as a gateway does after the factory; every request's latency is kept;
4. a random image of the given size is signed with `mers-sign`, its key trusted, the image uploaded and an
   installation task created; the agent's task carries the signed URL. `curl` downloads it from the hub,
   and in the same run the same file from `openssl s_server -WWW` with the hub's own certificate over
   TLS on loopback (the peer: OpenSSL's TLS with no application in the way). Best of `--repeat` each.

Targets (issue 4): no errors under the load; the hub's blob throughput at least half of openssl's.
This is a report, not a test: it exits 0 whatever the numbers say, non-zero only when a command fails.
Loopback only; every loop is bounded. Run it on an otherwise idle machine.

    .venv/bin/python bench/hub_load.py [--agents 200] [--rsa-agents 20] [--blob-mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from sign_verify import BenchError, CommandFailedError, Row, ToolMissingError, positive_int

AGENTS = "/api/agentmanagement/v3"
FIRMWARE = "/api/firmwaredeployment/v3"
BLOB_TARGET_RATIO = 0.5
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
BIN_DIR = Path(sys.executable).parent
_MIB = 1 << 20


@dataclass(frozen=True)
class Hub:
    url: str
    ca: str
    admin_token: str
    blobs: Path
    server_certificate: Path
    server_key: Path

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(
            method,
            self.url + path,
            headers={"Authorization": f"Bearer {self.admin_token}", **kwargs.pop("headers", {})},
            verify=self.ca,  # per request: requests prefers REQUESTS_CA_BUNDLE over Session.verify
            timeout=REQUEST_TIMEOUT_S,
            **kwargs,
        )
        if response.status_code >= 300:
            raise BenchError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None


@dataclass
class Agent:
    id: str
    profile: str
    iat: str
    private_key: rsa.RSAPrivateKey | None = None
    client_secret: str = ""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: list[str]
    seconds: float
    latencies: list[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def _program(name: str) -> str:
    found = shutil.which(name) or (str(BIN_DIR / name) if (BIN_DIR / name).exists() else None)
    if found is None:
        raise ToolMissingError(f"{name} is not installed")
    return found


def _check(argv: Sequence[str], **kwargs: Any) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, **kwargs)
    if completed.returncode != 0:
        raise CommandFailedError(argv, completed.returncode, completed.stderr)
    output: str = completed.stdout
    return output


@contextmanager
def running_hub(work: Path) -> Iterator[Hub]:
    """`mers-hub init` then `mers-hub serve --port 0` as subprocesses; stopped with SIGTERM at the end."""
    root = work / "hub"
    mers_hub = _program("mers-hub")
    _check([mers_hub, "init", str(root)])
    server = subprocess.Popen(
        [mers_hub, "serve", str(root), "--port", "0", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url_file = root / "url"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not url_file.exists():
            if server.poll() is not None:
                stderr = server.stderr.read().decode() if server.stderr else ""
                raise CommandFailedError(["mers-hub", "serve"], server.returncode, stderr)
            if time.monotonic() > deadline:
                raise BenchError("mers-hub serve did not publish its URL in time")
            time.sleep(0.05)
        yield Hub(
            url=url_file.read_text().strip(),
            ca=str(root / "ca.pem"),
            admin_token=(root / "admin-token").read_text().strip(),
            blobs=root / "blobs",
            server_certificate=root / "server.pem",
            server_key=root / "server-key.pem",
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def create_agents(hub: Hub, count: int, rsa_count: int) -> list[Agent]:
    agents = []
    for index in range(count):
        profile = "RSA_3072" if index < rsa_count else "SHARED_SECRET"
        created = hub.admin(
            "POST", f"{AGENTS}/agents", json={"name": f"load-{index:04d}", "securityProfile": profile}
        )
        config = hub.admin("GET", f"{AGENTS}/agents/{created['id']}/boarding/configuration")
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=3072) if profile == "RSA_3072" else None
        )
        agents.append(Agent(created["id"], profile, config["content"]["iat"], private_key=key))
    return agents


def _register_body(agent: Agent) -> dict[str, Any]:
    if agent.private_key is None:
        return {}
    jwk = RSAAlgorithm.to_jwk(agent.private_key.public_key(), as_dict=True)
    return {"jwks": {"keys": [{**jwk, "kid": "key-1"}]}}


def _assertion(agent: Agent, tenant: str) -> str:
    now = int(time.time())
    claims = {
        "iss": agent.id,
        "sub": agent.id,
        "aud": ["southgate"],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": secrets.token_hex(16),
        "schemas": ["urn:siemens:mindsphere:v1"],
        "ten": tenant,
    }
    if agent.private_key is None:
        return jwt.encode(claims, agent.client_secret, algorithm="HS256")
    return jwt.encode(claims, agent.private_key, algorithm="RS256")


def _onboard(hub: Hub, agent: Agent, latencies: list[float], errors: list[str]) -> str | None:
    """Register then fetch a token; returns the access token, or None after recording the error."""
    session = requests.Session()
    try:
        started = time.perf_counter()
        registered = session.post(
            f"{hub.url}{AGENTS}/register",
            json=_register_body(agent),
            headers={"Authorization": f"Bearer {agent.iat}"},
            verify=hub.ca,
            timeout=REQUEST_TIMEOUT_S,
        )
        latencies.append(time.perf_counter() - started)
        if registered.status_code != 201:
            errors.append(f"register {registered.status_code}: {registered.text[:200]}")
            return None
        agent.client_secret = registered.json().get("client_secret", "")
        tenant = jwt.decode(agent.iat, options={"verify_signature": False}).get("ten", "")
        started = time.perf_counter()
        token = session.post(
            f"{hub.url}{AGENTS}/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": _assertion(agent, tenant),
            },
            verify=hub.ca,
            timeout=REQUEST_TIMEOUT_S,
        )
        latencies.append(time.perf_counter() - started)
        if token.status_code != 200:
            errors.append(f"token {token.status_code}: {token.text[:200]}")
            return None
        access_token: str = token.json()["access_token"]
        return access_token
    except requests.RequestException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        return None
    finally:
        session.close()


def onboard_all(hub: Hub, agents: list[Agent]) -> tuple[LoadResult, dict[str, str]]:
    """Every agent registers and fetches a token, all threads released by one barrier."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens: dict[str, str] = {}
    barrier = threading.Barrier(len(agents) + 1)

    def agent_thread(agent: Agent) -> None:
        barrier.wait()
        token = _onboard(hub, agent, latencies, errors)
        if token is not None:
            tokens[agent.id] = token

    threads = [threading.Thread(target=agent_thread, args=(agent,), daemon=True) for agent in agents]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S * 2)
    seconds = time.perf_counter() - started
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        errors.append(f"{stuck} agents did not finish in time")
    return LoadResult(len(latencies), errors, seconds, latencies), tokens


def signed_blob_url(hub: Hub, work: Path, agent: Agent, access_token: str, size_mib: int) -> tuple[str, Path]:
    """Sign a random image, trust its key, upload it, create a task; return the task's signed URL and
    the blob's path (what openssl serves)."""
    mers_sign = _program("mers-sign")
    payload = work / "payload.bin"
    with payload.open("wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(_MIB))
    _check([mers_sign, "keygen", "-o", str(work / "release.pem")])
    signed = work / "release.bin"
    _check(
        [
            mers_sign,
            "sign",
            "--key",
            str(work / "release.pem"),
            "--version",
            "1.0.0",
            str(payload),
            str(signed),
        ]
    )
    payload.unlink()
    pem = (work / "release.pub.pem").read_text()
    hub.admin("POST", f"{FIRMWARE}/trustedKeys", json={"name": "bench", "pem": pem})
    with signed.open("rb") as body:
        release = hub.admin(
            "POST",
            f"{FIRMWARE}/releases",
            params={"name": "bench"},
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
    signed.unlink()
    task = hub.admin(
        "POST",
        f"{FIRMWARE}/installationTasks",
        json={"deviceId": agent.id, "softwareType": "FIRMWARE", "softwareReleaseId": release["id"]},
    )
    seen = requests.get(
        f"{hub.url}{FIRMWARE}/installationTasks/{task['id']}",
        headers={"Authorization": f"Bearer {access_token}"},
        verify=hub.ca,
        timeout=REQUEST_TIMEOUT_S,
    )
    if seen.status_code != 200:
        raise BenchError(f"the agent could not read its task: {seen.status_code} {seen.text[:200]}")
    uri: str = seen.json()["artifacts"][0]["uri"]
    return uri, hub.blobs / release["sha256"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def openssl_server(hub: Hub, directory: Path) -> Iterator[str]:
    """`openssl s_server -WWW` serving `directory` with the hub's certificate; yields its base URL."""
    port = _free_port()
    server = subprocess.Popen(
        [
            _program("openssl"),
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(hub.server_certificate),
            "-key",
            str(hub.server_key),
            "-WWW",
            "-quiet",
        ],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("openssl s_server did not start") from None
                time.sleep(0.05)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def curl_rate(url: str, ca: str, expected_size: int) -> float:
    """Download `url` to /dev/null with curl; bytes per second as curl measures them."""
    output = _check(
        [
            _program("curl"),
            "--silent",
            "--show-error",
            "--fail",
            "--http1.1",
            "--cacert",
            ca,
            "-o",
            os.devnull,
            "-w",
            "%{size_download} %{speed_download}",
            url,
        ]
    )
    size, speed = output.split()
    if int(float(size)) != expected_size:
        raise BenchError(f"curl received {size} bytes of {expected_size}")
    return float(speed)


def run(agents: int = 200, rsa_agents: int = 20, blob_mib: int = 256, repeat: int = 3) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="mers-hub-bench-") as temporary:
        work = Path(temporary)
        with running_hub(work) as hub:
            population = create_agents(hub, agents, min(rsa_agents, agents))
            load, tokens = onboard_all(hub, population)
            for error in load.errors[:10]:
                print(f"hub_load: error under load: {error}", file=sys.stderr)
            if not tokens:
                raise BenchError("no agent onboarded; cannot measure downloads")
            first = next(agent for agent in population if agent.id in tokens)
            uri, blob = signed_blob_url(hub, work, first, tokens[first.id], blob_mib)
            size = blob.stat().st_size
            ours = max(curl_rate(uri, hub.ca, size) for _ in range(repeat))
            with openssl_server(hub, blob.parent) as peer_url:
                peer = max(curl_rate(f"{peer_url}/{blob.name}", hub.ca, size) for _ in range(repeat))
    rate = load.requests / load.seconds if load.seconds else 0.0
    return [
        Row("onboarding errors", float(len(load.errors)), None, None, "0", not load.errors),
        Row("requests per second (register + token)", rate, None, None, "", None),
        Row(
            "p50 latency (s)",
            statistics.median(load.latencies) if load.latencies else 0.0,
            None,
            None,
            "",
            None,
        ),
        Row("p99 latency (s)", load.percentile(0.99), None, None, "", None),
        Row(
            "blob download (MB/s) vs openssl s_server",
            ours / 1e6,
            peer / 1e6,
            ours / peer,
            f">= {BLOB_TARGET_RATIO}",
            ours / peer >= BLOB_TARGET_RATIO,
        ),
    ]


def format_table(rows: Sequence[Row]) -> str:
    header = ("figure", "ours", "peer or limit", "ratio", "target", "met")
    body = [
        (
            row.figure,
            f"{row.ours:.3f}",
            "" if row.peer_or_limit is None else f"{row.peer_or_limit:.1f}",
            "" if row.ratio is None else f"{row.ratio:.2f}",
            row.target,
            "" if row.met is None else ("yes" if row.met else "NO"),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *body)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=positive_int, default=200, help="simulated agents (default 200)")
    parser.add_argument("--rsa-agents", type=int, default=20, help="of which RSA_3072 (default 20)")
    parser.add_argument(
        "--blob-mib", type=positive_int, default=256, help="size of the downloaded blob in MiB (default 256)"
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=3, help="downloads per server, best kept (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = run(args.agents, args.rsa_agents, args.blob_mib, args.repeat)
    except BenchError as error:
        print(f"hub_load: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps([dataclasses.asdict(row) for row in rows], indent=2) if args.json else format_table(rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

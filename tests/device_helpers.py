"""Helpers for the device client's tests: a simulated board holding a real hub's boarding data, fast
retry settings, misbehaving TLS servers and an authenticating CONNECT proxy on 127.0.0.1, and a driver
that runs the client in a process of its own (`tests.forked_process`) and can SIGKILL itself at a
renewal step."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from board.interface import BoardingData, Identity
from board.simboard import SimBoard
from hub.tls import create_tls_material
from mers.client import ClientSettings, DeviceClient, RenewalStep
from mers.clock import HubClock
from mers.credentials import load_credentials
from mers.http import HttpSettings
from tests.board_helpers import der
from tests.hub_helpers import HubAPI, RunningHub, boarding_configuration, create_agent

FAST_HTTP = HttpSettings(
    connect_timeout=2.0,
    read_timeout=2.0,
    retries=2,
    backoff_factor=0.01,
    backoff_max=0.05,
    backoff_jitter=0.01,
)
FAST = ClientSettings(http=FAST_HTTP)
DAY = 24 * 3600.0
BUSY_RETRY_AFTER = 5  # seconds, the `busy` bad server's Retry-After: far above FAST_HTTP.backoff_max
PROFILES = ("SHARED_SECRET", "RSA_3072")


@dataclass
class Gateway:
    """A simulated board with boarding data for agent `agent_id` of a hub."""

    board: SimBoard
    agent_id: str
    hub: HubAPI

    @property
    def path(self) -> Path:
        return self.board.directory

    def client(self, *, skew: float = 0.0, **options: Any) -> DeviceClient:
        """A client of this board whose wall and monotonic clocks follow the hub's (so time the test
        moves passes on the device too), the wall clock off by `skew` seconds."""
        options.setdefault("settings", FAST)
        hub = self.hub
        options.setdefault("clock", HubClock(lambda: hub.clock() + skew, elapsed=hub.clock))
        return DeviceClient(SimBoard.open(self.path), **options)

    def stored_rat_ids(self) -> set[str]:
        stored = load_credentials(self.board.state)
        assert stored is not None
        sets = [stored.current] + ([stored.previous] if stored.previous else [])
        return {rat_id(item.rat) for item in sets}


def rat_id(rat: str) -> str:
    jti: str = jwt.decode(rat, options={"verify_signature": False})["jti"]
    return jti


def boarding_data(hub: RunningHub, agent_id: str, network: bytes | None = None) -> BoardingData:
    configuration = boarding_configuration(hub, agent_id)
    return BoardingData(json.dumps(configuration).encode(), hub.ca.read_bytes(), network)


def make_gateway(
    hub: RunningHub, directory: Path, profile: str = "SHARED_SECRET", *, network: bytes | None = None
) -> Gateway:
    agent = create_agent(hub, f"gw-{directory.name}", profile)
    board = SimBoard.create(directory, Identity(f"SN-{directory.name}", "Acme", "gw-100", "B"))
    board.write_boarding_data(boarding_data(hub, agent["id"], network))
    return Gateway(board, agent["id"], hub)


def bundle_file(path: Path, hub: RunningHub, agent_id: str) -> Path:
    """The `mers boarding import` bundle for the agent's current boarding configuration."""
    document = {"boardingConfiguration": boarding_configuration(hub, agent_id), "ca": hub.ca.read_text()}
    path.write_text(json.dumps(document))
    return path


def lock_board(board: SimBoard) -> None:
    """Seal the board as the factory does (a trust key first: a lock needs one)."""
    board.write_key(0, der())
    board.lock()


# --- misbehaving TLS servers -------------------------------------------------------------------------


@dataclass
class BadServer:
    """A TLS server on 127.0.0.1 that answers every request with 500, with 503 and `Retry-After: 5`
    (`busy`), with 200 and `{}` but no `Server-Time` (`timeless`), hangs, drops the connection, or cuts
    its answer short after the headers (`cut`; `cut-once` only on the first connection, then answers
    whole), or answers 206 with one byte and the `Content-Range` given (`partial`; `later_range`, if
    given, from the second connection on), or redirects every request to `/elsewhere` (`redirect`), or
    answers the range asked a byte every 0.1 s (`trickle`);
    `connections` counts the attempts the client made, `requests`
    holds their request lines."""

    mode: str
    ca_pem: bytes
    port: int = 0
    connections: int = 0
    requests: list[str] = field(default_factory=list)  # the request line of each
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@contextmanager
def bad_server(
    mode: str, *, content_range: str = "bytes 0-0/1", later_range: str | None = None
) -> Iterator[BadServer]:
    material = create_tls_material(("localhost",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    cert = directory / f"bad-{os.getpid()}-{id(material)}.pem"
    cert.write_bytes(material.server_certificate_pem + material.server_key_pem)
    try:
        context.load_cert_chain(cert)
    finally:
        cert.unlink()
    listener = socket.create_server(("127.0.0.1", 0))
    server = BadServer(mode, material.ca_certificate_pem, listener.getsockname()[1])
    held: list[socket.socket] = []

    def answer(connection: ssl.SSLSocket, status: str, body: bytes, extra: str = "") -> None:
        connection.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}".encode()
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        connection.close()

    def serve_one(raw: socket.socket, number: int) -> None:
        try:
            connection = context.wrap_socket(raw, server_side=True)
            request = connection.recv(65536)
            server.requests.append(request.split(b"\r\n", 1)[0].decode("latin-1"))
            if mode == "timeless":
                answer(connection, "200 OK", b"{}")
            elif mode == "500":
                error = b'{"error": "server_error", "error_description": "the database is down"}'
                answer(connection, "500 Internal Server Error", error)
            elif mode == "busy":
                answer(connection, "503 Service Unavailable", b"{}", f"Retry-After: {BUSY_RETRY_AFTER}\r\n")
            elif mode == "drop":
                connection.close()
            elif mode == "cut" or (mode == "cut-once" and number == 1):
                # the headers promise 100 bytes; the connection drops after 10 of them
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                    + b'{"answer":'
                )
                connection.close()
            elif mode == "cut-once":
                answer(connection, "200 OK", b'{"answer": "whole"}')
            elif mode == "trickle":  # the range asked, a byte every 0.1 s: never a read timeout, never done
                asked = re.search(rb"Range: bytes=(\d+)-(\d+)", request)
                first, last = (int(asked.group(1)), int(asked.group(2))) if asked else (0, 1 << 20)
                connection.sendall(
                    b'HTTP/1.1 206 Partial Content\r\nETag: "1"\r\n'
                    + f"Content-Range: bytes {first}-{last}/{last + 1}\r\n".encode()
                    + f"Content-Length: {last - first + 1}\r\n\r\n".encode()
                )
                while not server._stop.wait(0.1):  # the pace of the trickle, ended with the server
                    connection.sendall(b"x")
                connection.close()
            elif mode == "redirect":  # to another path here, so a client that follows it is seen doing so
                answer(
                    connection, "302 Found", b"{}", f"Location: https://127.0.0.1:{server.port}/elsewhere\r\n"
                )
            elif mode == "partial":
                # latin-1: the encoding http.client reads header values in, so a "²" sent arrives as "²"
                sent = later_range if later_range is not None and number > 1 else content_range
                ranged = f'Content-Range: {sent}\r\nETag: "1"\r\n'.encode("latin-1")
                connection.sendall(
                    b"HTTP/1.1 206 Partial Content\r\n" + ranged + b"Content-Length: 1\r\n\r\nx"
                )
                connection.close()
            else:  # hang: hold the connection open, say nothing
                held.append(connection)
        except (OSError, ssl.SSLError):
            pass

    def accept_loop() -> None:
        while not server._stop.is_set():
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                raw, _ = listener.accept()
                server.connections += 1
                threading.Thread(target=serve_one, args=(raw, server.connections), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._stop.set()
        thread.join(timeout=5)
        listener.close()
        for connection in held:
            connection.close()


def redirect_credentials_to(gateway: Gateway, url: str, ca_pem: bytes) -> None:
    """Point the stored credentials (base URL, registration URI, CA) at another server, as if the hub's
    address now led there."""
    path = gateway.board.state.directory / "credentials.json"
    document = json.loads(path.read_bytes())
    base = document["baseUrl"]
    document["baseUrl"] = url
    document["boarding"]["ca"] = base64.b64encode(ca_pem).decode()
    for name in ("current", "previous"):
        if document[name]:
            document[name]["registrationClientUri"] = document[name]["registrationClientUri"].replace(
                base, url
            )
    gateway.board.state.write("credentials.json", json.dumps(document).encode())


# --- an HTTP CONNECT proxy with basic authentication ---------------------------------------------------


@dataclass
class Proxy:
    port: int
    username: str
    password: str
    tunnels: list[str] = field(default_factory=list)
    refused: int = 0


@contextmanager
def connect_proxy(username: str = "gw", password: str = "s3cret:pass") -> Iterator[Proxy]:
    """A CONNECT proxy on 127.0.0.1 that demands `Proxy-Authorization: Basic`, and records tunnels."""
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = Proxy(listener.getsockname()[1], username, password)
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    stop = threading.Event()

    def pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                if stop.is_set():
                    return
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def handle(client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if method != "CONNECT" or headers.get("proxy-authorization") != expected:
            proxy.refused += 1
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        proxy.tunnels.append(target)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pump(client, upstream)

    def accept_loop() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                client, _ = listener.accept()
                threading.Thread(target=handle, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# --- the driver: the client as a real process -----------------------------------------------------------


def renewal_driver(argv: list[str]) -> int:
    """`BOARD [--kill-at STEP]` (in a process of its own, `tests.forked_process`): get an access token
    (renewing when due) and print it; with --kill-at, SIGKILL this process when the renewal reaches STEP."""
    parser = argparse.ArgumentParser()
    parser.add_argument("board", type=Path)
    parser.add_argument("--kill-at", choices=[step.value for step in RenewalStep])
    args = parser.parse_args(argv)

    def hook(step: RenewalStep) -> None:
        if args.kill_at == step.value:
            os.kill(os.getpid(), signal.SIGKILL)

    with DeviceClient(SimBoard.open(args.board), settings=FAST, clock=HubClock(), step_hook=hook) as client:
        print(client.access_token())
    return 0

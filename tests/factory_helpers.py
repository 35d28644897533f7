"""Test helpers for the factory station: key and CA files, batch files, simulated boards served by
`mers-board sim serve` on real pseudo-terminals, and the station as a library or as the CLI."""

from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from board import protocol as wire
from board.simboard import SimBoard
from factory.boarding_source import AGENTS, BatchSource, BoardingSource, canonical_json
from factory.records import Records
from factory.station import Event, Station, StationConfig
from hub.tls import create_tls_material
from signing.keys import KeyAlgorithm, PublicKey
from tests.board_helpers import ca_bundle
from tests.conftest import BIN_DIR, CliResult, run_cli
from tests.console_helpers import ConsoleProcess, new_board
from tests.signing_helpers import signer_for

DAY = 86400


@dataclass(frozen=True)
class StationFiles:
    """The files a station is given: trust keys (public PEM) and the CA the device will trust."""

    keys: tuple[Path, ...]
    public_keys: tuple[PublicKey, ...]
    device_ca: Path

    @property
    def ca_bytes(self) -> bytes:
        return self.device_ca.read_bytes()


def station_files(directory: Path, key_count: int = 1) -> StationFiles:
    directory.mkdir(parents=True, exist_ok=True)
    paths, keys = [], []
    for index in range(key_count):
        public = signer_for(KeyAlgorithm.ECDSA_P256, index).public_key
        path = directory / f"trust{index}.pub.pem"
        path.write_bytes(public.pem())
        paths.append(path)
        keys.append(public)
    ca = directory / "device-ca.pem"
    ca.write_bytes(ca_bundle())
    return StationFiles(tuple(paths), tuple(keys), ca)


def boarding_document(serial: str, *, expires: float | None = None, jti: str | None = None) -> dict[str, Any]:
    """A boarding configuration as the hub exports it, with an IAT for agent ``agent-<serial>``."""
    client_id = f"agent-{serial}"
    claims = {
        "sub": client_id,
        "exp": int(expires if expires is not None else time.time() + 7 * DAY),
        "jti": jti or uuid.uuid4().hex,
    }
    token = jwt.encode(claims, "a hub secret that is long enough to sign", algorithm="HS256")
    return {
        "content": {
            "baseUrl": "https://hub.example:8443",
            "iat": token,
            "clientCredentialProfile": ["SHARED_SECRET"],
            "clientId": client_id,
            "tenant": "factory",
        },
        "expiration": "2033-05-18T03:33:20.000Z",
    }


def write_batch(path: Path, documents: dict[str, dict[str, Any]]) -> Path:
    lines = [
        json.dumps({"serial": serial, "agentId": None, "boarding": doc}) for serial, doc in documents.items()
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def batch_for(path: Path, *serials: str, expires: float | None = None) -> Path:
    return write_batch(path, {serial: boarding_document(serial, expires=expires) for serial in serials})


def make_board(directory: Path, serial: str) -> Path:
    return new_board(directory, serial)


@contextlib.contextmanager
def served_boards(directory: Path, serials: list[str], *options: str) -> Iterator[list[ConsoleProcess]]:
    """One `mers-board sim serve` process per serial number, each on its own pty."""
    with contextlib.ExitStack() as stack:
        consoles = [
            stack.enter_context(ConsoleProcess(make_board(directory / serial, serial), *options))
            for serial in serials
        ]
        yield consoles


def board_state(board_dir: Path) -> tuple[bool, tuple[bytes | None, ...], bytes | None]:
    """(locked, key hashes, config bytes) as the board's storage holds them."""
    board = SimBoard.open(board_dir)
    data = board.boarding_data()
    return (
        board.is_locked(),
        tuple(slot.key_hash for slot in board.key_slots()),
        (None if data is None else data.config),
    )


def assert_consistent(board_dir: Path, files: StationFiles, config: bytes) -> bool:
    """Never locked with mismatched data: either unlocked, or locked over exactly the station's data.
    Returns whether it is locked."""
    locked, key_hashes, stored = board_state(board_dir)
    if locked:
        assert key_hashes[0] == files.public_keys[0].key_hash
        assert stored == config
    return locked


def station(
    files: StationFiles,
    source: BoardingSource,
    records: Records,
    events: list[Event] | None = None,
    **options: Any,
) -> Station:
    config = StationConfig(keys=files.public_keys, device_ca=files.ca_bytes, **options)
    sink = events.append if events is not None else (lambda event: None)
    return Station(config, source, records, sink)


def batch_source(path: Path) -> BatchSource:
    return BatchSource.load(path)


def factory(*args: str | Path, **kwargs: Any) -> CliResult:
    return run_cli("mers-factory", *args, **kwargs)


#: sets RLIMIT_FSIZE, then becomes the command (no preexec_fn in a threaded pytest process)
_FSIZE_LAUNCHER = """
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


def factory_with_file_size_limit(limit: int, *args: str | Path) -> CliResult:
    """`mers-factory ARGS` as a real process whose writes past byte `limit` of any file fail with EFBIG
    (RLIMIT_FSIZE: the kernel's own failure, as a full disk gives; Python ignores SIGXFSZ)."""
    program = str(BIN_DIR / "mers-factory")
    completed = subprocess.run(
        [sys.executable, "-c", _FSIZE_LAUNCHER, str(limit), program, *map(str, args)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    return CliResult(
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )


def provision_args(files: StationFiles, records: Path | str, *ports: str) -> list[str | Path]:
    """`provision` appending to `records`. A SQLite file is started here if it is missing, as a line's
    first run with --new-records would: the station's stderr then holds only what the test looks for."""
    if "://" not in str(records):
        Records.open(str(records), create=True).close()
    args: list[str | Path] = ["provision", "--records", str(records)]
    for port in ports:
        args += ["--port", port]
    for key in files.keys:
        args += ["--key", key]
    return args


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def expected_digest(serial: str, files: StationFiles, document: dict[str, Any]) -> bytes:
    hashes = wire.BoardingHashes.of(canonical_json(document), files.ca_bytes, None)
    key_hashes: list[bytes | None] = [key.key_hash for key in files.public_keys]
    return wire.lock_digest(serial, key_hashes + [None] * (wire.KEY_SLOTS - len(key_hashes)), hashes)


def age_claims(store: Records, seconds: float) -> None:
    """Time passing without a check-in, as for a station that stopped: every serial claim `seconds`
    older (claim times are the database's, so the test moves them rather than a clock)."""
    with store.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE serial_claims SET "
            f"checked_in_at = checked_in_at - {seconds}, expires_at = expires_at - {seconds}"
        )


# --- a server that is not the hub ---------------------------------------------------------------------


@dataclass
class RecordingServer:
    """What `recording_server` serves: its URL, the CA its certificate chains to (TLS only), and the path
    and Authorization header of every request it received, in order."""

    url: str
    ca: Path
    seen: list[tuple[str, str | None]] = field(default_factory=list)


@contextlib.contextmanager
def recording_server(
    directory: Path, *, tls: bool, redirect_to: str = "", agents: Sequence[str] = ()
) -> Iterator[RecordingServer]:
    """An HTTP server on 127.0.0.1 (over TLS, with a CA of its own, when `tls`) that records every request.
    With `redirect_to`, a request for the agent API is answered 307 to `redirect_to` + its path on the same
    origin (as a proxy in front of several services might). Otherwise it answers like a hub that ignores
    the agent list's name filter: every one of `agents` (names; agent ``agent-<name>``) is listed whatever
    the query (a page at a time, in Spring Data's page shape), each with a fresh `boarding_document` and
    the status NOT_ONBOARDED."""
    directory.mkdir(parents=True, exist_ok=True)
    material = create_tls_material(("localhost",))
    ca = directory / "server-ca.pem"
    ca.write_bytes(material.ca_certificate_pem)
    seen: list[tuple[str, str | None]] = []

    def answer_for(path: str) -> object:
        route = path.split("?", maxsplit=1)[0].removeprefix(AGENTS).split("/")
        if route == ["", "agents"]:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
            number, size = int(query.get("page", ["0"])[0]), int(query.get("size", ["20"])[0])
            listed = [{"id": f"agent-{name}", "name": name} for name in agents]
            pages = max(1, -(-len(listed) // size))
            content = listed[number * size : (number + 1) * size]
            return {"content": content, "number": number, "totalPages": pages, "last": number >= pages - 1}
        if route[3:] == ["boarding", "configuration"]:
            return boarding_document(route[2].removeprefix("agent-"))
        return {"status": "NOT_ONBOARDED"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            if redirect_to and self.path.startswith(AGENTS):
                self.send_response(307)
                self.send_header("Location", redirect_to + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps(answer_for(self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        chain = directory / "server.pem"
        chain.write_bytes(material.server_certificate_pem + material.server_key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield RecordingServer(f"{scheme}://127.0.0.1:{server.server_address[1]}", ca, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)

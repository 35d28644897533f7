"""Benchmark the factory station against the serial line's own limit, and 8 boards against one.

1. creates simulated boards and serves each with `mers-board sim serve DIR --json --baud B` (a real
   subprocess on a real pseudo-terminal, paced at B baud both ways: a pty alone ignores the baud rate);
2. provisions one board with the station (the library `factory.station.Station`, as `mers-factory
   provision` runs it) from a batch of boarding configurations, with an RSA-3072 trust key and a real
   CA certificate, and counts the bytes that crossed the line both ways;
3. provisions 8 other boards at once, one port each, as one `provision --port ... --port ...` run.

Figures: seconds for one board against the wire-time minimum (bytes on the wire x 10 / baud: 8N1, and the
protocol is half-duplex, one request in flight), and the wall time of 8 boards in parallel against one.
Targets (issue 5): one board within 1.5x the wire minimum plus 0.5 s; 8 boards within 1.5x one board.
This is a report, not a test: it exits 0 whatever the numbers say, non-zero only when provisioning fails.

    .venv/bin/python bench/provision.py [--baud 115200] [--boards 8] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hub_load import format_table
from sign_verify import BenchError, Row, ToolMissingError, positive_int

from board.interface import Identity
from board.simboard import SimBoard
from factory.boarding_source import BatchSource, canonical_json
from factory.records import Records
from factory.station import Result, Station, StationConfig
from signing.keys import KeyAlgorithm, PublicKey, generate_private_key

ONE_BOARD_RATIO = 1.5
ONE_BOARD_SLACK_S = 0.5
PARALLEL_RATIO = 1.5
START_TIMEOUT_S = 30.0


class ProvisioningFailedError(BenchError):
    """A board was not provisioned: the figures would mean nothing."""


def _ca_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench hub CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _batch_line(serial: str, signing_key: rsa.RSAPrivateKey) -> str:
    """A boarding configuration shaped like the hub's, with an RS256 IAT."""
    client_id = f"{uuid.uuid4().hex}"
    claims = {
        "sub": client_id,
        "exp": int(time.time()) + 7 * 86400,
        "jti": uuid.uuid4().hex,
        "ten": "factory",
    }
    token = jwt.encode(claims, signing_key, algorithm="RS256")
    document = {
        "content": {
            "baseUrl": "https://hub.example.com:8443",
            "iat": token,
            "clientCredentialProfile": ["RSA_3072"],
            "clientId": client_id,
            "tenant": "factory",
        },
        "expiration": "2033-05-18T03:33:20.000Z",
    }
    return json.dumps(
        {"serial": serial, "agentId": client_id, "boarding": json.loads(canonical_json(document))}
    )


@contextmanager
def _served(board_dir: Path, baud: int) -> Iterator[str]:
    """`mers-board sim serve` for one board; yields its pty path."""
    program = Path(sys.executable).parent / "mers-board"
    if not os.access(program, os.X_OK):
        raise ToolMissingError(f"mers-board is not installed next to {sys.executable} (pip install -e .)")
    process = subprocess.Popen(
        [str(program), "sim", "serve", str(board_dir), "--json", "--baud", str(baud)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
        if not line:
            raise BenchError(f"mers-board sim serve {board_dir} did not start")
        yield str(json.loads(line)["port"])
    finally:
        process.terminate()
        process.wait(20)
        if process.stdout is not None:
            process.stdout.close()


def _check(results: Sequence[Result]) -> None:
    for result in results:
        if result.error is not None:
            raise ProvisioningFailedError(f"{result.port}: {result.error}")


def run(baud: int = 115200, boards: int = 8, repeat: int = 3) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="mers-bench-provision-") as work:
        root = Path(work)
        serials = [f"BENCH-{index:04d}" for index in range(repeat * (boards + 1))]
        batch = root / "batch.jsonl"
        hub_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        batch.write_text("".join(_batch_line(serial, hub_key) + "\n" for serial in serials))
        for serial in serials:
            SimBoard.create(root / serial, Identity(serial, "Acme", "gw-100", "rev B"), slot_size=1 << 16)
        key = PublicKey(generate_private_key(KeyAlgorithm.RSA3072).public_key())
        config = StationConfig(keys=(key,), device_ca=_ca_certificate(), baud=baud, station="bench")
        records = Records.open(str(root / "records.db"), create=True)
        station = Station(config, BatchSource.load(batch), records)
        one: list[tuple[float, int]] = []
        parallel: list[float] = []
        try:
            for round_ in range(repeat):
                group = serials[round_ * (boards + 1) : (round_ + 1) * (boards + 1)]
                with ExitStack() as stack:
                    ports = [stack.enter_context(_served(root / serial, baud)) for serial in group]
                    [single] = station.provision_all(ports[:1])
                    _check([single])
                    one.append((single.seconds, single.bytes_on_wire))
                    started = time.perf_counter()
                    _check(station.provision_all(ports[1:]))
                    parallel.append(time.perf_counter() - started)
        finally:
            records.close()
    seconds, wire_bytes = min(one)
    wire_minimum = wire_bytes * 10 / baud
    best_parallel = min(parallel)
    limit = ONE_BOARD_RATIO * wire_minimum + ONE_BOARD_SLACK_S
    return [
        Row(
            "wire minimum, one board: seconds",
            wire_minimum,
            None,
            None,
            f"{wire_bytes} bytes at {baud} baud",
            None,
        ),
        Row(
            "one board: seconds",
            seconds,
            limit,
            seconds / wire_minimum,
            f"<= {ONE_BOARD_RATIO}x wire + {ONE_BOARD_SLACK_S} s",
            seconds <= limit,
        ),
        Row(
            f"{boards} boards in parallel: seconds",
            best_parallel,
            PARALLEL_RATIO * seconds,
            best_parallel / seconds,
            f"<= {PARALLEL_RATIO}x one board",
            best_parallel <= PARALLEL_RATIO * seconds,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--baud", type=positive_int, default=115200, help="line speed (default 115200)")
    parser.add_argument("--boards", type=positive_int, default=8, help="boards in parallel (default 8)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="rounds, best kept (default 3)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = run(args.baud, args.boards, args.repeat)
    except BenchError as error:
        print(f"provision: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps([dataclasses.asdict(row) for row in rows], indent=2) if args.json else format_table(rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

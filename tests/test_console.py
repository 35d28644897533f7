"""The provisioning console end to end: a simulated board served on a real pty, driven by an independent
MCUmgr client (smpclient) for the OS group and by a small SMP client of our own for the provisioning group.

The helpers (boarding data, the test client, consoles in a thread or a subprocess) are in
`tests/console_helpers.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import serial
from smp import header as smp_header
from smp import packet as smp_packet
from smp.os_management import EchoWriteResponse, MCUMgrParametersReadResponse, ResetWriteResponse
from smpclient import SMPClient
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead, ResetWrite
from smpclient.transport.serial import SMPSerialTransport

from board import protocol as wire
from board.console import ProvisioningService
from board.simboard import SimBoard
from signing.keys import KeyAlgorithm
from tests.board_helpers import ca_bundle
from tests.conftest import run_cli
from tests.console_helpers import (
    IAT_EXPIRY,
    REPO,
    ConsoleProcess,
    SmpTestClient,
    boarding,
    boarding_config,
    client_for,
    console_in_thread,
    keystore_bytes,
    lock_body,
    new_board,
    read_line,
    station_digest,
    trust_key,
    upload_boarding,
    write_boarding,
    write_key,
)
from tests.signing_helpers import signer_for

# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
def board_dir(tmp_path: Path) -> Path:
    return new_board(tmp_path / "board")


@pytest.fixture
def client(board_dir: Path) -> Iterator[SmpTestClient]:
    with console_in_thread(board_dir) as path, client_for(path) as station:
        yield station


# --- conformance with an independent MCUmgr client -----------------------------------------------------


def run_smpclient(port: str, *requests: Any) -> list[Any]:
    async def session() -> list[Any]:
        async with SMPClient(SMPSerialTransport(), port, timeout_s=5) as smp_client:
            return [await smp_client.request(request, timeout_s=5) for request in requests]

    return asyncio.run(session())


def test_smpclient_echoes_and_reads_the_mcumgr_parameters_of_a_served_board(board_dir):
    with ConsoleProcess(board_dir) as console:
        echo, parameters = run_smpclient(console.port, EchoWrite(d="hello board"), MCUMgrParametersRead())
        assert console.stop() == 0
    assert isinstance(echo, EchoWriteResponse)
    assert echo.r == "hello board"
    assert isinstance(parameters, MCUMgrParametersReadResponse)
    assert (parameters.buf_size, parameters.buf_count) == (wire.BUFFER_SIZE, wire.BUFFER_COUNT)


def test_smpclient_sizes_its_messages_from_our_buffer_and_a_full_one_is_answered(board_dir):
    text = "e" * (wire.MAX_MESSAGE_SIZE - 40)  # many lines, close to what smpclient will send
    with console_in_thread(board_dir) as path:
        (echo,) = run_smpclient(path, EchoWrite(d=text))
    assert isinstance(echo, EchoWriteResponse)
    assert echo.r == text


def test_a_reset_is_answered_first_and_then_reboots_the_board(board_dir):
    with console_in_thread(board_dir) as path:
        (reset,) = run_smpclient(path, ResetWrite())
        with client_for(path) as station:
            assert station.echo("after reset") == "after reset"
    assert isinstance(reset, ResetWriteResponse)
    assert SimBoard.open(board_dir).reboot_requested()


def test_the_console_serves_every_command_of_the_protocol_with_its_op(board_dir):
    routes = ProvisioningService(SimBoard.open(board_dir)).routes()
    assert {key: route.op for key, route in routes.items()} == {
        (command.group, command.command): command.op for command in wire.COMMANDS
    }


# --- info and provisioning --------------------------------------------------------------------------------


def test_a_fresh_board_tells_its_identity_and_that_nothing_is_written(client):
    info = client.info()
    assert (info.serial_number, info.vendor, info.image_class, info.hardware_revision) == (
        "GW-0001",
        "Acme",
        "gw-100",
        "rev B",
    )
    assert info.protocol == wire.PROTOCOL_VERSION
    assert not info.locked
    assert info.slots == (wire.SlotInfo(wire.SlotState.EMPTY),) * 3
    assert info.boarding is None
    assert info.digest is None


def test_a_board_is_provisioned_read_back_and_locked_over_the_digest_the_station_computed(client, board_dir):
    key = trust_key()
    written = write_key(client, 0, key)
    assert written == wire.WriteKeyResponse(0, hashlib.sha256(key).digest())
    data = boarding()
    assert write_boarding(client, data).hashes == data.hashes()

    info = client.info()
    assert info.slots[0] == wire.SlotInfo(wire.SlotState.WRITTEN, hashlib.sha256(key).digest())
    assert info.boarding == wire.BoardingInfo(data.hashes(), "agent-1", IAT_EXPIRY)
    digest = station_digest("GW-0001", [key, None, None], data)
    assert info.digest == digest == wire.lock_digest_of(info)
    assert not info.locked

    locked = wire.LockResponse.from_cbor(client.ok(wire.LOCK, lock_body(digest)))
    assert locked == wire.LockResponse(digest, True)
    assert client.info().locked
    assert SimBoard.open(board_dir).is_locked()


def test_the_same_key_again_is_a_success_that_changes_nothing(client, board_dir):
    write_key(client, 1, trust_key())
    before = keystore_bytes(board_dir)
    assert write_key(client, 1, trust_key()).key_hash == hashlib.sha256(trust_key()).digest()
    assert keystore_bytes(board_dir) == before


def test_another_key_in_a_written_slot_is_refused_as_write_once(client):
    write_key(client, 0, trust_key(0))
    error = client.refused(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(0, trust_key(1)).to_cbor())
    assert (error.group, error.rc) == (64, wire.ProvisioningRc.SLOT_OCCUPIED)
    assert client.info().slots[0].key_hash == hashlib.sha256(trust_key(0)).digest()


def test_the_same_key_in_a_second_slot_is_refused(client):
    write_key(client, 0, trust_key())
    error = client.refused(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(2, trust_key()).to_cbor())
    assert error.rc == wire.ProvisioningRc.DUPLICATE_KEY


INVALID_KEYS: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"not a key",
    "empty": lambda: b"",
    "truncated DER": lambda: trust_key()[:-5],
}


@pytest.mark.parametrize("case", list(INVALID_KEYS))
def test_bytes_that_are_not_a_public_key_are_refused_and_nothing_is_written(client, board_dir, case):
    key = INVALID_KEYS[case]()
    before = keystore_bytes(board_dir)
    error = client.refused(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(0, key).to_cbor())
    assert error.rc == wire.ProvisioningRc.INVALID_KEY
    assert keystore_bytes(board_dir) == before


def test_a_key_in_pem_form_is_refused_because_its_hash_would_never_match_an_image(client, board_dir):
    pem = signer_for(KeyAlgorithm.ECDSA_P256, 0).public_key.pem()
    error = client.refused(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(0, pem).to_cbor())
    assert error.rc == wire.ProvisioningRc.INVALID_KEY


def test_a_key_that_does_not_hash_to_the_stations_key_hash_is_refused_before_it_is_burned(client, board_dir):
    before = keystore_bytes(board_dir)
    request = wire.WriteKeyRequest(0, trust_key(0), hashlib.sha256(trust_key(1)).digest())
    error = client.refused(wire.WRITE_KEY, request.to_cbor())
    assert error.rc == wire.ProvisioningRc.KEY_HASH_MISMATCH
    assert keystore_bytes(board_dir) == before


def test_a_slot_that_does_not_exist_is_refused(client):
    error = client.refused(wire.WRITE_KEY, wire.WriteKeyRequest.for_key(3, trust_key()).to_cbor())
    assert error.rc == wire.ProvisioningRc.INVALID_SLOT


def test_boarding_data_is_validated_on_the_board_and_refused_data_writes_nothing(client, board_dir):
    before = keystore_bytes(board_dir)
    cases = {
        "iat for another agent": wire.WriteBoardingRequest(
            boarding_config(subject="someone-else"), ca_bundle()
        ),
        "unknown profile": wire.WriteBoardingRequest(
            boarding_config(clientCredentialProfile=["PASSWORD"]), ca_bundle()
        ),
        "malformed baseUrl": wire.WriteBoardingRequest(
            boarding_config(baseUrl="https://[hub.example"), ca_bundle()
        ),
        "not json": wire.WriteBoardingRequest(b"{nope", ca_bundle()),
        "no certificate": wire.WriteBoardingRequest(boarding_config(), b"-----BEGIN NOTHING-----"),
        "network not json": wire.WriteBoardingRequest(boarding_config(), ca_bundle(), b"proxy=1"),
    }
    for name, request in cases.items():
        error = client.refused(wire.WRITE_BOARDING, request.to_cbor())
        assert error.rc == wire.ProvisioningRc.INVALID_BOARDING, name
        assert error.reason, name
    assert keystore_bytes(board_dir) == before
    assert client.info().boarding is None


def test_boarding_data_can_be_replaced_until_the_lock_and_the_same_data_changes_nothing(client, board_dir):
    write_boarding(client, boarding("agent-1"))
    second = boarding("agent-2", network=None)
    assert write_boarding(client, second).hashes == second.hashes()
    before = keystore_bytes(board_dir)
    write_boarding(client, second)
    assert keystore_bytes(board_dir) == before
    info = client.info()
    assert info.boarding is not None and info.boarding.client_id == "agent-2"


def test_boarding_data_uploaded_in_chunks_is_committed_like_the_whole_form(client):
    data = boarding()
    answer = upload_boarding(client, data, 64)
    assert answer.hashes == data.hashes()
    assert answer.off == len(data.to_cbor())
    info = client.info()
    assert info.boarding is not None and info.boarding.hashes == data.hashes()


def test_a_resent_chunk_is_harmless_and_a_chunk_from_too_far_ahead_is_told_where_to_resume(client):
    chunks = boarding().chunks(100)
    first = wire.WriteBoardingResponse.from_cbor(client.ok(wire.WRITE_BOARDING, chunks[0].to_cbor()))
    assert first == wire.WriteBoardingResponse(None, off=100)
    ahead = wire.WriteBoardingResponse.from_cbor(client.ok(wire.WRITE_BOARDING, chunks[2].to_cbor()))
    assert ahead == wire.WriteBoardingResponse(None, off=100)
    for chunk in [chunks[1], chunks[1], *chunks[2:]]:  # the first answer was "lost": resent
        answer = wire.WriteBoardingResponse.from_cbor(client.ok(wire.WRITE_BOARDING, chunk.to_cbor()))
    assert answer.hashes == boarding().hashes()
    # the last chunk again (its answer lost): committed again, which changes nothing
    again = wire.WriteBoardingResponse.from_cbor(client.ok(wire.WRITE_BOARDING, chunks[-1].to_cbor()))
    assert again.hashes == boarding().hashes()


def test_a_chunk_without_an_upload_in_progress_is_told_to_start_at_zero(client):
    chunk = boarding().chunks(100)[1]
    answer = wire.WriteBoardingResponse.from_cbor(client.ok(wire.WRITE_BOARDING, chunk.to_cbor()))
    assert answer == wire.WriteBoardingResponse(None, off=0)


def test_an_upload_that_does_not_hash_to_its_announced_sha_is_discarded(client, board_dir):
    chunks = boarding().chunks(100)
    first = wire.WriteBoardingChunk(0, chunks[0].data, chunks[0].total, hashlib.sha256(b"other").digest())
    before = keystore_bytes(board_dir)
    for chunk in [first, *chunks[1:-1]]:
        client.ok(wire.WRITE_BOARDING, chunk.to_cbor())
    error = client.refused(wire.WRITE_BOARDING, chunks[-1].to_cbor())
    assert error.rc == wire.ProvisioningRc.UPLOAD_MISMATCH
    assert keystore_bytes(board_dir) == before


def test_an_upload_larger_than_the_limit_is_refused_at_its_first_chunk(client):
    chunk = wire.WriteBoardingChunk(0, b"x", wire.MAX_BOARDING_SIZE + 1)
    assert client.refused(wire.WRITE_BOARDING, chunk.to_cbor()).rc == wire.ProvisioningRc.UPLOAD_TOO_LARGE


def test_a_chunk_running_past_the_announced_length_is_refused(client):
    chunk = wire.WriteBoardingChunk(0, b"0123456789", 4)
    assert client.refused(wire.WRITE_BOARDING, chunk.to_cbor()).rc == wire.GenericRc.EINVAL


def test_lock_needs_a_key_and_boarding_data(client, board_dir):
    digest = station_digest("GW-0001", [None, None, None], boarding())
    assert client.refused(wire.LOCK, lock_body(digest)).rc == wire.ProvisioningRc.NOT_READY
    write_key(client, 0, trust_key())
    assert client.refused(wire.LOCK, lock_body(digest)).rc == wire.ProvisioningRc.NOT_READY
    assert not SimBoard.open(board_dir).is_locked()


def test_lock_with_a_digest_over_other_data_is_refused_and_the_board_stays_open(client, board_dir):
    write_key(client, 0, trust_key())
    write_boarding(client, boarding())
    cases = [
        station_digest("GW-0001", [trust_key(1), None, None], boarding()),  # another key
        station_digest("GW-0001", [trust_key(), None, None], boarding("agent-9")),  # other boarding data
        station_digest("GW-0002", [trust_key(), None, None], boarding()),  # another board
    ]
    for digest in cases:
        assert client.refused(wire.LOCK, lock_body(digest)).rc == wire.ProvisioningRc.DIGEST_MISMATCH
    assert not SimBoard.open(board_dir).is_locked()


def provision_and_lock(client: SmpTestClient) -> bytes:
    write_key(client, 0, trust_key())
    write_boarding(client, boarding())
    digest = station_digest("GW-0001", [trust_key(), None, None], boarding())
    client.ok(wire.LOCK, lock_body(digest))
    return digest


def test_locking_twice_with_the_same_digest_is_a_success_that_changes_nothing(client, board_dir):
    digest = provision_and_lock(client)
    before = keystore_bytes(board_dir)
    assert wire.LockResponse.from_cbor(client.ok(wire.LOCK, lock_body(digest))).digest == digest
    assert keystore_bytes(board_dir) == before
    other = station_digest("GW-0001", [trust_key(1), None, None], boarding())
    assert client.refused(wire.LOCK, lock_body(other)).rc == wire.ProvisioningRc.LOCKED


def test_after_the_lock_every_write_is_refused_and_nothing_changes(client, board_dir):
    provision_and_lock(client)
    before = keystore_bytes(board_dir)
    writes = [
        (wire.WRITE_KEY, wire.WriteKeyRequest.for_key(1, trust_key(1)).to_cbor()),
        (wire.WRITE_KEY, wire.WriteKeyRequest.for_key(0, trust_key()).to_cbor()),
        (wire.WRITE_BOARDING, boarding("agent-2").to_cbor()),
        (wire.WRITE_BOARDING, boarding("agent-2").chunks(64)[0].to_cbor()),
    ]
    for command, body in writes:
        assert client.refused(command, body).rc == wire.ProvisioningRc.LOCKED
    assert keystore_bytes(board_dir) == before
    assert client.info().locked


def test_a_version_1_client_gets_the_group_error_as_a_user_rc(client):
    answer, error = client.call(
        wire.WRITE_KEY, wire.WriteKeyRequest.for_key(9, trust_key()).to_cbor(), version=smp_header.Version.V1
    )
    assert answer["rc"] == 256 + wire.ProvisioningRc.INVALID_SLOT
    assert error == wire.ErrorReply(wire.ProvisioningRc.INVALID_SLOT, 64, answer["rsn"])


# --- the commands --------------------------------------------------------------------------------------


def test_sim_serve_prints_only_the_device_path_and_stops_cleanly_on_sigterm(board_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "board.console_cli", "serve", str(board_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    path = read_line(process.stdout, time.monotonic() + 30).decode().strip()
    assert path.startswith("/dev/pts/")
    with client_for(path) as station:
        assert station.echo("plain") == "plain"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert out == b"" and err == b""


def test_sim_serve_json_names_the_port_pid_and_board(board_dir):
    with ConsoleProcess(board_dir) as console:
        assert console.announcement == {
            "port": console.port,
            "pid": console.pid,
            "board": str(board_dir.absolute()),
        }
        assert console.stop() == 0


def test_sim_serve_of_a_directory_that_is_no_board_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "board.console_cli", "serve", str(tmp_path / "empty")],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == b""
    (line,) = completed.stderr.decode().splitlines()
    assert line.startswith("mers-board: error: [directory]")


@contextlib.contextmanager
def raw_pty() -> Iterator[tuple[int, str]]:
    """A pty pair where the test holds the master (the station's side) and the console opens the slave."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_console_serves_a_serial_device_opened_by_path(board_dir):
    with raw_pty() as (master, path):
        process = subprocess.Popen(
            [sys.executable, "-m", "board.console_cli", "console", str(board_dir), "--port", path],
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        try:
            message = wire.encode_request(wire.ECHO, 5, wire.EchoRequest("over the device").to_cbor())
            frame = b"".join(wire.frame_lines(message))
            answer = b""
            deadline = time.monotonic() + 30
            # the console may not have opened the device yet: ask again until it answers
            while b"\n" not in answer and time.monotonic() < deadline:
                os.write(master, frame)
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    answer += os.read(master, 4096)
            decoder = smp_packet.decode()
            next(decoder)
            with pytest.raises(StopIteration) as done:
                for line in answer.splitlines(keepends=True)[:1]:
                    decoder.send(line)
            header, body = wire.decode_message(done.value.value)
            assert cbor2.loads(body) == {"r": "over the device"}
            assert header.sequence == 5
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=20)
        assert process.returncode == 0, err


def test_console_refuses_a_device_another_program_holds_in_one_line(board_dir):
    with raw_pty() as (_, path), serial.Serial(path, exclusive=True):
        completed = subprocess.run(
            [sys.executable, "-m", "board.console_cli", "console", str(board_dir), "--port", path],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
    assert completed.returncode == 4
    (line,) = completed.stderr.decode().splitlines()
    assert line.startswith("mers-board: error: [port] cannot open")
    assert "in use" in line


def test_console_on_a_device_that_does_not_exist_is_one_line(board_dir, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "board.console_cli",
            "console",
            str(board_dir),
            "--port",
            str(tmp_path / "ttyX"),
        ],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 4
    (line,) = completed.stderr.decode().splitlines()
    assert "[port]" in line and "Traceback" not in completed.stderr.decode()


def test_a_second_console_on_a_served_board_is_refused_until_the_first_ends(board_dir):
    """Two consoles on one board would let two stations provision it at once, each reading back what
    the other wrote."""
    with ConsoleProcess(board_dir) as console:
        second = run_cli("mers-board", "sim", "serve", board_dir)
        assert second.returncode == 3, second.stderr
        assert "another console already serves this board" in second.error_line
        assert second.stdout == ""  # no port was announced
        assert console.stop() == 0
    with ConsoleProcess(board_dir) as console:  # the lock went with the process
        assert console.stop() == 0

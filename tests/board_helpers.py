"""Test helpers for the board: a simulated board and what an installer writes to it, boarding data
(configuration with an IAT, a test CA), trust anchors, a gateway laid out in plain files."""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from board import fw_env_config
from board.fw_env_config import EnvDevice, FwEnvConfig
from board.gateway import GatewayBoard
from board.interface import BoardingData, Identity, SlotName
from board.simboard import SimBoard
from board.slots import payload_offset, slot_record_of_image
from board.ubootenv import create as create_env
from signing.image_format import ImageVersion
from signing.keys import KeyAlgorithm
from tests.signing_helpers import make_image, signer_for


def der(algorithm: KeyAlgorithm = KeyAlgorithm.ED25519, index: int = 0) -> bytes:
    return signer_for(algorithm, index).public_key.der


@functools.cache
def ca_bundle() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mers test hub CA")])
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


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths of the descriptors `os.fsync` is given from now on (as /proc names them: resolved): a
    power cut cannot be simulated, so a test of durability observes the fsyncs instead."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def iat(subject: str = "agent-1", **claims: object) -> str:
    payload = {"sub": subject, "exp": 2_000_000_000, "jti": "iat-1", **claims}
    return jwt.encode(payload, "a hub secret that is long enough to sign", algorithm="HS256")


def config(**content: object) -> bytes:
    fields: dict[str, object] = {
        "baseUrl": "https://hub.example:8443",
        "iat": iat(),
        "clientCredentialProfile": ["SHARED_SECRET"],
        "clientId": "agent-1",
        "tenant": "factory",
    }
    fields.update(content)
    return json.dumps(
        {"content": {k: v for k, v in fields.items() if v is not None}, "expiration": "x"}
    ).encode()


def boarding(**content: object) -> BoardingData:
    return BoardingData(config(**content), ca_bundle(), b'{"proxy": "http://proxy:3128"}')


IDENTITY = Identity("GW-0001", "Acme", "gw-100", "B")


SLOT_SIZE = 1 << 16


def simulated_board(directory: Path, **options: object) -> SimBoard:
    return SimBoard.create(directory, IDENTITY, slot_size=SLOT_SIZE, **options)  # type: ignore[arg-type]


def signed_image(directory: Path, version: str = "1.2.3", payload: bytes | None = None) -> Path:
    return make_image(
        directory,
        payload=payload if payload is not None else os.urandom(3000),
        name=f"image-{version}.signed",
        version=ImageVersion.parse(version),
        vendor=IDENTITY.vendor,
        image_class=IDENTITY.image_class,
    )


def install(board: SimBoard, image: Path, *, switch: bool = True) -> SlotName:
    """What the installer does, through the board's API only: write the inactive slot, record the image,
    flip the environment in one write."""
    record = slot_record_of_image(image)
    target = board.inactive_slot()
    with board.open_inactive_slot_for_writing() as slot, open(image, "rb") as source:
        source.seek(payload_offset(record))
        slot.write(source.read(record.payload_size))
        slot.flush()
        os.fsync(slot.fileno())
    board.write_slot_record(target, record)
    if switch:
        board.boot_env.write({"boot_slot": target.value, "upgrade_available": "1", "bootcount": "0"})
    return target


def corrupt(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def write_gateway(
    directory: Path, *, extra: str = "", cmdline: str = "quiet mers.slot=a root=/dev/mmcblk0p2"
) -> Path:
    """A gateway whose slots are plain files: the layout a real one has, with block devices."""
    for name in ("slot-a", "slot-b"):
        with open(directory / name, "wb") as handle:
            handle.truncate(8192)
    env_config = FwEnvConfig(
        (EnvDevice(directory / "env0", 0, 0x2000), EnvDevice(directory / "env1", 0, 0x2000))
    )
    (directory / "fw_env.config").write_text(fw_env_config.render(env_config))
    create_env(
        env_config,
        {"boot_slot": "a", "upgrade_available": "0", "bootcount": "0", "bootlimit": "3"},
        lock_path=directory / "env.lock",
    )
    (directory / "cmdline").write_text(cmdline + "\n")
    config = directory / "gateway.toml"
    config.write_text(
        f"""
[identity]
serial_number = "GW-7"
vendor = "Acme"
class = "gw-100"

[storage]
state_dir = "state"
key_store = "otp/keystore.json"

[slots.a]
device = "slot-a"
record = "a.record"

[slots.b]
device = "slot-b"
size = "4KiB"
record = "b.record"

[boot]
fw_env_config = "fw_env.config"
lock_file = "env.lock"
cmdline = "cmdline"
{extra}
"""
    )
    GatewayBoard.from_toml(config).initialise()  # as the image build or first boot does
    return config

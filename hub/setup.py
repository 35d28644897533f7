"""`mers-hub init`: create a hub directory from nothing, or refuse.

Every file is created exclusively (an existing hub is never overwritten, even in part), secrets are 0600
from their first byte, and the admin token is kept in the hub only as its SHA-256: the clear token goes to
`admin-token` (0600) for the local CLI and is shown once. What an init interrupted half-way left (its own
files without `hub.toml`, which it writes last) is cleared, so running init again just works.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .database import create_schema, open_engine
from .errors import HubSetupError
from .home import HubHome, HubSettings
from .tls import TlsMaterial, create_tls_material

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class HubKeys:
    """The key material a hub is made with: its token-signing RSA key (PEM) and its TLS CA and server
    certificate. Generating the RSA-3072 key takes 0.1 to 1 s, so a caller that makes many throw-away
    hubs (the test suite) makes one set and gives it to each; an operator's hub always gets its own."""

    signing_key_pem: bytes
    tls: TlsMaterial


def new_hub_keys(hostnames: tuple[str, ...] = ()) -> HubKeys:
    """Fresh key material, the server certificate naming `hostnames` besides 127.0.0.1 and localhost."""
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return HubKeys(_private_pem(signing_key), create_tls_material(hostnames))


@dataclass(frozen=True)
class InitResult:
    home: HubHome
    admin_token: str
    #: the directory held what an interrupted init had left, which was cleared first
    restarted: bool = False


def hash_admin_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_hub(
    root: Path,
    hostnames: tuple[str, ...] = (),
    settings: HubSettings | None = None,
    *,
    keys: HubKeys | None = None,
) -> InitResult:
    """Create the hub directory `root` (which must not exist, or be empty), with new key material unless
    `keys` is given (made by `new_hub_keys` for the same `hostnames`)."""
    settings = settings or HubSettings()
    home = HubHome(root)
    restarted = _prepare_directory(home)
    # the database first: an unreachable server or a bad URL then leaves the directory as it was (empty),
    # so init can simply run again once the URL is fixed
    engine = open_engine(settings.database_url or f"sqlite:///{home.default_database}")
    try:
        create_schema(engine)
    finally:
        engine.dispose()
    keys = keys or new_hub_keys(hostnames)
    tls = keys.tls
    admin_token = secrets.token_urlsafe(32)
    files = [
        (home.signing_key, keys.signing_key_pem, SECRET_MODE),
        (home.url_secret, secrets.token_hex(32).encode("ascii"), SECRET_MODE),
        (home.admin_token, admin_token.encode("ascii") + b"\n", SECRET_MODE),
        (home.admin_token_hash, hash_admin_token(admin_token).encode("ascii") + b"\n", SECRET_MODE),
        (home.ca_key, tls.ca_key_pem, SECRET_MODE),
        (home.ca_certificate, tls.ca_certificate_pem, PUBLIC_MODE),
        (home.server_key, tls.server_key_pem, SECRET_MODE),
        (home.server_certificate, tls.server_certificate_pem + tls.ca_certificate_pem, PUBLIC_MODE),
    ]
    for path, data, mode in files:
        _write_new(path, data, mode)
    home.blobs.mkdir(mode=0o700)
    # written last: a directory without hub.toml is an unfinished init, never mistaken for a hub
    _write_new(home.settings_file, settings.to_toml().encode("utf-8"), SECRET_MODE)
    return InitResult(home, admin_token, restarted)


def _prepare_directory(home: HubHome) -> bool:
    """Make `home` an empty private directory; True when that meant clearing an interrupted init."""
    root = home.root
    if root.exists():
        if not root.is_dir():
            raise HubSetupError(f"{root} exists and is not a directory")
        leftovers = list(root.iterdir())
        if leftovers and not _left_by_an_interrupted_init(home, leftovers):
            raise HubSetupError(f"{root} is not empty; mers-hub init never overwrites a hub")
        try:
            for entry in leftovers:
                if entry.is_dir():
                    entry.rmdir()
                else:
                    entry.unlink()
            os.chmod(root, 0o700)
        except OSError as exc:
            raise HubSetupError(f"cannot clear the interrupted init in {root}: {exc.strerror}") from exc
        return bool(leftovers)
    try:
        root.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise HubSetupError(f"cannot create {root}: {exc.strerror}") from exc
    return False


def _left_by_an_interrupted_init(home: HubHome, entries: list[Path]) -> bool:
    """Whether `entries` are only what an init that stopped half-way makes: its files, its database (SQLite
    with its journal files) and an empty blob directory, without `hub.toml`. Init writes that file last and
    `serve` needs it, so such a directory was never served and holds nothing worth keeping."""
    own_files = {
        path.name
        for path in (
            home.signing_key,
            home.url_secret,
            home.admin_token,
            home.admin_token_hash,
            home.ca_key,
            home.ca_certificate,
            home.server_key,
            home.server_certificate,
            home.default_database,
        )
    }
    own_files |= {f"{home.default_database.name}-wal", f"{home.default_database.name}-shm"}
    for entry in entries:
        if entry.is_symlink():
            return False
        if entry.name == home.blobs.name and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name not in own_files or not entry.is_file():
            return False
    return True


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise HubSetupError(f"{path} already exists; mers-hub init never overwrites a hub") from exc
    except OSError as exc:
        raise HubSetupError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)

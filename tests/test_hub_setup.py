"""`create_hub` (what `mers-hub init` does): every file of a hub directory, secrets private from their first
byte, a TLS certificate a device's verifier accepts for the hub's names, the admin token kept only as its
hash, and an existing or non-empty directory refused without a byte changed."""

from __future__ import annotations

import hashlib
import ipaddress
import sqlite3
import stat
from dataclasses import fields
from pathlib import Path

import pytest
import sqlalchemy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from hub import setup as hub_setup
from hub.assertions import DEVICE_ASSERTION_LIFETIME
from hub.errors import HubSetupError
from hub.home import DAY, DEVICE_MAX_CREDENTIAL_LIFETIME, MAX_DURATION, HubHome, HubSettings
from hub.setup import create_hub, hash_admin_token
from hub.state import load_state
from hub.tokens import HubKey
from mers.onboarding import MAX_CREDENTIAL_LIFETIME

SECRET_FILES = (
    "signing-key.pem",
    "url-secret",
    "admin-token",
    "admin-token.sha256",
    "ca-key.pem",
    "server-key.pem",
    "hub.toml",
    "hub.db",
)
PUBLIC_FILES = ("ca.pem", "server.pem")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[HubHome, str]:
    """One hub for the read-only checks (an RSA-3072 key takes a moment to generate)."""
    root = tmp_path_factory.mktemp("made") / "hub"
    created = create_hub(root, ("hub.example.com", "10.0.0.7"), HubSettings(tenant="acme"))
    return created.home, created.admin_token


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `root` with its bytes, mode and modification time."""
    return {
        str(path.relative_to(root)): (
            path.read_bytes() if path.is_file() else b"",
            mode(path),
            path.stat().st_mtime_ns,
        )
        for path in sorted(root.rglob("*"))
    }


def certificates(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_a_new_hub_has_every_file_and_only_its_owner_reads_the_secrets(made: tuple[HubHome, str]) -> None:
    home, _token = made
    names = {path.name for path in home.root.iterdir()}
    assert names == {*SECRET_FILES, *PUBLIC_FILES, "blobs"}
    for name in SECRET_FILES:
        assert mode(home.root / name) == 0o600, name
    for name in PUBLIC_FILES:
        assert mode(home.root / name) == 0o644, name
    assert mode(home.root) == 0o700
    assert mode(home.blobs) == 0o700
    assert list(home.blobs.iterdir()) == []


def test_the_admin_token_file_holds_the_token_whose_hash_the_hub_keeps(made: tuple[HubHome, str]) -> None:
    home, token = made
    assert home.admin_token.read_text(encoding="ascii") == token + "\n"
    kept = home.admin_token_hash.read_text(encoding="ascii").strip()
    assert kept == hashlib.sha256(token.encode()).hexdigest() == hash_admin_token(token)
    assert len(token) >= 40  # 32 random bytes, base64url


def test_the_settings_file_holds_the_settings_given(made: tuple[HubHome, str]) -> None:
    home, _token = made
    assert HubHome(home.root).settings() == HubSettings(tenant="acme")


def test_the_hub_signing_key_is_an_rsa_3072_key(made: tuple[HubHome, str]) -> None:
    home, _token = made
    key = HubKey.from_pem(home.signing_key.read_bytes(), source="test")
    assert key.private.key_size == 3072


def test_the_database_has_the_hub_tables(made: tuple[HubHome, str]) -> None:
    home, _token = made
    engine = sqlalchemy.create_engine(home.database_url())
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"agents", "trusted_keys", "releases", "installation_tasks", "spent_assertions"} <= tables


def test_a_database_that_holds_no_hub_is_refused_not_set_up_blank(tmp_path: Path) -> None:
    home = create_hub(tmp_path / "hub").home
    home.default_database.unlink()  # as a mistyped path would name a file that is not there
    with pytest.raises(HubSetupError, match="does not exist"):
        load_state(home, "https://127.0.0.1:8443")
    assert not home.default_database.exists()  # and none is left behind
    sqlite3.connect(home.default_database).close()  # an empty database, as a mistyped server URL names
    with pytest.raises(HubSetupError, match="holds no hub"):
        load_state(home, "https://127.0.0.1:8443")
    engine = sqlalchemy.create_engine(home.database_url())
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_a_hub_made_before_a_table_existed_gets_it_when_it_starts(tmp_path: Path) -> None:
    home = create_hub(tmp_path / "hub").home
    engine = sqlalchemy.create_engine(home.database_url())
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE spent_assertions")
        state = load_state(home, "https://127.0.0.1:8443")
        state.close()
        assert "spent_assertions" in sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_the_server_certificate_names_loopback_localhost_and_the_given_hostnames(
    made: tuple[HubHome, str],
) -> None:
    home, _token = made
    leaf = certificates(home.server_certificate)[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "hub.example.com"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
    }


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("hub.example.com"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ],
)
def test_a_verifier_trusting_only_ca_pem_accepts_the_server_certificate_for_each_name(
    made: tuple[HubHome, str], name: x509.DNSName | x509.IPAddress
) -> None:
    home, _token = made
    leaf, *chain = certificates(home.server_certificate)
    verifier = PolicyBuilder().store(Store(certificates(home.ca_certificate))).build_server_verifier(name)
    verified = verifier.verify(leaf, chain)
    assert verified[-1] == certificates(home.ca_certificate)[0]


def test_a_verifier_refuses_the_server_certificate_for_a_name_it_does_not_hold(
    made: tuple[HubHome, str],
) -> None:
    home, _token = made
    leaf, *chain = certificates(home.server_certificate)
    verifier = (
        PolicyBuilder()
        .store(Store(certificates(home.ca_certificate)))
        .build_server_verifier(x509.DNSName("other.example.com"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(leaf, chain)


def test_the_tls_private_keys_match_their_certificates(made: tuple[HubHome, str]) -> None:
    home, _token = made
    pairs = ((home.ca_key, home.ca_certificate), (home.server_key, home.server_certificate))
    for key_path, certificate_path in pairs:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == certificates(certificate_path)[0].public_key()


def test_an_empty_existing_directory_becomes_a_private_hub(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir(mode=0o755)
    create_hub(root)
    assert mode(root) == 0o700
    assert HubHome(root).settings() == HubSettings()


def test_a_non_empty_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    root = tmp_path / "busy"
    root.mkdir()
    (root / "notes.txt").write_text("mine\n")
    before, before_mode = snapshot(root), mode(root)
    with pytest.raises(HubSetupError, match="not empty"):
        create_hub(root)
    assert snapshot(root) == before
    assert mode(root) == before_mode


def test_an_existing_hub_is_refused_and_not_a_byte_of_it_changes(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    create_hub(root)
    before = snapshot(root)
    with pytest.raises(HubSetupError, match="never overwrites"):
        create_hub(root, ("other.example.com",))
    assert snapshot(root) == before


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(HubSetupError, match="not a directory"):
        create_hub(path)
    assert path.read_text() == "x"


@pytest.mark.parametrize("stop_after", [1, 4, 8])
def test_init_interrupted_half_way_can_simply_be_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: int
) -> None:
    written: list[Path] = []
    write_new = hub_setup._write_new

    def power_cut(path: Path, data: bytes, mode: int) -> None:
        if len(written) == stop_after:
            raise KeyboardInterrupt  # the operator's Ctrl-C, or the machine going down
        write_new(path, data, mode)
        written.append(path)

    root = tmp_path / "hub"
    with monkeypatch.context() as patched:
        patched.setattr(hub_setup, "_write_new", power_cut)
        with pytest.raises(KeyboardInterrupt):
            create_hub(root)
    assert not HubHome(root).settings_file.exists() and any(root.iterdir())
    again = create_hub(root)
    assert again.restarted
    assert (root / "admin-token").read_text().strip() == again.admin_token
    assert again.home.settings().tenant == HubSettings().tenant
    assert not create_hub(tmp_path / "fresh").restarted


def test_an_interrupted_init_beside_anything_else_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "hub"

    def power_cut(*_args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(hub_setup, "_write_new", power_cut)
        with pytest.raises(KeyboardInterrupt):
            create_hub(root)  # stopped after its database, before its first file
    (root / "notes.txt").write_text("someone's file")
    before = sorted(path.name for path in root.iterdir())
    with pytest.raises(HubSetupError, match="is not empty"):
        create_hub(root)
    assert sorted(path.name for path in root.iterdir()) == before


@pytest.mark.parametrize("key", [item.name for item in fields(HubSettings) if item.type == "float"])
def test_a_duration_setting_is_whole_seconds_to_ten_years(key: str) -> None:
    """A signed URL lifetime of 1e12 s made every task read a 500 (no date has that year) and every URL
    one the hub's own check refused (its expiry past 12 digits); an access token lifetime of 0.5 s gave
    devices `expires_in: 0`, which they refuse."""
    longest = {"access_token_lifetime": DAY, "credential_lifetime": DEVICE_MAX_CREDENTIAL_LIFETIME}.get(
        key, MAX_DURATION
    )
    shortest = DEVICE_ASSERTION_LIFETIME if key == "max_assertion_lifetime" else 1
    for refused in (1e12, longest + 1, 0.5, shortest - 0.5):
        with pytest.raises(HubSetupError, match=f"{key} must be from {shortest} to"):
            HubSettings.from_toml(f"{key} = {refused}\n", source="hub.toml")
    for accepted in (shortest, shortest + 0.5, longest):
        assert getattr(HubSettings.from_toml(f"{key} = {accepted}\n", source="hub.toml"), key) == accepted


def test_the_longest_credential_lifetime_is_the_one_devices_take() -> None:
    """A hub granting 400 days recorded the registration, then the device refused the answer: a used IAT
    and no credentials. The two packages may not import each other, so the bound is stated twice."""
    assert DEVICE_MAX_CREDENTIAL_LIFETIME == MAX_CREDENTIAL_LIFETIME
    with pytest.raises(HubSetupError, match="credential_lifetime must be from 1 to"):
        HubSettings.from_toml(f"credential_lifetime = {400 * DAY}\n", source="hub.toml")

"""Signing with keys held in a real SoftHSM2 token (URI parsing is tests/test_pkcs11_uri.py).

One token directory per test module holds every key the tests need (generating RSA-3072 on the token
takes a while); each test points SOFTHSM2_CONF at it and reloads the module, so no test sees another
module's tokens.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signing.errors import Pkcs11Error
from signing.keys import KeyAlgorithm, SoftwareSigner, generate_private_key
from signing.pkcs11 import load_pkcs11_signer
from tests.conftest import CliResult, require_file, require_tool

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "mers-test"
OTHER_TOKEN = "mers-other"
PIN = "246810"
SO_PIN = "13579111"
DIGEST = hashlib.sha256(b"firmware image").digest()


# --- a real token ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hsm:
    """A SoftHSM2 token directory with the keys the tests use, and the env that selects it."""

    conf: Path
    directory: Path
    software_rsa: SoftwareSigner  # imported onto the token as "imported-rsa"
    software_ec: SoftwareSigner  # imported onto the token as "imported-ec"
    serial: str

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def uri(self, attributes: str, query: str = f"pin-value={PIN}") -> str:
        return f"pkcs11:token={TOKEN};{attributes}" + (f"?{query}" if query else "")


def _require_python_pkcs11() -> None:
    """python-pkcs11 is the optional `hsm` extra: skip without it, except under MERS_REQUIRE_ALL=1."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        if os.environ.get("MERS_REQUIRE_ALL") == "1":
            pytest.fail("MERS_REQUIRE_ALL=1 but python-pkcs11 (mers[hsm]) is not installed")
        pytest.skip("python-pkcs11 (mers[hsm]) is not installed")


def _unload_module() -> None:
    """SoftHSM reads SOFTHSM2_CONF in C_Initialize; python-pkcs11 keeps a module loaded per process."""
    import pkcs11

    pkcs11.unload(MODULE)


@pytest.fixture(scope="module")
def hsm_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    require_tool("softhsm2-util", "PKCS#11 tests need SoftHSM2")
    require_file(MODULE, "PKCS#11 tests need SoftHSM2's module")
    _require_python_pkcs11()
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in (TOKEN, OTHER_TOKEN):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", PIN],
            env=env,
            check=True,
            capture_output=True,
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        _unload_module()
        hsm = _populate(conf, directory)
        _unload_module()
    yield hsm


@pytest.fixture
def hsm(hsm_store: Hsm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hsm]:
    """The module's token store, selected by SOFTHSM2_CONF for this test alone."""
    monkeypatch.setenv("SOFTHSM2_CONF", str(hsm_store.conf))
    _unload_module()
    yield hsm_store
    _unload_module()


def _populate(conf: Path, directory: Path) -> Hsm:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism

    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    software_rsa = SoftwareSigner(generate_private_key(KeyAlgorithm.RSA3072))
    software_ec = SoftwareSigner(generate_private_key(KeyAlgorithm.ECDSA_P256))
    stray_ec = generate_private_key(KeyAlgorithm.ECDSA_P256)
    with token.open(rw=True, user_pin=PIN) as session:
        session.generate_keypair(KeyType.RSA, 3072, store=True, label="fw-rsa", id=b"\x01")
        _ec_keypair(session, "secp256r1", "fw-ec", b"\x02")
        ed_params = session.create_domain_parameters(
            KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: bytes.fromhex("06032b6570")}, local=True
        )
        ed_params.generate_keypair(
            store=True, label="fw-ed", id=b"\x03", mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        )
        _import_private(session, software_rsa.private_key, "imported-rsa", b"\x04")
        _import_private(session, software_ec.private_key, "imported-ec", b"\x05")
        _import_public(session, software_ec.private_key.public_key(), "imported-ec", b"\x05")
        session.generate_keypair(KeyType.RSA, 2048, store=True, label="small-rsa", id=b"\x10")
        _ec_keypair(session, "secp384r1", "p384", b"\x11")
        _ec_keypair(session, "secp256r1", "twin", b"\x20")
        _ec_keypair(session, "secp256r1", "twin", b"\x21")
        _import_private(session, stray_ec, "lonely-ec", b"\x30")
        _import_private(session, stray_ec, "mismatched", b"\x40")
        _import_public(session, software_ec.private_key.public_key(), "mismatched", b"\x40")
        _import_private(session, stray_ec, "no-sign", b"\x50", sign=False)
        _import_public(session, stray_ec.public_key(), "no-sign", b"\x50")
        _import_public(session, stray_ec.public_key(), "only-public", b"\x60")
        serial = token.serial.decode()
    return Hsm(conf, directory, software_rsa, software_ec, serial)


def _ec_keypair(session: Any, curve: str, label: str, key_id: bytes) -> None:
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
    )
    params.generate_keypair(store=True, label=label, id=key_id)


def _import_private(session: Any, key: Any, label: str, key_id: bytes, *, sign: bool = True) -> None:
    """Put a software key on the token, so the test knows its public half independently."""
    from pkcs11 import Attribute
    from pkcs11.util.ec import decode_ec_private_key
    from pkcs11.util.rsa import decode_rsa_private_key

    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    attributes = (
        decode_rsa_private_key(der) if isinstance(key, rsa.RSAPrivateKey) else decode_ec_private_key(der)
    )
    attributes.update(
        {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.SIGN: sign,
        }
    )
    session.create_object(attributes)


def _import_public(session: Any, key: Any, label: str, key_id: bytes) -> None:
    from pkcs11 import Attribute
    from pkcs11.util.ec import decode_ec_public_key

    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    attributes = decode_ec_public_key(der)
    attributes.update(
        {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VERIFY: True}
    )
    session.create_object(attributes)


def _token_public_key_der(hsm: Hsm, label: str) -> bytes:
    """The public key as python-pkcs11's own encoders render it: PKCS#1 for RSA, SPKI for EC."""
    import pkcs11
    from pkcs11 import KeyType, ObjectClass
    from pkcs11.util.ec import encode_ec_public_key
    from pkcs11.util.rsa import encode_rsa_public_key

    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        public: Any = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
        if public.key_type == KeyType.RSA:
            return encode_rsa_public_key(public)
        return encode_ec_public_key(public)


# --- signing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "algorithm"),
    [("fw-rsa", KeyAlgorithm.RSA3072), ("fw-ec", KeyAlgorithm.ECDSA_P256), ("fw-ed", KeyAlgorithm.ED25519)],
)
def test_token_signatures_verify_as_mcuboot_checks_them(
    hsm: Hsm, label: str, algorithm: KeyAlgorithm
) -> None:
    with load_pkcs11_signer(hsm.uri(f"object={label}"), module_path=MODULE) as signer:
        assert signer.public_key.algorithm is algorithm
        digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
        signatures = [signer.sign_digest(digest) for digest in digests]  # one session, several digests
    for digest, signature in zip(digests, signatures, strict=True):
        assert signer.public_key.verifies(signature, digest)
        assert not signer.public_key.verifies(signature, DIGEST)


@pytest.mark.parametrize("label", ["fw-rsa", "fw-ec"])
def test_key_hash_is_that_of_the_tokens_public_key_object(hsm: Hsm, label: str) -> None:
    with load_pkcs11_signer(hsm.uri(f"object={label}"), module_path=MODULE) as signer:
        key_hash = signer.public_key.key_hash
    assert key_hash == hashlib.sha256(_token_public_key_der(hsm, label)).digest()


def test_an_imported_rsa_key_signs_like_the_software_key_it_came_from(hsm: Hsm) -> None:
    # imported without a public object: the RSA public half comes from the private key's attributes
    with load_pkcs11_signer(hsm.uri("id=%04"), module_path=MODULE) as signer:
        signature = signer.sign_digest(DIGEST)
    assert signer.public_key.key_hash == hsm.software_rsa.public_key.key_hash
    assert hsm.software_rsa.public_key.verifies(signature, DIGEST)


def test_an_imported_ec_key_is_paired_with_its_public_object_by_id(hsm: Hsm) -> None:
    with load_pkcs11_signer(hsm.uri("object=imported-ec;id=%05;type=private"), module_path=MODULE) as signer:
        signature = signer.sign_digest(DIGEST)
    assert signer.public_key.key_hash == hsm.software_ec.public_key.key_hash
    assert hsm.software_ec.public_key.verifies(signature, DIGEST)


def test_token_serial_selects_the_token(hsm: Hsm) -> None:
    uri = f"pkcs11:serial={hsm.serial};object=fw-ec?pin-value={PIN}"
    with load_pkcs11_signer(uri, module_path=MODULE) as signer:
        assert "'mers-test'" in signer.description


def test_a_closed_signer_refuses_to_sign(hsm: Hsm) -> None:
    signer = load_pkcs11_signer(hsm.uri("object=fw-ec"), module_path=MODULE)
    was_open = not signer.closed
    signer.close()
    signer.close()  # twice is harmless
    assert was_open
    assert signer.closed
    with pytest.raises(Pkcs11Error, match="is closed"):
        signer.sign_digest(DIGEST)


def test_a_digest_of_the_wrong_size_is_refused(hsm: Hsm) -> None:
    with (
        load_pkcs11_signer(hsm.uri("object=fw-ec"), module_path=MODULE) as signer,
        pytest.raises(Pkcs11Error, match="32-byte SHA-256 digest, not 20"),
    ):
        signer.sign_digest(b"\x00" * 20)


def test_the_session_is_closed_when_the_with_block_ends(hsm: Hsm) -> None:
    with load_pkcs11_signer(hsm.uri("object=fw-rsa"), module_path=MODULE) as signer:
        pass
    assert signer.closed
    # a module with no open session can be finalised and reloaded cleanly
    _unload_module()


# --- where the module and PIN come from ------------------------------------------------------------


def test_module_path_may_come_from_the_uri(hsm: Hsm) -> None:
    with load_pkcs11_signer(hsm.uri("object=fw-ec", f"pin-value={PIN}&module-path={MODULE}")) as signer:
        assert signer.sign_digest(DIGEST)


def test_the_module_argument_overrides_the_uris_module_path(hsm: Hsm) -> None:
    uri = hsm.uri("object=fw-ec", f"pin-value={PIN}&module-path=/nonexistent/module.so")
    with load_pkcs11_signer(uri, module_path=MODULE) as signer:
        assert signer.sign_digest(DIGEST)


def test_the_pin_argument_overrides_the_uris_pin_value(hsm: Hsm) -> None:
    with load_pkcs11_signer(
        hsm.uri("object=fw-ec", "pin-value=wrong"), module_path=MODULE, pin=PIN
    ) as signer:
        assert signer.sign_digest(DIGEST)


@pytest.mark.parametrize("form", ["path", "file:", "file://", "file://localhost"])
def test_pin_source_reads_the_pin_from_a_file_without_its_trailing_newline(
    hsm: Hsm, tmp_path: Path, form: str
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    source = str(pin_file) if form == "path" else f"{form}{pin_file}"
    with load_pkcs11_signer(hsm.uri("object=fw-ec", f"pin-source={source}"), module_path=MODULE) as signer:
        assert signer.sign_digest(DIGEST)


# --- every way it can go wrong: one line each ------------------------------------------------------


def _error(uri: str, **kwargs: Any) -> str:
    with pytest.raises(Pkcs11Error) as caught:
        load_pkcs11_signer(uri, **{"module_path": MODULE, **kwargs})
    message = str(caught.value)
    assert "\n" not in message
    assert PIN not in message
    assert caught.value.field == "pkcs11"
    return message


def test_missing_module_is_reported(hsm: Hsm, tmp_path: Path) -> None:
    assert _error(hsm.uri("object=fw-ec"), module_path=str(tmp_path / "nope.so")) == (
        f"PKCS#11 module {tmp_path / 'nope.so'} does not exist"
    )


def test_a_file_that_is_not_a_module_is_reported(hsm: Hsm, tmp_path: Path) -> None:
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"not a shared object")
    message = _error(hsm.uri("object=fw-ec"), module_path=str(fake))
    assert message.startswith(f"{fake} is not a loadable PKCS#11 module: ")


def test_a_shared_library_that_is_not_a_pkcs11_module_is_reported(hsm: Hsm) -> None:
    library = next(
        (
            p
            for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1")
            if Path(p).exists()
        ),
        None,
    )
    if library is None:
        pytest.skip("no libz to try")
    message = _error(hsm.uri("object=fw-ec"), module_path=library)
    assert "is not a loadable PKCS#11 module" in message
    assert "C_GetFunctionList" in message


def test_no_module_at_all_is_reported(hsm: Hsm) -> None:
    assert "no PKCS#11 module given" in _error(hsm.uri("object=fw-ec"), module_path=None)


def test_wrong_pin_is_reported(hsm: Hsm) -> None:
    assert _error(hsm.uri("object=fw-ec", "pin-value=999999")) == f"wrong PIN for PKCS#11 token {TOKEN!r}"


def test_missing_pin_is_reported(hsm: Hsm) -> None:
    assert "no PIN for the PKCS#11 token" in _error(hsm.uri("object=fw-ec", ""))


def test_unreadable_pin_file_is_reported(hsm: Hsm, tmp_path: Path) -> None:
    missing = tmp_path / "no-pin"
    message = _error(hsm.uri("object=fw-ec", f"pin-source={missing}"))
    assert message == f"cannot read PIN file {missing}: No such file or directory"


def test_empty_and_endless_pin_files_are_reported(hsm: Hsm, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert _error(hsm.uri("object=fw-ec", f"pin-source={empty}")) == f"PIN file {empty} is empty"
    assert "longer than 1024 bytes" in _error(hsm.uri("object=fw-ec", "pin-source=/dev/zero"))


def test_pin_source_on_another_host_is_refused(hsm: Hsm) -> None:
    assert "names another host" in _error(hsm.uri("object=fw-ec", "pin-source=file://server/pin"))


def test_no_such_token_is_reported_with_the_tokens_present(hsm: Hsm) -> None:
    message = _error(f"pkcs11:token=absent;object=fw-ec?pin-value={PIN}")
    assert message == (
        f"no PKCS#11 token matching token='absent' in {MODULE} "
        f"(initialised tokens: {OTHER_TOKEN!r}, {TOKEN!r})"
    )


def test_a_uri_matching_several_tokens_is_refused(hsm: Hsm) -> None:
    message = _error(f"pkcs11:object=fw-ec?pin-value={PIN}")
    assert message.startswith("2 PKCS#11 tokens match at all: ")
    assert message.endswith("add token= or serial=")


def test_no_such_object_is_reported(hsm: Hsm) -> None:
    assert _error(hsm.uri("object=absent")) == f"no private key object='absent' on PKCS#11 token {TOKEN!r}"


def test_a_label_naming_only_a_public_key_says_so(hsm: Hsm) -> None:
    assert _error(hsm.uri("object=only-public")) == (
        f"no private key object='only-public' on PKCS#11 token {TOKEN!r} (it holds only: a public key)"
    )


def test_an_ambiguous_label_is_refused_naming_the_candidates(hsm: Hsm) -> None:
    assert _error(hsm.uri("object=twin")) == (
        f"2 private keys match object='twin' on PKCS#11 token {TOKEN!r} (id=20, id=21); add id= to choose one"
    )
    with load_pkcs11_signer(hsm.uri("object=twin;id=%21"), module_path=MODULE) as signer:
        assert signer.public_key.verifies(signer.sign_digest(DIGEST), DIGEST)


def test_a_uri_naming_no_key_is_refused(hsm: Hsm) -> None:
    assert "names no key" in _error(hsm.uri("type=private"))


def test_a_uri_naming_a_public_object_is_refused(hsm: Hsm) -> None:
    assert "names a public object; signing needs type=private" in _error(hsm.uri("object=fw-ec;type=public"))


def test_rsa_2048_is_refused(hsm: Hsm) -> None:
    message = _error(hsm.uri("object=small-rsa"))
    assert (
        message == f"key object='small-rsa' id=10 on token {TOKEN!r} is unusable: "
        "RSA-2048 key: only RSA-3072 is supported"
    )


def test_ec_p384_is_refused(hsm: Hsm) -> None:
    assert "EC key on secp384r1: only P-256 is supported" in _error(hsm.uri("object=p384"))


def test_an_ec_key_without_a_public_object_is_refused(hsm: Hsm) -> None:
    message = _error(hsm.uri("object=lonely-ec"))
    assert "no public key object with the id or label of object='lonely-ec'" in message


def test_a_key_that_may_not_sign_is_refused(hsm: Hsm) -> None:
    assert "may not sign (its CKA_SIGN is false)" in _error(hsm.uri("object=no-sign"))


def test_a_public_object_that_does_not_pair_with_the_private_key_is_caught_at_signing(hsm: Hsm) -> None:
    with (
        load_pkcs11_signer(hsm.uri("object=mismatched"), module_path=MODULE) as signer,
        pytest.raises(Pkcs11Error, match="do not belong together"),
    ):
        signer.sign_digest(DIGEST)


def test_missing_python_pkcs11_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # makes `import pkcs11` raise ImportError
    message = _error(f"pkcs11:object=fw-ec?pin-value={PIN}")
    assert message == "PKCS#11 support is not installed: install mers[hsm]"


def test_the_uri_parser_needs_no_pkcs11_library() -> None:
    code = (
        "import sys; sys.modules['pkcs11'] = None\n"
        "from signing.pkcs11 import parse_pkcs11_uri\n"
        "assert parse_pkcs11_uri('pkcs11:object=k').object == 'k'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- end to end: the CLI signs with the token, imgtool and mers-sign verify ------------------------


@pytest.mark.parametrize("label", ["fw-rsa", "fw-ec", "fw-ed"])
def test_an_image_signed_through_the_cli_with_a_token_key_verifies_with_mers_sign_and_imgtool(
    hsm: Hsm, tmp_path: Path, mers_sign: Callable[..., CliResult], label: str
) -> None:
    imgtool = require_tool("imgtool", "imgtool cross-checks the image")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(4096))
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    signed = tmp_path / "image.signed"
    result = mers_sign(
        "sign",
        "--key",
        f"pkcs11:token={TOKEN};object={label}",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-pin-file",
        pin_file,
        "--version",
        "1.0.0",
        payload,
        signed,
        env=hsm.env,
    )
    assert result.returncode == 0, result.stderr

    with load_pkcs11_signer(hsm.uri(f"object={label}"), module_path=MODULE) as signer:
        public_pem = tmp_path / "token.pub.pem"
        public_pem.write_bytes(signer.public_key.pem())
    if label != "fw-ed":  # python-pkcs11 exports RSA and EC only: an independent rendering of the same key
        der = _token_public_key_der(hsm, label)
        loaded = serialization.load_der_public_key(der)  # SPKI for EC, PKCS#1 for RSA: both load
        assert (
            loaded.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            == public_pem.read_bytes()
        )

    verified = mers_sign("verify", "--key", public_pem, signed)
    assert verified.returncode == 0, verified.stderr
    checked = subprocess.run(
        [imgtool, "verify", "-k", str(public_pem), str(signed)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Image was correctly validated" in checked.stdout

    other = tmp_path / "other.pub.pem"
    other.write_bytes(hsm.software_ec.public_key.pem())
    rejected = mers_sign("verify", "--key", other, signed)
    assert rejected.returncode == 1
    assert rejected.error_line.startswith("mers-sign: error:")


def test_the_cli_reports_a_wrong_pin_in_one_line(
    hsm: Hsm, tmp_path: Path, mers_sign: Callable[..., CliResult]
) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 100)
    pin_file = tmp_path / "pin"
    pin_file.write_text("000000\n")
    result = mers_sign(
        "sign",
        "--key",
        f"pkcs11:token={TOKEN};object=fw-ec",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-pin-file",
        pin_file,
        "--version",
        "1.0.0",
        payload,
        tmp_path / "out",
        env=hsm.env,
    )
    assert result.returncode == 3
    assert result.error_line == f"mers-sign: error: [pkcs11] wrong PIN for PKCS#11 token {TOKEN!r}"
    assert not (tmp_path / "out").exists()

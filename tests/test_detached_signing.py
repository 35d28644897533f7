"""Detached signing: `mers-sign digest` / `attach` for keys that live on an offline machine or in an HSM.

The offline signer here is `openssl pkeyutl`, with keys `openssl genpkey` made, so nothing on the signing
side shares code with us; imgtool checks the result independently. Each refusal must print one line and
leave no output file: a release pipeline must never pick up a half-checked image.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import signing.output
from signing import ImageOptions, ImageVersion, prepare_detached
from signing.errors import OutputFileError
from tests.conftest import CliResult, require_tool
from tests.signing_helpers import KeyPair, MersSign, image_info, imgtool, key_hash, succeeded

ALGORITHMS = ("rsa-3072", "ecdsa-p256", "ed25519")
GENPKEY_OPTIONS = {
    "rsa-3072": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"),
    "ecdsa-p256": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "ed25519": ("-algorithm", "ED25519"),
}
#: how MCUboot expects each algorithm to sign the 32-byte digest (docs/design.md §3)
PKEYUTL_OPTIONS = {
    "rsa-3072": (
        "-pkeyopt", "digest:sha256", "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32",
    ),
    "ecdsa-p256": (),  # the input is taken as the digest; the output is DER
    "ed25519": ("-rawin",),  # Ed25519 signs the 32 bytes themselves
}  # fmt: skip
SIGNATURE_TLV = {"rsa-3072": "RSA3072", "ecdsa-p256": "ECDSASIG", "ed25519": "ED25519"}

VERSION = "2.1.0+9"
SECURITY_COUNTER = 5
VENDOR = "acme.example"
IMAGE_CLASS = "gw-1"
CUSTOM_TLV = "0xa0=c0ffee"
HEADER_SIZE = 0x200
IMAGE_OPTIONS = (
    "--security-counter", str(SECURITY_COUNTER), "--vendor", VENDOR, "--class", IMAGE_CLASS,
    "--custom-tlv", CUSTOM_TLV, "--header-size", hex(HEADER_SIZE),
)  # fmt: skip
DIGEST_SIZE = 32
IMGTOOL_OK = "Image was correctly validated"


@dataclass(frozen=True)
class Prepared:
    """What `mers-sign digest` hands to the offline signer, and what the test expects of it."""

    unsigned: Path
    digest: Path


# --- the offline side -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openssl() -> str:
    return require_tool("openssl", "the independent offline signer")


def run_openssl(openssl: str, *args: str | Path) -> None:
    completed = subprocess.run([openssl, *map(str, args)], capture_output=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")


def openssl_sign(
    openssl: str,
    algorithm: str,
    key: KeyPair,
    digest: Path,
    signature: Path,
    *,
    options: tuple[str, ...] = (),
) -> Path:
    """Sign the digest file as MCUboot expects for `algorithm`, or with `options` instead when given."""
    run_openssl(
        openssl, "pkeyutl", "-sign", "-inkey", key.private, "-in", digest, "-out", signature,
        *(options or PKEYUTL_OPTIONS[algorithm]),
    )  # fmt: skip
    return signature


def openssl_keygen(openssl: str, directory: Path, name: str, algorithm: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.pub.pem")
    run_openssl(openssl, "genpkey", *GENPKEY_OPTIONS[algorithm], "-out", pair.private)
    run_openssl(openssl, "pkey", "-in", pair.private, "-pubout", "-out", pair.public)
    return pair


@pytest.fixture(scope="module", params=ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, openssl: str, algorithm: str) -> tuple[KeyPair, KeyPair]:
    """Two keys of the algorithm: the release key and a second signer (or an impostor)."""
    directory = tmp_path_factory.mktemp(f"keys-{algorithm}")
    return (
        openssl_keygen(openssl, directory, "release", algorithm),
        openssl_keygen(openssl, directory, "second", algorithm),
    )


@pytest.fixture(scope="module")
def key_hashes(keys: tuple[KeyPair, KeyPair]) -> tuple[str, str]:
    release, second = keys
    return key_hash(release.public), key_hash(second.public)


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "rootfs.bin"
    path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(48_123)))
    return path


# --- our side -------------------------------------------------------------------------------------


def prepare(mers_sign: MersSign, payload: Path, directory: Path, version: str = VERSION) -> Prepared:
    prepared = Prepared(directory / "unsigned.img", directory / "digest.bin")
    succeeded(
        mers_sign(
            "digest", "--version", version, *IMAGE_OPTIONS, payload, prepared.unsigned, "-o", prepared.digest
        )
    )
    return prepared


def strict_verify(mers_sign: MersSign, public: Path, image: Path) -> CliResult:
    return mers_sign(
        "verify", "--key", public, "--vendor", VENDOR, "--class", IMAGE_CLASS,
        "--min-security-counter", str(SECURITY_COUNTER), "--json", image,
    )  # fmt: skip


def attach_is_refused(
    mers_sign: MersSign, signature: Path, public: Path, prepared: Prepared, field: str
) -> None:
    """`attach` of `signature` fails naming `field`, and leaves the directory exactly as it was."""
    out = prepared.unsigned.with_name("final.img")
    before = listing(out.parent)
    result = mers_sign("attach", "--signature", signature, "--pubkey", public, prepared.unsigned, out)
    assert result.returncode == 1
    assert_refused_leaving_nothing(result, out, before, field)


def assert_refused_leaving_nothing(result: CliResult, out: Path, before: set[str], field: str) -> None:
    """One line naming `field`, a failure exit, and not a byte written: neither OUT nor a temporary file."""
    assert result.returncode != 0
    assert field in result.error_line
    assert not out.exists()
    assert listing(out.parent) == before


def listing(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


# --- the tests ------------------------------------------------------------------------------------


def test_offline_signature_attached_to_the_unsigned_image_passes_both_verifiers(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    key_hashes: tuple[str, str],
    payload: Path,
    tmp_path: Path,
) -> None:
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    digest = prepared.digest.read_bytes()
    assert len(digest) == DIGEST_SIZE
    sha256 = [t for t in image_info(prepared.unsigned)["tlv_area"]["tlvs"] if t["type_name"] == "SHA256"]
    assert [t["data"] for t in sha256] == [digest.hex()]

    signature = openssl_sign(openssl, algorithm, release, prepared.digest, tmp_path / "release.sig")
    final = tmp_path / "final.img"
    succeeded(
        mers_sign("attach", "--signature", signature, "--pubkey", release.public, prepared.unsigned, final)
    )

    verified = json.loads(succeeded(strict_verify(mers_sign, release.public, final)).stdout)
    assert verified["sha256"] == digest.hex()
    assert verified["signed_by"] == [key_hashes[0]]
    assert verified["version"] == VERSION
    assert verified["security_counter"] == SECURITY_COUNTER
    theirs = imgtool("verify", "-k", release.public, final)
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    assert IMGTOOL_OK in theirs.stdout


def test_unsigned_image_passes_imgtool_hash_check_but_not_our_verify(
    mers_sign: MersSign, algorithm: str, keys: tuple[KeyPair, KeyPair], payload: Path, tmp_path: Path
) -> None:
    """imgtool without `-k` only recomputes the hash, so an unsigned image "verifies"; ours needs a key and
    a signature by it."""
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)

    theirs = imgtool("verify", prepared.unsigned)
    assert theirs.returncode == 0
    assert IMGTOOL_OK in theirs.stdout

    ours = strict_verify(mers_sign, release.public, prepared.unsigned)
    assert ours.returncode == 1
    assert "signature" in ours.error_line
    assert "not signed" in ours.error_line


def test_signature_by_another_key_is_refused_and_leaves_no_output(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    payload: Path,
    tmp_path: Path,
) -> None:
    release, impostor = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    signature = openssl_sign(openssl, algorithm, impostor, prepared.digest, tmp_path / "impostor.sig")
    attach_is_refused(mers_sign, signature, release.public, prepared, "signature")


@pytest.mark.parametrize("damage", ["a flipped bit", "a missing last byte"])
def test_corrupted_signature_is_refused_and_leaves_no_output(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    payload: Path,
    tmp_path: Path,
    damage: str,
) -> None:
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    signature = openssl_sign(openssl, algorithm, release, prepared.digest, tmp_path / "release.sig")
    good = signature.read_bytes()
    if damage == "a flipped bit":
        middle = len(good) // 2
        signature.write_bytes(good[:middle] + bytes([good[middle] ^ 0x10]) + good[middle + 1 :])
    else:
        signature.write_bytes(good[:-1])
    attach_is_refused(mers_sign, signature, release.public, prepared, "signature")


@pytest.mark.parametrize("algorithm", ["rsa-3072"], indirect=True)
@pytest.mark.parametrize(
    "padding",
    [
        ("-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:max"),
        ("-pkeyopt", "rsa_padding_mode:pkcs1"),
    ],
    ids=["PSS with the longest salt", "PKCS#1 v1.5"],
)
def test_rsa_signature_padded_otherwise_than_mcuboot_checks_is_refused(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    payload: Path,
    tmp_path: Path,
    padding: tuple[str, ...],
) -> None:
    """MCUboot accepts only PSS with MGF1-SHA256 and a 32-byte salt. Any other padding is a valid RSA
    signature by the right key, so only an exact check catches it before a device refuses to boot."""
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    options = ("-pkeyopt", "digest:sha256", *padding)
    signature = openssl_sign(
        openssl, algorithm, release, prepared.digest, tmp_path / "s.sig", options=options
    )
    attach_is_refused(mers_sign, signature, release.public, prepared, "signature")


@pytest.mark.parametrize("change", ["a payload byte edited", "the image remade as another version"])
def test_signature_for_an_image_changed_after_digest_is_refused_and_leaves_no_output(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    payload: Path,
    tmp_path: Path,
    change: str,
) -> None:
    """The signer approved one digest; whatever reaches `attach` must still be exactly that image."""
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    signature = openssl_sign(openssl, algorithm, release, prepared.digest, tmp_path / "release.sig")
    if change == "a payload byte edited":
        content = bytearray(prepared.unsigned.read_bytes())
        content[HEADER_SIZE + 100] ^= 0xFF  # the payload starts at the header size we asked for
        prepared.unsigned.write_bytes(bytes(content))
        field = "SHA256"
    else:
        prepare(mers_sign, payload, tmp_path, version="2.1.1")
        field = "signature"
    attach_is_refused(mers_sign, signature, release.public, prepared, field)


def test_two_keys_attached_in_turn_verify_with_either_key_alone(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    key_hashes: tuple[str, str],
    payload: Path,
    tmp_path: Path,
) -> None:
    prepared = prepare(mers_sign, payload, tmp_path)
    image = prepared.unsigned
    for index, key in enumerate(keys):
        signature = openssl_sign(openssl, algorithm, key, prepared.digest, tmp_path / f"{index}.sig")
        signed = tmp_path / f"signed-{index}.img"
        succeeded(mers_sign("attach", "--signature", signature, "--pubkey", key.public, image, signed))
        image = signed

    tlvs = image_info(image)["tlv_area"]["tlvs"]
    signature_tlv = SIGNATURE_TLV[algorithm]
    assert [t["type_name"] for t in tlvs] == ["SHA256", "KEYHASH", signature_tlv, "KEYHASH", signature_tlv]
    assert tuple(t["data"] for t in tlvs if t["type_name"] == "KEYHASH") == key_hashes
    for key, expected_hash in zip(keys, key_hashes, strict=True):
        verified = json.loads(succeeded(strict_verify(mers_sign, key.public, image)).stdout)
        assert verified["signed_by"] == [expected_hash]
        theirs = imgtool("verify", "-k", key.public, image)
        assert theirs.returncode == 0, theirs.stdout + theirs.stderr


def test_attaching_the_same_key_twice_is_refused(
    mers_sign: MersSign,
    openssl: str,
    algorithm: str,
    keys: tuple[KeyPair, KeyPair],
    payload: Path,
    tmp_path: Path,
) -> None:
    release, _ = keys
    prepared = prepare(mers_sign, payload, tmp_path)
    signature = openssl_sign(openssl, algorithm, release, prepared.digest, tmp_path / "release.sig")
    once = tmp_path / "once.img"
    succeeded(
        mers_sign("attach", "--signature", signature, "--pubkey", release.public, prepared.unsigned, once)
    )
    twice = tmp_path / "twice.img"
    before = listing(tmp_path)

    result = mers_sign("attach", "--signature", signature, "--pubkey", release.public, once, twice)
    assert_refused_leaving_nothing(result, twice, before, "KEYHASH")


def test_unsigned_image_and_digest_are_byte_identical_to_imgtools(
    mers_sign: MersSign, payload: Path, tmp_path: Path
) -> None:
    """The same options given to imgtool (with zero header padding, `-R 0`) produce the same unsigned image
    and the same digest to sign (`--vector-to-sign digest`), so either tool can prepare what the other
    finishes."""
    prepared = prepare(mers_sign, payload, tmp_path)
    tag, value = CUSTOM_TLV.split("=")
    imgtool_options = (
        "--version", VERSION, "-s", str(SECURITY_COUNTER), "--vid", VENDOR, "--cid", IMAGE_CLASS,
        "--custom-tlv", tag, f"0x{value}", "--pad-header", "-H", hex(HEADER_SIZE), "-R", "0",
        "-S", "0x100000",
    )  # fmt: skip
    theirs_unsigned = tmp_path / "imgtool-unsigned.img"
    theirs_digest = tmp_path / "imgtool-digest.bin"
    succeeded(imgtool("sign", *imgtool_options, payload, theirs_unsigned))
    succeeded(imgtool("sign", *imgtool_options, "--vector-to-sign", "digest", payload, theirs_digest))

    assert prepared.unsigned.read_bytes() == theirs_unsigned.read_bytes()
    assert prepared.digest.read_bytes() == theirs_digest.read_bytes()


def test_digest_that_cannot_write_its_digest_file_leaves_no_unsigned_image(
    mers_sign: MersSign, payload: Path, tmp_path: Path
) -> None:
    """The unsigned image and its digest are one result: a pipeline must not find the image alone."""
    unsigned = tmp_path / "unsigned.img"
    before = listing(tmp_path)
    result = mers_sign(
        "digest", "--version", VERSION, payload, unsigned, "-o", tmp_path / "missing" / "digest.bin"
    )
    assert result.returncode == 4
    assert_refused_leaving_nothing(result, unsigned, before, "missing")


def test_prepare_detached_removes_the_published_image_when_the_digest_cannot_be_published(
    payload: Path, tmp_path: Path
) -> None:
    """The digest's file can be created but not given its name (a directory holds it): the image, already
    renamed into place by then, is removed again."""
    unsigned = tmp_path / "unsigned.img"
    in_the_way = tmp_path / "digest.bin"
    in_the_way.mkdir()
    (in_the_way / "keep").write_bytes(b"")
    with pytest.raises(OutputFileError, match=r"digest\.bin"):
        prepare_detached(payload, unsigned, in_the_way, ImageOptions(ImageVersion.parse(VERSION)))
    assert listing(tmp_path) == {"digest.bin"}
    assert listing(in_the_way) == {"keep"}


def test_prepare_detached_puts_the_earlier_image_back_when_the_new_digest_cannot_be_published(
    payload: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second `digest` run over the same names whose digest cannot be given its name (a disk full at
    that moment): the first run's image and digest are both still there, and still a pair."""
    unsigned, digest_file = tmp_path / "unsigned.img", tmp_path / "digest.bin"
    earlier_digest = prepare_detached(
        payload, unsigned, digest_file, ImageOptions(ImageVersion.parse("1.0.0"))
    )
    earlier_image = unsigned.read_bytes()
    real_replace = os.replace

    def full_disk_for_the_digest(source: str | Path, target: str | Path) -> None:
        if Path(target) == digest_file:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_for_the_digest)
    with pytest.raises(OutputFileError, match="No space left"):
        prepare_detached(payload, unsigned, digest_file, ImageOptions(ImageVersion.parse("2.0.0")))
    assert unsigned.read_bytes() == earlier_image
    assert digest_file.read_bytes() == earlier_digest
    assert listing(tmp_path) == {"unsigned.img", "digest.bin"}  # no temporary file, no kept copy


@pytest.mark.parametrize("failing_call", [1, 2], ids=["image's directory fsync", "digest's directory fsync"])
@pytest.mark.parametrize("earlier", [True, False], ids=["over an earlier pair", "into an empty directory"])
def test_prepare_detached_gives_both_names_back_whichever_publication_fails(
    payload: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int, earlier: bool
) -> None:
    """The directory's fsync after a rename fails (EIO): the file already has its name, so it is the
    caller's to undo. Both names then hold what they held before, never a new image beside an old digest
    or the reverse."""
    unsigned, digest_file = tmp_path / "unsigned.img", tmp_path / "digest.bin"
    before: dict[str, bytes] = {}
    if earlier:
        prepare_detached(payload, unsigned, digest_file, ImageOptions(ImageVersion.parse("1.0.0")))
        before = {path.name: path.read_bytes() for path in (unsigned, digest_file)}
    real_fsync_directory = signing.output.fsync_directory
    calls: list[Path] = []

    def failing(directory: Path) -> None:
        calls.append(directory)
        if len(calls) == failing_call:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_directory(directory)

    monkeypatch.setattr(signing.output, "fsync_directory", failing)
    with pytest.raises(OutputFileError, match="Input/output error"):
        prepare_detached(payload, unsigned, digest_file, ImageOptions(ImageVersion.parse("2.0.0")))
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

"""`mers-sign` on bad input (run in-process, `run_cli`; a real process where only one shows it): every failure
is one line on stderr that names what failed, a documented non-zero exit code, no traceback, and nothing left
behind (neither the output nor a temporary file beside it).

Images are damaged by patching bytes located through `mers-sign info --json`, so the tests depend on the
layout the tool reports rather than on offsets written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import BIN_DIR, CliResult, run_cli

Argv = list[str | Path]
MersSign = Callable[..., CliResult]

EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_KEY = 3
EXIT_FILE = 4

TLV_KEYHASH = 0x01
TLV_SHA256 = 0x10
TLV_ECDSASIG = 0x22
TLV_RSA3072 = 0x23
TLV_ED25519 = 0x24
TLV_SEC_CNT = 0x50
TLV_CUSTOM = 0xA0
TLV_INFO_MAGIC = 0x6907

VENDOR = "acme.example"
IMAGE_CLASS = "gw-1"
SECURITY_COUNTER = 5
PASSPHRASE = b"correct horse battery staple\n"

#: the 32-byte header of docs/design.md §3 (`<IIHHIIBBHII`), field by field
HEADER_FIELDS = (
    ("magic", "I"),
    ("load_addr", "I"),
    ("hdr_size", "H"),
    ("protect_tlv_size", "H"),
    ("img_size", "I"),
    ("flags", "I"),
    ("version_major", "B"),
    ("version_minor", "B"),
    ("version_revision", "H"),
    ("version_build", "I"),
    ("pad", "I"),
)


# --- locating and patching image structures ---------------------------------------------------------


def header_field(name: str) -> tuple[int, str]:
    """Offset and struct code of a header field, computed from the declared field order."""
    codes = ""
    for field_name, code in HEADER_FIELDS:
        if field_name == name:
            return struct.calcsize("<" + codes), "<" + code
        codes += code
    raise AssertionError(f"no header field {name}")


@dataclass(frozen=True)
class TlvSpot:
    """One TLV where `info --json` places it: `offset` is that of its 4-byte type/length header."""

    type: int
    offset: int
    data: bytes

    @property
    def value_offset(self) -> int:
        return self.offset + 4


@dataclass(frozen=True)
class AreaSpot:
    offset: int
    total: int
    tlvs: tuple[TlvSpot, ...]

    def find(self, tlv_type: int) -> TlvSpot:
        matches = [tlv for tlv in self.tlvs if tlv.type == tlv_type]
        assert len(matches) == 1, f"expected one TLV 0x{tlv_type:02x}, found {len(matches)}"
        return matches[0]

    @classmethod
    def from_info(cls, header: dict[str, Any], tlvs: list[dict[str, Any]]) -> AreaSpot:
        spots = []
        position = header["offset"] + 4  # after the area's {magic, total} info
        for tlv in tlvs:
            spots.append(TlvSpot(tlv["type"], position, bytes.fromhex(tlv["data"])))
            position += 4 + tlv["len"]
        assert position == header["offset"] + header["tlv_tot"], "TLVs do not fill their area"
        return cls(header["offset"], header["tlv_tot"], tuple(spots))


@dataclass(frozen=True)
class SignedFile:
    """A good signed image, its bytes, and where its parts are."""

    path: Path
    data: bytes
    hdr_size: int
    img_size: int
    protected: AreaSpot
    unprotected: AreaSpot

    @classmethod
    def read(cls, path: Path) -> SignedFile:
        result = run_cli("mers-sign", "info", "--json", path)
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        areas = info["tlv_area"]
        return cls(
            path=path,
            data=path.read_bytes(),
            hdr_size=info["header"]["hdr_size"],
            img_size=info["header"]["img_size"],
            protected=AreaSpot.from_info(areas["tlv_hdr_prot"], areas["tlvs_prot"]),
            unprotected=AreaSpot.from_info(areas["tlv_hdr"], areas["tlvs"]),
        )


def replaced(data: bytes, offset: int, new: bytes) -> bytes:
    assert offset >= 0 and offset + len(new) <= len(data)
    return data[:offset] + new + data[offset + len(new) :]


def flipped(data: bytes, offset: int, bit: int = 0) -> bytes:
    return replaced(data, offset, bytes([data[offset] ^ (1 << bit)]))


def with_header_field(image: SignedFile, name: str, value: int) -> bytes:
    offset, code = header_field(name)
    return replaced(image.data, offset, struct.pack(code, value))


def with_tlv_type(image: SignedFile, area: AreaSpot, tlv_type: int, new_type: int) -> bytes:
    return replaced(image.data, area.find(tlv_type).offset, struct.pack("<H", new_type))


def with_tlv_length(image: SignedFile, area: AreaSpot, tlv_type: int, new_length: int) -> bytes:
    return replaced(image.data, area.find(tlv_type).offset + 2, struct.pack("<H", new_length))


def with_tlv_value(image: SignedFile, area: AreaSpot, tlv_type: int, value: bytes) -> bytes:
    spot = area.find(tlv_type)
    assert len(value) == len(spot.data)
    return replaced(image.data, spot.value_offset, value)


def with_area_total(image: SignedFile, area: AreaSpot, total: int) -> bytes:
    return replaced(image.data, area.offset + 2, struct.pack("<H", total))


def with_unprotected_tlvs(image: SignedFile, tlvs: list[tuple[int, bytes]]) -> bytes:
    """The image with its unprotected TLV area rewritten to hold exactly `tlvs`, its total updated."""
    body = b"".join(struct.pack("<HH", tlv_type, len(value)) + value for tlv_type, value in tlvs)
    info = struct.pack("<HH", TLV_INFO_MAGIC, 4 + len(body))
    return image.data[: image.unprotected.offset] + info + body


def unprotected_tlvs(image: SignedFile) -> list[tuple[int, bytes]]:
    return [(tlv.type, tlv.data) for tlv in image.unprotected.tlvs]


# --- keys and images, made once per module through the CLI itself -----------------------------------


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    keygen_hash: str  # the key hash `keygen` printed


@dataclass(frozen=True)
class Kit:
    directory: Path
    rsa: KeyPair
    other_rsa: KeyPair
    locked_rsa: KeyPair  # encrypted with PASSPHRASE
    ed25519: KeyPair
    ecdsa: KeyPair
    passphrase_file: Path
    payload: Path
    rsa_image: SignedFile  # SEC_CNT, UUID_VID, UUID_CID and a custom TLV; 0x200-byte header
    ed25519_image: SignedFile


def generate(directory: Path, name: str, key_type: str, *extra: str | Path) -> KeyPair:
    private = directory / f"{name}.pem"
    result = run_cli("mers-sign", "keygen", "--type", key_type, "-o", private, *extra)
    assert result.returncode == 0, result.stderr
    match = re.search(r"key hash ([0-9a-f]{64})", result.stdout)
    assert match, result.stdout
    return KeyPair(private, directory / f"{name}.pub.pem", match.group(1))


def sign_payload(kit_dir: Path, key: Path, payload: Path, name: str) -> SignedFile:
    output = kit_dir / name
    result = run_cli(
        "mers-sign",
        "sign",
        "--key",
        key,
        "--version",
        "1.2.3+4",
        "--security-counter",
        str(SECURITY_COUNTER),
        "--vendor",
        VENDOR,
        "--class",
        IMAGE_CLASS,
        "--custom-tlv",
        f"0x{TLV_CUSTOM:x}=deadbeef",
        "-H",
        "0x200",
        payload,
        output,
    )
    assert result.returncode == 0, result.stderr
    return SignedFile.read(output)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    directory = tmp_path_factory.mktemp("kit")
    passphrase_file = directory / "passphrase.txt"
    passphrase_file.write_bytes(PASSPHRASE)
    payload = directory / "payload.bin"
    payload.write_bytes(bytes((i * 37 + 11) % 251 for i in range(6000)))
    rsa_pair = generate(directory, "rsa", "rsa-3072")
    ed25519_pair = generate(directory, "ed25519", "ed25519")
    return Kit(
        directory=directory,
        rsa=rsa_pair,
        other_rsa=generate(directory, "other-rsa", "rsa-3072"),
        locked_rsa=generate(directory, "locked", "rsa-3072", "--passphrase-file", passphrase_file),
        ed25519=ed25519_pair,
        ecdsa=generate(directory, "ecdsa", "ecdsa-p256"),
        passphrase_file=passphrase_file,
        payload=payload,
        rsa_image=sign_payload(directory, rsa_pair.private, payload, "rsa.signed"),
        ed25519_image=sign_payload(directory, ed25519_pair.private, payload, "ed25519.signed"),
    )


# --- the catalogue of bad inputs ---------------------------------------------------------------------

Builder = Callable[[Kit, Path], Argv]
Patch = Callable[[Kit], bytes]


@dataclass(frozen=True)
class Case:
    """One bad input: how to provoke it in an empty working directory, and what the failure must say.

    `cause` groups cases that are the same failure seen from the tool (a payload cut short and an
    `img_size` grown past the file are one problem); lines of different causes must differ."""

    name: str
    cause: str
    exit_code: int
    names: tuple[str, ...]  # substrings the error line must contain: the field, file or step
    argv: Builder
    output: str | None = None  # the file the command would have written, relative to the workdir


def sign_with(
    key: Callable[[Kit, Path], Path],
    *options: str,
    payload: str = "",
    output: str = "out/image.signed",
) -> Builder:
    """A `sign` command writing `output` (its directory `out/` made empty beforehand); `payload` names a
    workdir file instead of the good payload. `{workdir}` in an option stands for the workdir."""

    def build(kit: Kit, workdir: Path) -> Argv:
        (workdir / "out").mkdir()
        source = workdir / payload if payload else kit.payload
        extra = [option.format(workdir=workdir) for option in options]
        return ["sign", "--key", key(kit, workdir), *extra, "--version", "1.0.0", source, workdir / output]

    return build


def verify_image(
    patch: Patch,
    *options: str,
    trust: Callable[[Kit], list[Path]] = lambda kit: [kit.rsa.public],
) -> Builder:
    """A `verify` of the image bytes `patch` returns, written into the workdir."""

    def build(kit: Kit, workdir: Path) -> Argv:
        image = workdir / "image.signed"
        image.write_bytes(patch(kit))
        keys: Argv = []
        for key in trust(kit):
            keys += ["--key", key]
        return ["verify", *keys, *options, image]

    return build


def rsa_cut(where: Callable[[SignedFile], int]) -> Patch:
    return lambda kit: kit.rsa_image.data[: where(kit.rsa_image)]


def rsa_flip(where: Callable[[SignedFile], int], bit: int = 0) -> Patch:
    return lambda kit: flipped(kit.rsa_image.data, where(kit.rsa_image), bit)


def garbage_key(_: Kit, workdir: Path) -> Path:
    path = workdir / "garbage.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    return path


def rsa_2048_key(_: Kit, workdir: Path) -> Path:
    """A well-formed key of a size MCUboot images here do not carry (only RSA-3072)."""
    path = workdir / "rsa2048.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def wrong_passphrase_for_locked_key(kit: Kit, workdir: Path) -> Path:
    (workdir / "wrong.txt").write_bytes(b"not the passphrase\n")
    return kit.locked_rsa.private


def good_rsa(kit: Kit) -> bytes:
    return kit.rsa_image.data


def two_sha256(kit: Kit) -> bytes:
    tlvs = unprotected_tlvs(kit.rsa_image)
    assert tlvs[0][0] == TLV_SHA256
    return with_unprotected_tlvs(kit.rsa_image, [tlvs[0], *tlvs])


def no_sha256(kit: Kit) -> bytes:
    tlvs = unprotected_tlvs(kit.rsa_image)
    return with_unprotected_tlvs(kit.rsa_image, [tlv for tlv in tlvs if tlv[0] != TLV_SHA256])


def keyhash_of(kit: Kit, pair: KeyPair) -> bytes:
    image = kit.rsa_image
    return with_tlv_value(image, image.unprotected, TLV_KEYHASH, bytes.fromhex(pair.keygen_hash))


def keyhash_flipped(kit: Kit) -> bytes:
    return flipped(kit.rsa_image.data, kit.rsa_image.unprotected.find(TLV_KEYHASH).value_offset + 7, 3)


def payload_at(fraction: float) -> Callable[[SignedFile], int]:
    return lambda image: image.hdr_size + min(int(image.img_size * fraction), image.img_size - 1)


CASES = (
    # --- files and keys given to `sign`
    Case(
        "missing input file",
        "input missing",
        EXIT_FILE,
        ("absent.bin", "does not exist"),
        sign_with(lambda kit, _: kit.rsa.private, payload="absent.bin"),
        "out/image.signed",
    ),
    Case(
        "missing key file",
        "key missing",
        EXIT_KEY,
        ("absent.pem", "does not exist"),
        sign_with(lambda _, workdir: workdir / "absent.pem"),
        "out/image.signed",
    ),
    Case(
        "wrong passphrase",
        "wrong passphrase",
        EXIT_KEY,
        ("locked.pem", "wrong passphrase"),
        sign_with(wrong_passphrase_for_locked_key, "--passphrase-file", "{workdir}/wrong.txt"),
        "out/image.signed",
    ),
    Case(
        "encrypted key without passphrase",
        "passphrase required",
        EXIT_KEY,
        ("locked.pem", "encrypted", "--passphrase-file"),
        sign_with(lambda kit, _: kit.locked_rsa.private),
        "out/image.signed",
    ),
    Case(
        "public key given to sign",
        "public key to sign",
        EXIT_KEY,
        ("rsa.pub.pem", "public key", "private"),
        sign_with(lambda kit, _: kit.rsa.public),
        "out/image.signed",
    ),
    Case(
        "missing passphrase file",
        "passphrase file missing",
        EXIT_KEY,
        ("absent.txt", "passphrase file"),
        sign_with(lambda kit, _: kit.locked_rsa.private, "--passphrase-file", "{workdir}/absent.txt"),
        "out/image.signed",
    ),
    Case(
        "key file holding no key",
        "not a key",
        EXIT_KEY,
        ("garbage.pem", "not a PEM private key"),
        sign_with(garbage_key),
        "out/image.signed",
    ),
    Case(
        "RSA-2048 key given to sign",
        "unsupported key",
        EXIT_KEY,
        ("rsa2048.pem", "RSA-2048", "RSA-3072"),
        sign_with(rsa_2048_key),
        "out/image.signed",
    ),
    Case(
        "output in a missing directory",
        "output directory missing",
        EXIT_FILE,
        ("missing", "No such file or directory"),
        sign_with(lambda kit, _: kit.rsa.private, output="missing/image.signed"),
        "missing/image.signed",
    ),
    # --- files and keys given to `verify`
    Case(
        "missing image file",
        "image missing",
        EXIT_FILE,
        ("absent.signed", "does not exist"),
        lambda kit, workdir: ["verify", "--key", kit.rsa.public, workdir / "absent.signed"],
    ),
    Case(
        "missing trusted key file",
        "key missing",
        EXIT_KEY,
        ("absent.pub.pem", "does not exist"),
        lambda kit, workdir: verify_image(good_rsa, trust=lambda _: [workdir / "absent.pub.pem"])(
            kit, workdir
        ),
    ),
    Case(
        "private key given as trust anchor",
        "private key to verify",
        EXIT_KEY,
        ("rsa.pem", "private key", "getpub"),
        verify_image(good_rsa, trust=lambda kit: [kit.rsa.private]),
    ),
    # --- truncated images
    Case(
        "cut inside the header",
        "header cut",
        EXIT_REJECTED,
        ("[header]",),
        verify_image(rsa_cut(lambda _: 20)),
    ),
    Case(
        "cut inside the header padding",
        "payload beyond file",
        EXIT_REJECTED,
        ("img_size",),
        verify_image(rsa_cut(lambda image: image.hdr_size - 8)),
    ),
    Case(
        "cut inside the payload",
        "payload beyond file",
        EXIT_REJECTED,
        ("img_size",),
        verify_image(rsa_cut(payload_at(0.5))),
    ),
    Case(
        "cut inside the protected TLV info",
        "protected area cut",
        EXIT_REJECTED,
        ("protected TLV area",),
        verify_image(rsa_cut(lambda image: image.protected.offset + 2)),
    ),
    Case(
        "cut inside the protected TLVs",
        "protected area cut",
        EXIT_REJECTED,
        ("protected TLV area",),
        verify_image(rsa_cut(lambda image: image.protected.offset + image.protected.total - 3)),
    ),
    Case(
        "cut between the TLV areas",
        "TLV area cut",
        EXIT_REJECTED,
        ("TLV area",),
        verify_image(rsa_cut(lambda image: image.unprotected.offset)),
    ),
    Case(
        "cut inside the signature TLV",
        "TLV area cut",
        EXIT_REJECTED,
        ("TLV area",),
        verify_image(rsa_cut(lambda image: image.unprotected.find(TLV_RSA3072).value_offset + 100)),
    ),
    Case(
        "cut one byte short",
        "TLV area cut",
        EXIT_REJECTED,
        ("TLV area",),
        verify_image(rsa_cut(lambda image: len(image.data) - 1)),
    ),
    # --- sizes and magic numbers
    Case(
        "img_size beyond the file",
        "payload beyond file",
        EXIT_REJECTED,
        ("img_size",),
        verify_image(lambda kit: with_header_field(kit.rsa_image, "img_size", len(kit.rsa_image.data))),
    ),
    Case(
        "hdr_size beyond the file",
        "payload beyond file",
        EXIT_REJECTED,
        ("hdr_size",),
        verify_image(lambda kit: with_header_field(kit.rsa_image, "hdr_size", 0xFFFF)),
    ),
    Case(
        "hdr_size smaller than the header",
        "hdr_size too small",
        EXIT_REJECTED,
        ("hdr_size",),
        verify_image(lambda kit: with_header_field(kit.rsa_image, "hdr_size", 16)),
    ),
    Case(
        "protect_tlv_size disagreeing with its area",
        "protected size mismatch",
        EXIT_REJECTED,
        ("protect_tlv_size",),
        verify_image(
            lambda kit: with_header_field(
                kit.rsa_image, "protect_tlv_size", kit.rsa_image.protected.total + 8
            )
        ),
    ),
    Case(
        "TLV area total beyond the file",
        "TLV area cut",
        EXIT_REJECTED,
        ("TLV area",),
        verify_image(
            lambda kit: with_area_total(
                kit.rsa_image, kit.rsa_image.unprotected, kit.rsa_image.unprotected.total + 4
            )
        ),
    ),
    Case(
        "bytes after the TLV area",
        "trailing data",
        EXIT_REJECTED,
        ("[trailer]",),
        verify_image(lambda kit: kit.rsa_image.data + b"\0" * 16),
    ),
    Case(
        "wrong magic",
        "bad magic",
        EXIT_REJECTED,
        ("magic",),
        verify_image(lambda kit: with_header_field(kit.rsa_image, "magic", 0x12345678)),
    ),
    # --- TLVs
    Case(
        "signature TLV running past its area",
        "TLV overrun",
        EXIT_REJECTED,
        ("[TLV area]", "0x23", "past the end"),
        verify_image(lambda kit: with_tlv_length(kit.rsa_image, kit.rsa_image.unprotected, TLV_RSA3072, 385)),
    ),
    Case(
        "SHA256 TLV running past its area",
        "TLV overrun",
        EXIT_REJECTED,
        ("[TLV area]", "0x10", "past the end"),
        verify_image(
            lambda kit: with_tlv_length(kit.rsa_image, kit.rsa_image.unprotected, TLV_SHA256, 0xFFFF)
        ),
    ),
    Case(
        "protected TLV running past its area",
        "protected TLV overrun",
        EXIT_REJECTED,
        ("[protected TLV area]", "past the end"),
        verify_image(lambda kit: with_tlv_length(kit.rsa_image, kit.rsa_image.protected, TLV_CUSTOM, 5)),
    ),
    Case(
        # docs/design.md §3 and imgtool give custom TLVs 0x00a0-0xfffe; 0xffff is reserved
        "protected TLV of the reserved type 0xffff",
        "protected TLV type refused",
        EXIT_REJECTED,
        ("[TLV 0xffff]", "not allowed in the protected TLV area"),
        verify_image(lambda kit: with_tlv_type(kit.rsa_image, kit.rsa_image.protected, TLV_CUSTOM, 0xFFFF)),
    ),
    Case(
        "two SHA256 TLVs", "SHA256 count", EXIT_REJECTED, ("[SHA256]", "2 SHA256"), verify_image(two_sha256)
    ),
    Case("no SHA256 TLV", "SHA256 count", EXIT_REJECTED, ("[SHA256]", "0 SHA256"), verify_image(no_sha256)),
    # --- keys and signatures
    Case(
        "signed by an unknown key",
        "unknown key",
        EXIT_REJECTED,
        ("[KEYHASH]", "untrusted"),
        verify_image(good_rsa, trust=lambda kit: [kit.other_rsa.public]),
    ),
    Case(
        "KEYHASH with one bit flipped",
        "KEYHASH mismatch",
        EXIT_REJECTED,
        ("[KEYHASH]", "does not match"),
        verify_image(keyhash_flipped),
    ),
    Case(
        "KEYHASH naming the trusted key of another algorithm",
        "KEYHASH mismatch",
        EXIT_REJECTED,
        ("[KEYHASH]", "does not match"),
        verify_image(
            lambda kit: keyhash_of(kit, kit.ed25519),
            trust=lambda kit: [kit.rsa.public, kit.ed25519.public],
        ),
    ),
    Case(
        "Ed25519 signature relabelled ECDSASIG",
        "signature type",
        EXIT_REJECTED,
        ("[signature]", "ECDSASIG", "ED25519"),
        verify_image(
            lambda kit: with_tlv_type(
                kit.ed25519_image, kit.ed25519_image.unprotected, TLV_ED25519, TLV_ECDSASIG
            ),
            trust=lambda kit: [kit.ed25519.public],
        ),
    ),
    Case(
        "RSA3072 signature relabelled ECDSASIG",
        "signature size",
        EXIT_REJECTED,
        ("ECDSASIG", "384"),
        verify_image(
            lambda kit: with_tlv_type(kit.rsa_image, kit.rsa_image.unprotected, TLV_RSA3072, TLV_ECDSASIG)
        ),
    ),
    # --- any flipped bit in the signed range
    *(
        Case(
            f"flipped bit in the {where}",
            "hash mismatch",
            EXIT_REJECTED,
            ("[SHA256]", "differs"),
            verify_image(rsa_flip(offset, bit)),
        )
        for where, offset, bit in (
            ("header version", lambda _: header_field("version_major")[0], 0),
            ("header load address", lambda _: header_field("load_addr")[0] + 3, 7),
            ("header padding", lambda image: image.hdr_size - 1, 4),
            ("payload start", payload_at(0.0), 0),
            ("payload middle", payload_at(0.5), 5),
            ("payload end", payload_at(1.0), 7),
            ("protected security counter", lambda image: image.protected.find(TLV_SEC_CNT).value_offset, 1),
            ("protected custom TLV", lambda image: image.protected.find(TLV_CUSTOM).value_offset + 3, 2),
        )
    ),
    # --- the device's constraints
    Case(
        "security counter below the floor",
        "security counter",
        EXIT_REJECTED,
        ("[SEC_CNT]", str(SECURITY_COUNTER), str(SECURITY_COUNTER + 1)),
        verify_image(good_rsa, "--min-security-counter", str(SECURITY_COUNTER + 1)),
    ),
    Case(
        "wrong vendor",
        "vendor",
        EXIT_REJECTED,
        ("[UUID_VID]",),
        verify_image(good_rsa, "--vendor", "other.example"),
    ),
    Case(
        "wrong class",
        "class",
        EXIT_REJECTED,
        ("[UUID_CID]",),
        verify_image(good_rsa, "--vendor", VENDOR, "--class", "gw-2"),
    ),
    Case(
        "slot too small",
        "slot size",
        EXIT_REJECTED,
        ("[img_size]", "slot"),
        verify_image(good_rsa, "--slot-size", "4096"),
    ),
)


# --- running a case once and remembering what happened ---------------------------------------------


@dataclass(frozen=True)
class Observation:
    result: CliResult
    workdir: Path
    files_before: frozenset[str]
    files_after: frozenset[str]
    output_exists: bool


def listing(directory: Path) -> frozenset[str]:
    """Every path under `directory`, hidden temporary files included."""
    return frozenset(str(path.relative_to(directory)) for path in directory.rglob("*"))


@pytest.fixture(scope="module")
def observations() -> dict[str, Observation]:
    return {}


@pytest.fixture
def observe(
    kit: Kit,
    mers_sign: MersSign,
    observations: dict[str, Observation],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[Case], Observation]:
    """Run a case (once per module; the distinctness test reuses what the per-case tests saw)."""

    def run(case: Case) -> Observation:
        if case.name not in observations:
            workdir = tmp_path_factory.mktemp("case")
            argv = case.argv(kit, workdir)
            before = listing(workdir)
            result = mers_sign(*argv)
            output_exists = case.output is not None and (workdir / case.output).exists()
            observations[case.name] = Observation(result, workdir, before, listing(workdir), output_exists)
        return observations[case.name]

    return run


def normalised(line: str, workdir: Path, kit: Kit) -> str:
    """The error line without what varies between otherwise identical failures: paths and numbers."""
    line = line.replace(str(workdir), "<dir>").replace(str(kit.directory), "<kit>")
    return re.sub(r"0x[0-9a-fA-F]+|[0-9a-f]{16,}|\d+", "#", line)


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "_") for case in CASES])
def test_bad_input_fails_with_one_line_naming_it_and_leaves_nothing_behind(
    case: Case, observe: Callable[[Case], Observation]
) -> None:
    seen = observe(case)
    line = seen.result.error_line  # exactly one line, no traceback
    assert line.startswith("mers-sign: error: "), line
    for part in case.names:
        assert part in line, f"{part!r} not named in {line!r}"
    assert seen.result.returncode == case.exit_code, line
    assert seen.result.stdout == ""
    assert not seen.output_exists, f"{case.output} was written"
    assert seen.files_after == seen.files_before, "files were left behind"


def test_different_problems_give_different_error_lines(
    kit: Kit, observe: Callable[[Case], Observation]
) -> None:
    lines: dict[str, tuple[str, str]] = {}  # normalised line -> (cause, case)
    for case in CASES:
        seen = observe(case)
        line = normalised(seen.result.error_line, seen.workdir, kit)
        if line in lines:
            cause, other = lines[line]
            assert cause == case.cause, f"{case.name!r} and {other!r} both say {line!r}"
        lines[line] = (case.cause, case.name)


def test_help_documents_every_exit_code_the_failures_use(mers_sign: MersSign) -> None:
    result = mers_sign("--help")
    assert result.returncode == 0
    epilog = re.search(r"Exit codes: (.*?)\.", " ".join(result.stdout.split()))
    assert epilog, result.stdout
    documented = dict(re.findall(r"(\d+) ([a-z ]+)", epilog.group(1)))
    assert documented == {
        "0": "ok",
        "1": "image rejected",
        "2": "usage",
        "3": "key problem",
        "4": "file problem",
        "130": "interrupted",  # Ctrl-C (tests/test_console_scripts.py)
    }
    assert {str(case.exit_code) for case in CASES} == {"1", "3", "4"}


# --- usage errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["sign", "--key", "k.pem", "in", "out"], id="sign_without_version"),
        pytest.param(
            ["verify", "--key", "k.pub.pem", "--slot-size", "big", "img"], id="slot_size_not_a_number"
        ),
        pytest.param(["verify", "--key", "k.pub.pem", "--class", "gw-1", "img"], id="class_without_vendor"),
        pytest.param(["frobnicate"], id="unknown_command"),
    ],
)
def test_malformed_command_lines_exit_with_the_usage_code(mers_sign: MersSign, arguments: list[str]) -> None:
    result = mers_sign(*arguments)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


#: option values `sign` accepts from click but its library refuses, and the field each error names
REFUSED_SIGN_OPTIONS = (
    (("--version", "banana"), "[version]"),
    (("--version", "1.0", "-H", "8"), "[header_size]"),
    (("--version", "1.0", "--class", "gw-1"), "[vendor]"),
    (("--version", "1.0", "--custom-tlv", "0x10=00"), "[custom_tlv]"),
)


def test_option_values_sign_refuses_are_one_line_usage_errors(
    kit: Kit, mers_sign: MersSign, tmp_path: Path
) -> None:
    """--help documents 2 for usage errors; a refused option value is one, whichever layer refuses it
    (click already exits 2 for `-H abc`, so `-H 8` must too)."""
    exit_codes = {}
    for options, field_name in REFUSED_SIGN_OPTIONS:
        result = mers_sign("sign", "--key", kit.rsa.private, *options, kit.payload, tmp_path / "image.signed")
        assert field_name in result.error_line
        exit_codes[" ".join(options)] = result.returncode
    assert list(tmp_path.iterdir()) == []
    assert exit_codes == dict.fromkeys(exit_codes, EXIT_USAGE), f"exit codes: {exit_codes}"


# --- failures after the output was opened -----------------------------------------------------------


def test_sign_removes_its_temporary_file_when_the_input_is_beyond_the_format(
    kit: Kit, mers_sign: MersSign, tmp_path: Path
) -> None:
    """The 4 GiB check runs after the temporary output exists: it must still vanish."""
    huge = tmp_path / "in" / "huge.bin"
    huge.parent.mkdir()
    with huge.open("wb") as handle:
        handle.truncate(2**32 + 1)  # sparse: costs no disk
    out = tmp_path / "out"
    out.mkdir()
    result = mers_sign("sign", "--key", kit.rsa.private, "--version", "1.0", huge, out / "image.signed")
    assert "4 GiB" in result.error_line
    assert result.returncode == EXIT_FILE
    assert list(out.iterdir()) == []


def test_sign_removes_its_temporary_file_when_the_protected_tlvs_overflow_their_area(
    kit: Kit, mers_sign: MersSign, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    big = "ab" * 33_000
    result = mers_sign(
        "sign",
        "--key",
        kit.rsa.private,
        "--version",
        "1.0",
        "--custom-tlv",
        f"0xa0={big}",
        "--custom-tlv",
        f"0xa1={big}",
        kit.payload,
        out / "image.signed",
    )
    assert "65535" in result.error_line
    assert result.returncode != 0
    assert list(out.iterdir()) == []


def test_a_pin_file_that_is_not_text_fails_with_one_line_not_a_traceback(
    kit: Kit, mers_sign: MersSign, tmp_path: Path
) -> None:
    pin = tmp_path / "pin.bin"
    pin.write_bytes(b"\xff\xfe1234\n")
    out = tmp_path / "out"
    out.mkdir()
    result = mers_sign(
        "sign", "--key", kit.rsa.private, "--pkcs11-pin-file", pin, "--version", "1.0", kit.payload, out / "x"
    )
    assert "pin.bin" in result.error_line  # one line, no traceback
    assert result.returncode == EXIT_KEY
    assert list(out.iterdir()) == []


# --- inputs that are not regular files ---------------------------------------------------------------


#: what a pipe holds before anyone reads it (Linux's default pipe capacity): `fifo_holding` writes no more
PIPE_CAPACITY = 65536


@contextmanager
def fifo_holding(path: Path, data: bytes) -> Iterator[Path]:
    """A named pipe at `path` with `data` waiting in it and a writer holding it open, as behind
    `cat FILE > PIPE`: a reader finds the data at once, and opening it blocks nobody."""
    assert len(data) <= PIPE_CAPACITY, "the write below would block with nobody reading"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR)  # Linux: a FIFO opened read-write needs no reader yet
    try:
        os.write(writer, data)
        yield path
    finally:
        os.close(writer)


@pytest.mark.parametrize("command", ["sign", "digest"])
@pytest.mark.parametrize("source", ["named pipe", "/dev/stdin", "/dev/null"])
def test_sign_and_digest_refuse_an_input_that_is_not_a_regular_file(
    kit: Kit, mers_sign: MersSign, tmp_path: Path, command: str, source: str
) -> None:
    """`cat payload | mers-sign sign ... /dev/stdin out` used to exit 0 with an image of an empty payload:
    a pipe's or a device's st_size is 0. Such an input is refused, naming it, and nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    payload = kit.payload.read_bytes()
    options: Argv = ["--key", kit.rsa.private] if command == "sign" else ["-o", out / "digest.bin"]
    with fifo_holding(tmp_path / "payload.pipe", payload) as pipe:
        given = pipe if source == "named pipe" else Path(source)
        result = mers_sign(
            command, *options, "--version", "1.0", given, out / "image", input_bytes=payload, process=True
        )  # a process: /dev/stdin is then the pipe the input is written to
    assert result.returncode == EXIT_FILE, result.stdout + result.stderr
    assert f"{given} is a " in result.error_line
    assert "not a regular file" in result.error_line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("source", ["named pipe", "/dev/stdin"])
def test_verify_and_info_refuse_an_image_that_is_not_a_regular_file(
    kit: Kit, mers_sign: MersSign, tmp_path: Path, source: str
) -> None:
    """Reading a pipe at offsets, with a size of 0, misreads it (or fails with a traceback)."""
    image = kit.rsa_image.data
    with fifo_holding(tmp_path / "image.pipe", image) as pipe:
        given = pipe if source == "named pipe" else Path(source)
        for args in (("verify", "--key", kit.rsa.public), ("info",)):
            result = mers_sign(*args, given, input_bytes=image, process=True)  # /dev/stdin: a pipe
            assert result.returncode == EXIT_FILE, (args, result.stdout + result.stderr)
            assert f"{given} is a pipe, not a regular file" in result.error_line


# --- hardware constraints given to verify -----------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "option"),
    [(("--vendor", ""), "--vendor"), (("--vendor", VENDOR, "--class", ""), "--class")],
    ids=["empty vendor", "empty class"],
)
def test_an_empty_vendor_or_class_given_to_verify_is_a_usage_error_not_a_skipped_check(
    kit: Kit, mers_sign: MersSign, constraint: tuple[str, ...], option: str
) -> None:
    """`--vendor "$VENDOR"` with the variable unset used to turn the hardware check off and exit 0; `sign`
    refuses an empty name, and so must `verify`."""
    result = mers_sign("verify", "--key", kit.rsa.public, *constraint, kit.rsa_image.path)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert f"[{option}]" in result.error_line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (lambda kit, out: ["sign", "--key", "/dev/zero", "--version", "1.0.0", kit.payload, out], "key"),
        (lambda kit, out: ["verify", "--key", "/dev/zero", kit.rsa_image.path], "key"),
        (
            lambda kit, out: [
                "attach",
                "--signature",
                "/dev/zero",
                "--pubkey",
                kit.rsa.public,
                kit.rsa_image.path,
                out,
            ],
            "signature",
        ),
    ],
    ids=["sign key", "verify key", "attach signature"],
)
def test_an_endless_key_or_signature_file_is_an_error_not_a_read_without_end(
    kit: Kit, mers_sign: MersSign, tmp_path: Path, command: Callable[[Kit, Path], list[Any]], field: str
) -> None:
    """/dev/zero given by mistake: the read stops at a bound far beyond any key or signature."""
    result = mers_sign(*command(kit, tmp_path / "out.img"))
    assert result.returncode not in (0, 1), result.stderr
    assert "holds more than" in result.error_line and field in result.error_line
    assert list(tmp_path.iterdir()) == []


# --- keygen ------------------------------------------------------------------------------------------


def test_keygen_creates_the_private_key_readable_by_its_owner_only(kit: Kit) -> None:
    for pair in (kit.rsa, kit.locked_rsa, kit.ed25519, kit.ecdsa):
        assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600, pair.private
        assert stat.S_IMODE(pair.public.stat().st_mode) & 0o077 != 0o077


def test_keygen_refuses_to_overwrite_an_existing_key(mers_sign: MersSign, tmp_path: Path) -> None:
    private = tmp_path / "release.pem"
    assert mers_sign("keygen", "--type", "ed25519", "-o", private).returncode == 0
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    result = mers_sign("keygen", "--type", "ed25519", "-o", private)
    assert "release.pem already exists" in result.error_line
    assert result.returncode == EXIT_KEY
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_keygen_refuses_when_only_the_public_half_exists(mers_sign: MersSign, tmp_path: Path) -> None:
    public = tmp_path / "release.pub.pem"
    public.write_bytes(b"someone's public key\n")
    result = mers_sign("keygen", "--type", "ed25519", "-o", tmp_path / "release.pem")
    assert "release.pub.pem already exists" in result.error_line
    assert result.returncode == EXIT_KEY
    assert sorted(tmp_path.iterdir()) == [public]
    assert public.read_bytes() == b"someone's public key\n"


def test_keygen_leaves_no_private_key_when_the_public_half_cannot_be_written(
    mers_sign: MersSign, tmp_path: Path
) -> None:
    """A dangling symlink where the public key goes: the public half cannot be created, so the run fails,
    and a lone private key (with no public half, and an error saying nothing was made) must not remain."""
    public = tmp_path / "release.pub.pem"
    public.symlink_to(tmp_path / "elsewhere" / "nothing")
    result = mers_sign("keygen", "--type", "ed25519", "-o", tmp_path / "release.pem")
    assert "release.pub.pem" in result.error_line
    assert result.returncode == EXIT_KEY
    assert sorted(tmp_path.iterdir()) == [public], "keygen failed but left files behind"


def test_keygen_refuses_a_passphrase_too_long_to_encrypt_a_key_with_one_line(
    mers_sign: MersSign, tmp_path: Path
) -> None:
    """cryptography encrypts with at most 1023 bytes of passphrase; a longer one was a traceback."""
    passphrase = tmp_path / "passphrase.txt"
    passphrase.write_bytes(b"x" * 1024 + b"\n")
    result = mers_sign(
        "keygen", "--type", "ed25519", "-o", tmp_path / "release.pem", "--passphrase-file", passphrase
    )
    assert "passphrase.txt" in result.error_line
    assert "1023" in result.error_line
    assert result.returncode == EXIT_KEY
    assert list(tmp_path.iterdir()) == [passphrase]


def test_keygen_in_a_missing_directory_fails_with_one_line(mers_sign: MersSign, tmp_path: Path) -> None:
    result = mers_sign("keygen", "--type", "ed25519", "-o", tmp_path / "missing" / "release.pem")
    assert "No such file or directory" in result.error_line
    assert result.returncode in (EXIT_KEY, EXIT_FILE)
    assert list(tmp_path.iterdir()) == []


# --- getpub ------------------------------------------------------------------------------------------


def getpub(mers_sign: MersSign, key: Path, output_format: str, *extra: str | Path) -> bytes:
    """A text format of `getpub` from stdout (der goes through -o: stdout is decoded as text)."""
    result = mers_sign("getpub", key, "--format", output_format, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.encode()


def embedded_der(pem: bytes) -> bytes:
    """What MCUboot embeds for a PEM public key: PKCS#1 for RSA, SubjectPublicKeyInfo otherwise."""
    key = serialization.load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def c_array_bytes(text: str) -> tuple[bytes, int]:
    """The bytes of the C array `getpub --format c` prints, and the length it declares."""
    body = text[text.index("{") + 1 : text.index("}")]
    values = bytes(int(token, 16) for token in re.findall(r"0x([0-9a-f]{2})", body))
    length = re.search(r"_len = (\d+);", text)
    assert length, text
    return values, int(length.group(1))


@pytest.mark.parametrize("pair_name", ["rsa", "ed25519", "ecdsa"])
def test_getpub_formats_describe_one_key(
    kit: Kit, mers_sign: MersSign, tmp_path: Path, pair_name: str
) -> None:
    pair: KeyPair = getattr(kit, pair_name)
    der_file = tmp_path / "key.der"
    assert mers_sign("getpub", pair.private, "--format", "der", "-o", der_file).returncode == 0
    der = der_file.read_bytes()
    pem = getpub(mers_sign, pair.private, "pem")
    key_hash = getpub(mers_sign, pair.private, "hash").decode().strip()
    c_values, c_length = c_array_bytes(getpub(mers_sign, pair.private, "c").decode())

    assert pem == pair.public.read_bytes()
    assert der == embedded_der(pem)
    assert key_hash == hashlib.sha256(der).hexdigest() == pair.keygen_hash
    assert c_values == der
    assert c_length == len(der)
    assert getpub(mers_sign, pair.public, "hash").decode().strip() == key_hash


def test_getpub_hash_is_the_keyhash_the_signed_image_carries(kit: Kit, mers_sign: MersSign) -> None:
    key_hash = getpub(mers_sign, kit.rsa.public, "hash").decode().strip()
    assert kit.rsa_image.unprotected.find(TLV_KEYHASH).data.hex() == key_hash


def test_getpub_opens_an_encrypted_key_only_with_its_passphrase(kit: Kit, mers_sign: MersSign) -> None:
    unlocked = getpub(mers_sign, kit.locked_rsa.private, "pem", "--passphrase-file", kit.passphrase_file)
    assert unlocked == kit.locked_rsa.public.read_bytes()
    refused = mers_sign("getpub", kit.locked_rsa.private)
    assert "--passphrase-file" in refused.error_line
    assert refused.returncode == EXIT_KEY
    assert refused.stdout == ""


def test_getpub_to_a_missing_directory_fails_with_one_line_and_writes_nothing(
    kit: Kit, mers_sign: MersSign, tmp_path: Path
) -> None:
    result = mers_sign("getpub", kit.rsa.public, "-o", tmp_path / "missing" / "key.pem")
    assert "missing" in result.error_line
    assert result.returncode == EXIT_FILE
    assert list(tmp_path.iterdir()) == []


def test_the_good_images_verify(kit: Kit, mers_sign: MersSign) -> None:
    """The control for every case above: without the damage, the same commands succeed."""
    rsa_ok = mers_sign(
        "verify",
        "--key",
        kit.rsa.public,
        "--min-security-counter",
        str(SECURITY_COUNTER),
        "--vendor",
        VENDOR,
        "--class",
        IMAGE_CLASS,
        "--slot-size",
        str(kit.rsa_image.img_size),
        kit.rsa_image.path,
    )
    assert rsa_ok.returncode == 0, rsa_ok.stderr
    ed_ok = mers_sign("verify", "--key", kit.ed25519.public, kit.ed25519_image.path)
    assert ed_ok.returncode == 0, ed_ok.stderr


@pytest.mark.parametrize("closed", [">&-", "2>&-"], ids=["stdout closed", "stderr closed"])
def test_a_closed_output_stream_changes_no_verdict(mers_sign: MersSign, tmp_path: Path, closed: str) -> None:
    key, payload, image = tmp_path / "k.pem", tmp_path / "payload.bin", tmp_path / "image.bin"
    assert mers_sign("keygen", "--type", "ed25519", "-o", key).returncode == 0
    payload.write_bytes(bytes(range(256)) * 64)
    assert mers_sign("sign", "--key", key, "--version", "1.0.0", payload, image).returncode == 0
    tampered = tmp_path / "tampered.bin"
    data = bytearray(image.read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    program = BIN_DIR / "mers-sign"
    for target, verdict in ((image, 0), (tampered, 1)):
        argv = [str(program), "verify", "--key", str(tmp_path / "k.pub.pem"), str(target)]
        completed = subprocess.run(
            ["sh", "-c", f'"$@" {closed}', "sh", *argv], capture_output=True, text=True, check=False
        )
        assert completed.returncode == verdict, completed.stderr
        assert "Traceback" not in completed.stderr + completed.stdout


# --- a directory where a file is wanted -----------------------------------------------------------------

#: each file a command reads or writes, given a directory: the file error (or the key error) of that file,
#: not a usage error, as for any other file it cannot use
DIRECTORY_CASES = [
    pytest.param(lambda k, d: ["verify", "--key", k.rsa.public, d], EXIT_FILE, "[image]", id="verify_image"),
    pytest.param(lambda k, d: ["verify", "--key", d, k.rsa_image.path], EXIT_KEY, "[key]", id="verify_key"),
    pytest.param(lambda k, d: ["info", d], EXIT_FILE, "[image]", id="info_image"),
    pytest.param(
        lambda k, d: ["sign", "--key", k.rsa.private, "--version", "1.0", d, d.parent / "o"],
        EXIT_FILE,
        "[input]",
        id="sign_input",
    ),
    pytest.param(
        lambda k, d: ["sign", "--key", k.rsa.private, "--version", "1.0", k.payload, d],
        EXIT_FILE,
        "[output]",
        id="sign_output",
    ),
    pytest.param(lambda k, d: ["getpub", k.rsa.private, "-o", d], EXIT_FILE, "[output]", id="getpub_output"),
]


@pytest.mark.parametrize(("argv", "code", "field"), DIRECTORY_CASES)
def test_a_directory_given_for_a_file_is_that_files_error_not_a_usage_error(
    kit: Kit,
    mers_sign: MersSign,
    tmp_path: Path,
    argv: Callable[[Kit, Path], Argv],
    code: int,
    field: str,
) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    result = mers_sign(*argv(kit, directory))
    assert result.returncode == code, result.stderr
    assert result.error_line.startswith(f"mers-sign: error: {field} ") and "directory" in result.error_line


def test_verify_json_prints_the_refusal_on_stdout_too(kit: Kit, mers_sign: MersSign, tmp_path: Path) -> None:
    """A pipeline reading `verify --json` gets a verdict whether the image is good or not."""
    tampered = tmp_path / "tampered.signed"
    data = bytearray(kit.rsa_image.data)
    data[kit.rsa_image.hdr_size + 10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    refused = mers_sign("verify", "--json", "--key", kit.rsa.public, tampered)
    assert refused.returncode == EXIT_REJECTED
    verdict = json.loads(refused.stdout)
    assert (verdict["valid"], verdict["reason"]) == (False, "HashMismatchError"), verdict
    assert verdict["error"] in refused.error_line
    accepted = mers_sign("verify", "--json", "--key", kit.rsa.public, kit.rsa_image.path)
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["valid"] is True
    silent = mers_sign("verify", "--key", kit.rsa.public, tampered)
    assert silent.returncode == EXIT_REJECTED and silent.stdout == ""  # without --json, stdout stays clean

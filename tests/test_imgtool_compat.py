"""MCUboot compatibility of `mers-sign`, proved against the reference tool, `imgtool` 2.5.0.

Both directions are exercised with imgtool as a real subprocess and real keys of each algorithm
(docs/design.md §3): imgtool accepts our images, we accept imgtool's under our strict checks, and both tools
describe an image the same way. Then the places where we deliberately part ways: imgtool ignores KEYHASH,
"verifies" without a key, and crashes on short files; our verifier refuses all three with one line naming the
field."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.signing_helpers import KeyPair, MersSign, image_info, imgtool, key_hash, succeeded

ALGORITHMS = ("rsa-3072", "ecdsa-p256", "ed25519")
VERSION = "1.2.3+4"
SECURITY_COUNTER = 7
VENDOR = "acme.example"
IMAGE_CLASS = "gw-1"
CUSTOM_TAG = 0xA0
CUSTOM_VALUE = "deadbeef"
HEADER_SIZE = 0x200
SLOT_SIZE = 0x20000
PAYLOAD_SIZE = 70_001  # odd on purpose: nothing in the format may assume alignment

TLV_INFO_SIZE = 4
TLV_HEADER_SIZE = 4
IMGTOOL_OK = "Image was correctly validated"
HEADER_FIELDS = ("magic", "load_addr", "hdr_size", "protected_tlv_size", "img_size", "flags", "version")
AREA_FIELDS = ("magic", "tlv_tot")
TLV_FIELDS = ("type", "type_name", "len", "data")


@dataclass(frozen=True)
class OurImages:
    plain: Path  # version only
    full: Path  # every protected TLV we emit, and a padded header

    def variant(self, name: str) -> Path:
        return self.plain if name == "plain" else self.full


# --- running the tools ----------------------------------------------------------------------------


def imgtool_dumpinfo(path: Path) -> dict[str, Any]:
    description: dict[str, Any] = json.loads(succeeded(imgtool("dumpinfo", "-f", "json", path)).stdout)
    return description


def imgtool_key_hash(key: Path, scratch: Path) -> str:
    """imgtool's KEYHASH of `key`, read raw from a file (its lang-c form is meant for C sources)."""
    output = scratch / f"{key.name}.imgtool-hash"
    succeeded(imgtool("getpubhash", "-k", key, "-e", "raw", "-o", output))
    return output.read_bytes().hex()


def tlv_value_offset(info: dict[str, Any], type_name: str) -> int:
    """Absolute offset of the value of the first unprotected TLV called `type_name`, computed from the area
    offset `mers-sign info --json` reports rather than from offsets hard-coded here."""
    area = info["tlv_area"]
    offset = area["tlv_hdr"]["offset"] + TLV_INFO_SIZE
    for tlv in area["tlvs"]:
        if tlv["type_name"] == type_name:
            return int(offset) + TLV_HEADER_SIZE
        offset += TLV_HEADER_SIZE + tlv["len"]
    raise AssertionError(f"no {type_name} TLV in {area['tlvs']}")


def with_bytes_replaced(image: Path, offset: int, data: bytes, output: Path) -> Path:
    content = bytearray(image.read_bytes())
    content[offset : offset + len(data)] = data
    output.write_bytes(bytes(content))
    return output


# --- keys and images, made once per algorithm -----------------------------------------------------


@pytest.fixture(scope="module", params=ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, algorithm: str) -> Path:
    return tmp_path_factory.mktemp(f"compat-{algorithm}")


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    path.write_bytes(bytes((i * 131 + 7) % 251 for i in range(PAYLOAD_SIZE)))
    return path


def mers_keygen(directory: Path, name: str, algorithm: str) -> KeyPair:
    private = directory / f"{name}.pem"
    succeeded(run_cli("mers-sign", "keygen", "--type", algorithm, "-o", private))
    return KeyPair(private, directory / f"{name}.pub.pem")


@pytest.fixture(scope="module")
def our_key(workdir: Path, algorithm: str) -> KeyPair:
    return mers_keygen(workdir, "ours", algorithm)


@pytest.fixture(scope="module")
def other_key(workdir: Path, algorithm: str) -> KeyPair:
    """A second key of the same algorithm, which no verification below is told to trust unless it says so."""
    return mers_keygen(workdir, "other", algorithm)


@pytest.fixture(scope="module")
def imgtool_key(workdir: Path, algorithm: str) -> KeyPair:
    private = workdir / "imgtool.pem"
    public = workdir / "imgtool.pub.pem"
    succeeded(imgtool("keygen", "-t", algorithm, "-k", private))
    succeeded(imgtool("getpub", "-k", private, "-e", "pem", "-o", public))
    return KeyPair(private, public)


@pytest.fixture(scope="module")
def our_images(workdir: Path, our_key: KeyPair, payload: Path) -> OurImages:
    plain = workdir / "ours-plain.img"
    full = workdir / "ours-full.img"
    succeeded(run_cli("mers-sign", "sign", "--key", our_key.private, "--version", VERSION, payload, plain))
    every_option = (
        "--security-counter", str(SECURITY_COUNTER), "--vendor", VENDOR, "--class", IMAGE_CLASS,
        "--custom-tlv", f"0x{CUSTOM_TAG:x}={CUSTOM_VALUE}", "--header-size", hex(HEADER_SIZE),
    )  # fmt: skip
    succeeded(
        run_cli(
            "mers-sign", "sign", "--key", our_key.private, "--version", VERSION, *every_option, payload, full
        )
    )
    return OurImages(plain, full)


@pytest.fixture(scope="module")
def imgtool_image(workdir: Path, imgtool_key: KeyPair, payload: Path) -> Path:
    image = workdir / "imgtool.img"
    options = (
        "-k", imgtool_key.private, "--version", VERSION, "-s", str(SECURITY_COUNTER),
        "--vid", VENDOR, "--cid", IMAGE_CLASS, "--custom-tlv", hex(CUSTOM_TAG), f"0x{CUSTOM_VALUE}",
        "--pad-header", "-H", hex(HEADER_SIZE), "-S", str(SLOT_SIZE),
    )  # fmt: skip
    succeeded(imgtool("sign", *options, payload, image))
    return image


@pytest.fixture(scope="module")
def imgtool_image_info(imgtool_image: Path) -> dict[str, Any]:
    return image_info(imgtool_image)


@pytest.fixture(scope="module")
def other_key_hash(other_key: KeyPair) -> bytes:
    return bytes.fromhex(key_hash(other_key.public))


#: for checks made before any key is used (usage, size, hardware, counter), one algorithm is enough
ONE_ALGORITHM = pytest.mark.parametrize("algorithm", ["ecdsa-p256"], indirect=True)


def strict_verify_args(key: Path, image: Path) -> list[str | Path]:
    return [
        "verify", "--key", key, "--vendor", VENDOR, "--class", IMAGE_CLASS,
        "--min-security-counter", str(SECURITY_COUNTER), image,
    ]  # fmt: skip


# --- imgtool accepts ours -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "full"])
def test_our_image_passes_imgtool_verify_with_the_same_digest(
    our_images: OurImages, our_key: KeyPair, variant: str
) -> None:
    image = our_images.variant(variant)
    result = imgtool("verify", "-k", our_key.public, image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert IMGTOOL_OK in result.stdout
    digest = next(t["data"] for t in image_info(image)["tlv_area"]["tlvs"] if t["type_name"] == "SHA256")
    assert f"Image digest: {digest}" in result.stdout
    assert f"Image version: {VERSION}" in result.stdout


def test_imgtool_refuses_our_image_under_a_key_that_did_not_sign_it(
    our_images: OurImages, other_key: KeyPair
) -> None:
    """The control for the test above: imgtool's `-k` does check the signature, so its OK means something."""
    result = imgtool("verify", "-k", other_key.public, our_images.full)
    assert result.returncode != 0
    assert IMGTOOL_OK not in result.stdout


# --- we accept imgtool's --------------------------------------------------------------------------


def test_imgtool_signed_image_passes_our_strict_verify(
    mers_sign: MersSign, imgtool_image: Path, imgtool_key: KeyPair, workdir: Path
) -> None:
    args = strict_verify_args(imgtool_key.public, imgtool_image)
    verified = json.loads(succeeded(mers_sign(*args, "--slot-size", str(SLOT_SIZE), "--json")).stdout)
    vendor = uuid.uuid5(uuid.NAMESPACE_DNS, VENDOR)
    assert verified["version"] == VERSION
    assert verified["security_counter"] == SECURITY_COUNTER
    assert verified["hdr_size"] == HEADER_SIZE
    assert verified["img_size"] == PAYLOAD_SIZE
    assert verified["vendor_uuid"] == str(vendor)
    assert verified["class_uuid"] == str(uuid.uuid5(vendor, IMAGE_CLASS))
    assert verified["custom_tlvs"] == {f"0x{CUSTOM_TAG:04x}": CUSTOM_VALUE}
    assert verified["signed_by"] == [imgtool_key_hash(imgtool_key.public, workdir)]


@ONE_ALGORITHM
@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--min-security-counter", str(SECURITY_COUNTER + 1), "SEC_CNT"),
        ("--class", "gw-2", "UUID_CID"),
        ("--vendor", "other.example", "UUID_VID"),
    ],
)
def test_imgtool_signed_image_is_held_to_the_device_constraints(
    mers_sign: MersSign, imgtool_image: Path, imgtool_key: KeyPair, option: str, value: str, field: str
) -> None:
    args = strict_verify_args(imgtool_key.public, imgtool_image)
    args[args.index(option) + 1] = value
    result = mers_sign(*args)
    assert result.returncode == 1
    assert field in result.error_line


def test_getpub_hash_equals_imgtool_getpubhash(imgtool_key: KeyPair, our_key: KeyPair, workdir: Path) -> None:
    for key in (imgtool_key.private, our_key.public):
        assert key_hash(key) == imgtool_key_hash(key, workdir), key.name


# --- both describe an image the same way ----------------------------------------------------------


def comparable_tlvs(tlvs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{field: tlv[field] for field in TLV_FIELDS} for tlv in tlvs]


@pytest.mark.parametrize("kind", ["ours-plain", "ours-full", "imgtool"])
def test_info_json_matches_imgtool_dumpinfo(our_images: OurImages, imgtool_image: Path, kind: str) -> None:
    """Our JSON carries extra keys (offsets, decoded values, file size); every key both have must agree.
    imgtool writes an empty protected area as `{}` and `[]`, we leave the keys out."""
    image = imgtool_image if kind == "imgtool" else our_images.variant(kind.removeprefix("ours-"))
    ours, theirs = image_info(image), imgtool_dumpinfo(image)

    assert {f: ours["header"][f] for f in HEADER_FIELDS} == {f: theirs["header"][f] for f in HEADER_FIELDS}
    our_areas, their_areas = ours["tlv_area"], theirs["tlv_area"]
    assert {f: our_areas["tlv_hdr"][f] for f in AREA_FIELDS} == {
        f: their_areas["tlv_hdr"][f] for f in AREA_FIELDS
    }
    assert comparable_tlvs(our_areas["tlvs"]) == comparable_tlvs(their_areas["tlvs"])
    if their_areas["tlvs_prot"]:
        assert {f: our_areas["tlv_hdr_prot"][f] for f in AREA_FIELDS} == {
            f: their_areas["tlv_hdr_prot"][f] for f in AREA_FIELDS
        }
        assert comparable_tlvs(our_areas["tlvs_prot"]) == comparable_tlvs(their_areas["tlvs_prot"])
    else:
        assert our_areas["tlv_hdr_prot"] == {}
        assert our_areas["tlvs_prot"] == []
    assert kind == "ours-plain" or len(their_areas["tlvs_prot"]) == 4  # SEC_CNT, UUID_VID, UUID_CID, 0xa0


# --- where we are stricter than imgtool -----------------------------------------------------------


@pytest.mark.parametrize("replacement", ["another key's hash", "random bytes"])
def test_tampered_keyhash_passes_imgtool_but_not_our_verify(
    mers_sign: MersSign,
    imgtool_image: Path,
    imgtool_image_info: dict[str, Any],
    imgtool_key: KeyPair,
    other_key_hash: bytes,
    tmp_path: Path,
    replacement: str,
) -> None:
    """imgtool never reads KEYHASH, yet it is what a device uses to pick the key: an image that names one
    key and is signed by another must not be taken as valid."""
    forged_hash = (
        other_key_hash
        if replacement == "another key's hash"
        else hashlib.sha256(b"no key hashes to this").digest()
    )
    offset = tlv_value_offset(imgtool_image_info, "KEYHASH")
    tampered = with_bytes_replaced(imgtool_image, offset, forged_hash, tmp_path / "tampered.img")

    theirs = imgtool("verify", "-k", imgtool_key.public, tampered)
    assert theirs.returncode == 0
    assert IMGTOOL_OK in theirs.stdout

    ours = mers_sign("verify", "--key", imgtool_key.public, tampered)
    assert ours.returncode == 1
    assert "KEYHASH" in ours.error_line


def test_keyhash_redirected_to_another_trusted_key_is_reported_as_a_keyhash_error(
    mers_sign: MersSign,
    imgtool_image: Path,
    imgtool_image_info: dict[str, Any],
    imgtool_key: KeyPair,
    other_key: KeyPair,
    other_key_hash: bytes,
    tmp_path: Path,
) -> None:
    """A device may trust several keys (release and backup). A KEYHASH rewritten to name the other trusted
    key is the same forgery as above and must be named as such (KeyHashMismatchError: "a signature verifies
    with a trusted key, but the KEYHASH beside it names another key"), not blamed on the other key's
    signature, which that key never made."""
    offset = tlv_value_offset(imgtool_image_info, "KEYHASH")
    tampered = with_bytes_replaced(imgtool_image, offset, other_key_hash, tmp_path / "tampered.img")

    ours = mers_sign("verify", "--key", imgtool_key.public, "--key", other_key.public, tampered)
    assert ours.returncode == 1
    assert "KEYHASH" in ours.error_line


@ONE_ALGORITHM
def test_verify_without_a_key_is_a_usage_error_where_imgtool_checks_only_the_hash(
    mers_sign: MersSign, imgtool_image: Path
) -> None:
    theirs = imgtool("verify", imgtool_image)
    assert theirs.returncode == 0
    assert IMGTOOL_OK in theirs.stdout

    ours = mers_sign("verify", imgtool_image)
    assert ours.returncode == 2
    assert "--key" in ours.stderr
    assert "Traceback" not in ours.stderr


def test_image_signed_by_a_key_we_were_not_given_is_rejected_as_untrusted(
    mers_sign: MersSign, imgtool_image: Path, other_key: KeyPair
) -> None:
    result = mers_sign("verify", "--key", other_key.public, imgtool_image)
    assert result.returncode == 1
    assert "KEYHASH" in result.error_line
    assert "untrusted" in result.error_line


@ONE_ALGORITHM
def test_truncated_image_gets_one_line_from_verify_and_info(
    mers_sign: MersSign,
    imgtool_image: Path,
    imgtool_image_info: dict[str, Any],
    imgtool_key: KeyPair,
    tmp_path: Path,
) -> None:
    """`imgtool verify -k KEY` on these files dies with a Python traceback (`struct.error: unpack requires a
    buffer of 4 bytes`, or of 8 for a file shorter than the header): it unpacks before it checks a length.
    Ours checks every length against the file size first and prints one line naming the field; only our
    side is asserted, so the test does not depend on imgtool's failure mode."""
    info = imgtool_image_info
    areas = info["tlv_area"]
    cuts = {
        "empty": 0,
        "inside the header": 20,
        "inside the payload": HEADER_SIZE + PAYLOAD_SIZE // 2,
        "inside the protected TLVs": areas["tlv_hdr_prot"]["offset"] + 10,
        "inside the last TLV": info["file_size"] - 1,
    }
    content = imgtool_image.read_bytes()
    for where, length in cuts.items():
        truncated = tmp_path / f"cut-{length}.img"
        truncated.write_bytes(content[:length])
        for args in (("verify", "--key", imgtool_key.public), ("info",)):
            result = mers_sign(*args, truncated)
            assert result.returncode == 1, (where, args, result.stdout)
            assert result.error_line.startswith("mers-sign: error: "), (where, args)


# --- imgtool's variants of the same thing ---------------------------------------------------------


def test_getpub_c_source_is_imgtools_lang_c_with_the_symbols_mcuboot_links_against(
    imgtool_key: KeyPair,
) -> None:
    """MCUboot's keys.c declares `rsa_pub_key`, `ecdsa_pub_key` or `ed25519_pub_key` (and `..._len`)
    extern, as `imgtool getpub -e lang-c` names them: any other name fails to link. Only the generator
    comment on the first line differs."""
    theirs = succeeded(imgtool("getpub", "-k", imgtool_key.private, "-e", "lang-c")).stdout
    ours = succeeded(run_cli("mers-sign", "getpub", imgtool_key.private, "--format", "c")).stdout
    assert theirs.startswith("/* Autogenerated by imgtool.py")
    assert ours.startswith("/* Autogenerated by mers-sign")
    assert ours.splitlines()[1:] == theirs.splitlines()[1:]


ECDSA_PADDED_SIZE = 72  # what `imgtool sign --pad-sig` pads an ECDSA signature to


def imgtool_sign_with_padding(key: KeyPair, payload: Path, directory: Path) -> Path:
    """An image `imgtool sign --pad-sig` made whose DER signature is shorter than 72 bytes, so that zero
    bytes really follow it (a signature is 72 bytes long in about one case in four: signed again then)."""
    for attempt in range(64):
        image = directory / f"padded-{attempt}.img"
        options = ("-k", key.private, "--version", VERSION, "--pad-header", "-H", hex(HEADER_SIZE))
        succeeded(imgtool("sign", *options, "-S", str(SLOT_SIZE), "--pad-sig", payload, image))
        info = image_info(image)
        signature = bytes.fromhex(
            next(t["data"] for t in info["tlv_area"]["tlvs"] if t["type_name"] == "ECDSASIG")
        )
        assert len(signature) == ECDSA_PADDED_SIZE
        if signature[1] + 2 < ECDSA_PADDED_SIZE:
            return image
    raise AssertionError("64 ECDSA signatures in a row needed no padding")


@ONE_ALGORITHM
def test_ecdsa_signature_zero_padded_by_imgtool_pad_sig_passes_our_verify_and_other_padding_not(
    mers_sign: MersSign, imgtool_key: KeyPair, payload: Path, workdir: Path, tmp_path: Path
) -> None:
    """MCUboot and imgtool accept the zeros `--pad-sig` appends, and so do we. imgtool also accepts any
    other bytes there (it cuts the signature at its DER length); bytes no check covers make a signature
    malleable, so ours takes zeros only."""
    image = imgtool_sign_with_padding(imgtool_key, payload, workdir)
    assert IMGTOOL_OK in imgtool("verify", "-k", imgtool_key.public, image).stdout
    verified = json.loads(succeeded(mers_sign("verify", "--key", imgtool_key.public, "--json", image)).stdout)
    assert verified["signed_by"] == [imgtool_key_hash(imgtool_key.public, workdir)]

    offset = tlv_value_offset(image_info(image), "ECDSASIG") + ECDSA_PADDED_SIZE - 1
    tampered = with_bytes_replaced(image, offset, b"\x01", tmp_path / "tampered.img")
    assert IMGTOOL_OK in imgtool("verify", "-k", imgtool_key.public, tampered).stdout
    ours = mers_sign("verify", "--key", imgtool_key.public, tampered)
    assert ours.returncode == 1
    assert "[signature]" in ours.error_line

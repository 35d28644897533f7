"""Release trust keys and release upload, against a real hub: good images of every algorithm are stored
once under their SHA-256; bad ones are refused with the verifier's reason and leave nothing behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub import releases
from hub.errors import HubSetupError
from hub.home import HubHome, HubSettings
from hub.server import bind, build_server
from signing import Trust, verify_image
from signing.keys import KeyAlgorithm
from tests.conftest import fill_filesystem, small_filesystem
from tests.firmware_helpers import stored_files, trust, upload
from tests.hub_helpers import FIRMWARE, RunningHub, running_hub
from tests.signing_helpers import make_image, signer_for


def assert_nothing_stored(hub: RunningHub) -> None:
    assert stored_files(hub) == []
    assert hub.admin("GET", f"{FIRMWARE}/releases").json() == {"content": []}


def assert_rejected(response: requests.Response, *words: str) -> None:
    status, body = response.status_code, response.json()
    assert status == 422, body
    assert body["error"] == "release_rejected"
    for word in words:
        assert word in body["error_description"]


# --- trusted keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_a_release_key_is_trusted_under_its_key_hash(hub: RunningHub, algorithm: KeyAlgorithm) -> None:
    signer = signer_for(algorithm)
    key = trust(hub, signer, "release 2025")
    assert key["keyHash"] == signer.public_key.key_hash.hex()
    assert key["name"] == "release 2025"
    assert key["algorithm"] == algorithm.value
    assert key["pem"] == signer.public_key.pem().decode()
    assert key["addedAt"].endswith("Z")
    assert hub.admin("GET", f"{FIRMWARE}/trustedKeys").json() == {"content": [key]}


def test_trusting_the_same_key_twice_is_a_conflict(hub: RunningHub) -> None:
    signer = signer_for(KeyAlgorithm.ECDSA_P256)
    trust(hub, signer, "first")
    response = hub.admin(
        "POST", f"{FIRMWARE}/trustedKeys", json={"name": "again", "pem": signer.public_key.pem().decode()}
    )
    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert [key["name"] for key in hub.admin("GET", f"{FIRMWARE}/trustedKeys").json()["content"]] == ["first"]


def pem_of_private_key() -> str:
    key = signer_for(KeyAlgorithm.ED25519).private_key
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


NOT_USABLE_KEYS = {
    "garbage": ("not a key at all", "not a public key"),
    "private key": (pem_of_private_key(), "private key"),
    "rsa-2048": (public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "RSA-3072"),
    "p-384": (public_pem(ec.generate_private_key(ec.SECP384R1())), "P-256"),
}


def test_what_is_not_a_usable_release_key_is_refused_with_the_reason(hub: RunningHub) -> None:
    for case, (pem, reason) in NOT_USABLE_KEYS.items():
        response = hub.admin("POST", f"{FIRMWARE}/trustedKeys", json={"name": "k", "pem": pem})
        assert response.status_code == 400, case
        assert reason in response.json()["error_description"], case
    assert hub.admin("GET", f"{FIRMWARE}/trustedKeys").json() == {"content": []}


def test_a_key_name_must_be_a_printable_name_of_bounded_length(hub: RunningHub) -> None:
    pem = signer_for(KeyAlgorithm.ED25519).public_key.pem().decode()
    for name in ["", "   ", "line\nbreak", "x" * 129, "nul\x00", "\ud800"]:
        response = hub.admin("POST", f"{FIRMWARE}/trustedKeys", json={"name": name, "pem": pem})
        assert response.status_code == 400, repr(name)
    assert hub.admin("GET", f"{FIRMWARE}/trustedKeys").json() == {"content": []}


def test_trust_keys_are_for_the_admin_only(hub: RunningHub) -> None:
    pem = signer_for(KeyAlgorithm.ED25519).public_key.pem().decode()
    response = hub.request("POST", f"{FIRMWARE}/trustedKeys", json={"name": "k", "pem": pem})
    assert response.status_code == 401
    assert hub.request("GET", f"{FIRMWARE}/trustedKeys", token="not the admin token").status_code == 401


# --- uploads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_an_image_signed_by_a_trusted_key_becomes_a_release_stored_under_its_sha256(
    hub: RunningHub, tmp_path: Path, algorithm: KeyAlgorithm
) -> None:
    signer = signer_for(algorithm)
    trust(hub, signer)
    image = make_image(tmp_path, [signer], security_counter=7, vendor="Acme", image_class="gw-100")
    response = upload(hub, image, "gw-100 1.2.3")
    assert response.status_code == 201, response.text
    release = response.json()
    data = image.read_bytes()
    verified = verify_image(image, Trust(keys=(signer.public_key,)))
    assert release == {
        "id": release["id"],
        "name": "gw-100 1.2.3",
        "version": "1.2.3+4",
        "securityCounter": 7,
        "vendorUuid": str(verified.vendor_uuid),
        "classUuid": str(verified.class_uuid),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "imageDigest": verified.digest.hex(),
        "signedBy": [signer.public_key.key_hash.hex()],
        "uploadedAt": release["uploadedAt"],
    }
    assert stored_files(hub) == [release["sha256"]]
    assert (hub.state.blobs / release["sha256"]).read_bytes() == data
    assert hub.admin("GET", f"{FIRMWARE}/releases/{release['id']}").json() == release
    assert hub.admin("GET", f"{FIRMWARE}/releases").json() == {"content": [release]}


def test_an_image_signed_by_several_keys_names_every_trusted_signer(hub: RunningHub, tmp_path: Path) -> None:
    signers = [signer_for(KeyAlgorithm.RSA3072), signer_for(KeyAlgorithm.ED25519)]
    for signer in signers:
        trust(hub, signer, signer.public_key.algorithm.value)
    response = upload(hub, make_image(tmp_path, list(signers)))
    assert response.status_code == 201
    assert response.json()["signedBy"] == [signer.public_key.key_hash.hex() for signer in signers]


def test_the_same_bytes_uploaded_twice_are_stored_once(hub: RunningHub, tmp_path: Path) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer])
    first = upload(hub, image, "first name")
    again = upload(hub, image, "another name")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert stored_files(hub) == [first.json()["sha256"]]
    assert len(hub.admin("GET", f"{FIRMWARE}/releases").json()["content"]) == 1


def test_uploading_known_bytes_again_puts_back_their_lost_blob(hub: RunningHub, tmp_path: Path) -> None:
    """The blob of a recorded release is gone (restored from a backup without the blob directory): its
    signed URLs answered 403 for good, and uploading the image again changed nothing. Now the upload
    gives the blob back."""
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer])
    first = upload(hub, image)
    sha256 = first.json()["sha256"]
    (hub.state.blobs / sha256).unlink()
    again = upload(hub, image)
    assert again.status_code == 200 and again.json() == first.json()
    assert stored_files(hub) == [sha256]
    assert hashlib.sha256((hub.state.blobs / sha256).read_bytes()).hexdigest() == sha256


def test_a_body_streamed_in_chunks_is_received_whole(hub: RunningHub, tmp_path: Path) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    data = make_image(tmp_path, [signer], payload=os.urandom(9 << 20)).read_bytes()

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    response = hub.admin("POST", f"{FIRMWARE}/releases", params={"name": "chunked"}, data=chunks())
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert response.json()["size"] == len(data)


def test_an_image_signed_by_an_untrusted_key_is_rejected_and_nothing_is_stored(
    hub: RunningHub, tmp_path: Path
) -> None:
    trust(hub, signer_for(KeyAlgorithm.ED25519))
    image = make_image(tmp_path, [signer_for(KeyAlgorithm.ED25519, index=1)])
    assert_rejected(upload(hub, image), "untrusted")
    assert_nothing_stored(hub)


def test_any_image_is_rejected_while_no_key_is_trusted(hub: RunningHub, tmp_path: Path) -> None:
    assert_rejected(upload(hub, make_image(tmp_path)), "no release trust key")
    assert_nothing_stored(hub)


def flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


#: how an image is damaged, and words the verifier's reason must contain
DAMAGES: dict[str, tuple[Callable[[bytes], bytes], tuple[str, ...]]] = {
    "tampered payload": (lambda data: flip_byte(data, 0x20 + 100), ("hash",)),
    "tampered signature": (lambda data: flip_byte(data, len(data) - 5), ("signature",)),
    "truncated": (lambda data: data[: len(data) // 2], ("past the end",)),
    "header cut": (lambda data: data[:20], ()),
    "random bytes": (lambda data: os.urandom(len(data)), ("magic",)),
    "empty": (lambda data: b"", ()),
    "trailer": (lambda data: data + b"trailing", ("follow",)),
}


def test_a_damaged_image_is_rejected_with_the_verifiers_reason_and_nothing_is_stored(
    hub: RunningHub, tmp_path: Path
) -> None:
    signer = signer_for(KeyAlgorithm.ECDSA_P256)
    trust(hub, signer)
    data = make_image(tmp_path, [signer]).read_bytes()
    for case, (damage, words) in DAMAGES.items():
        response = upload(hub, damage(data))
        assert_rejected(response, *words)
        assert str(hub.root) not in response.text, case  # no path of the hub's own files leaks out
        assert_nothing_stored(hub)


def test_an_upload_over_the_size_limit_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    image = make_image(tmp_path, [signer], payload=os.urandom(200_000))
    with running_hub(tmp_path / "hub", HubSettings(max_release_size=100_000)) as small:
        trust(small, signer)
        declared = upload(small, image)
        assert declared.status_code == 413
        assert declared.json()["error"] == "payload_too_large"
        data = image.read_bytes()
        streamed = small.admin(
            "POST", f"{FIRMWARE}/releases", params={"name": "x"}, data=iter([data[:60_000], data[60_000:]])
        )
        assert streamed.status_code == 413
        assert_nothing_stored(small)
        within = make_image(tmp_path, [signer], payload=os.urandom(90_000), name="small.signed")
        assert upload(small, within).status_code == 201


def test_a_full_disk_answers_507_and_stores_nothing(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer])

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(releases, "_write_and_hash", disk_full)  # the disk fills up during the upload
        refused = upload(hub, image)
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"] == "insufficient_storage"
    assert_nothing_stored(hub)
    assert upload(hub, image).status_code == 201, "space freed: the same upload succeeds"


@contextlib.contextmanager
def hub_with_a_small_database(tmp_path: Path) -> Iterator[tuple[RunningHub, Path, Path, str]]:
    """A hub whose SQLite database sits on a 1 MiB filesystem of its own (to be filled), its blobs
    elsewhere; an image signed by a key it trusts, and the image's SHA-256."""
    signer = signer_for(KeyAlgorithm.ED25519)
    image = make_image(tmp_path, [signer], payload=os.urandom(4000))
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    with small_filesystem(tmp_path / "small", 1 << 20) as small:
        settings = HubSettings(database_url=f"sqlite:///{small / 'hub.db'}")
        with running_hub(tmp_path / "hub", settings) as hub:
            trust(hub, signer)
            yield hub, small, image, sha256


def test_a_release_the_full_database_cannot_record_leaves_no_blob_behind(tmp_path: Path) -> None:
    """The database's disk is full (SQLITE_FULL), the blob directory's is not: the image is verified and
    its blob put in place, then recording the release fails. The 507 leaves no unreferenced blob (nothing
    would ever remove it); with room again, the same upload stores it."""
    with hub_with_a_small_database(tmp_path) as (hub, small, image, sha256):
        filler = fill_filesystem(small)
        refused = upload(hub, image)
        assert refused.status_code == 507, refused.text
        assert "database" in refused.json()["error_description"]
        assert_nothing_stored(hub)
        filler.unlink()
        assert upload(hub, image).status_code == 201
        assert stored_files(hub) == [sha256]


def test_bytes_an_earlier_release_holds_keep_their_blob_when_the_database_is_full(tmp_path: Path) -> None:
    """Content-addressed: uploading known bytes again while the database's disk is full answers the
    release that holds them, and the blob that release needs stays, put back if it had gone missing."""
    with hub_with_a_small_database(tmp_path) as (hub, small, image, sha256):
        first = upload(hub, image)
        assert first.status_code == 201, first.text
        fill_filesystem(small)
        again = upload(hub, image, "the same bytes")
        assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
        assert stored_files(hub) == [sha256]
        releases.blob_file(hub.state.blobs, sha256).unlink()
        assert upload(hub, image).status_code == 200
        assert stored_files(hub) == [sha256]


def test_a_blob_is_withdrawn_only_while_no_release_holds_its_bytes(hub: RunningHub, tmp_path: Path) -> None:
    """What a failed upload withdraws: a release recorded by a concurrent upload of the same bytes keeps
    its blob; bytes no release holds go, and leave no file aside."""
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer])
    assert upload(hub, image).status_code == 201
    held = hashlib.sha256(image.read_bytes()).hexdigest()
    releases.withdraw_blob(hub.state.database, releases.blob_file(hub.state.blobs, held), held)
    assert stored_files(hub) == [held]
    orphan = hashlib.sha256(b"no release").hexdigest()
    releases.blob_file(hub.state.blobs, orphan).write_bytes(b"no release")
    releases.withdraw_blob(hub.state.database, releases.blob_file(hub.state.blobs, orphan), orphan)
    assert stored_files(hub) == [held]


def test_temporary_files_of_uploads_cut_short_are_swept_when_the_hub_starts(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as first:
        blobs = first.state.blobs
    crashed, live = blobs / f"{releases.UPLOAD_PREFIX}crashed", blobs / f"{releases.UPLOAD_PREFIX}live"
    crashed.write_bytes(b"half an image")
    live.write_bytes(b"an upload still being written by another server")
    hour_ago = time.time() - releases.LEFTOVER_AGE_S - 60
    os.utime(crashed, (hour_ago, hour_ago))
    sock = bind("127.0.0.1", 0)
    try:
        build_server(HubHome(tmp_path / "hub"), sock).hub.close()
    finally:
        sock.close()
    assert not crashed.exists() and live.exists()


def test_a_blob_directory_without_hard_links_is_refused_when_the_hub_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfat, exFAT and some network shares refuse link(2) (EPERM): every upload was a bare 500. This
    kernel has no such filesystem at hand, so link(2) is made to fail as theirs does."""
    with running_hub(tmp_path / "hub"):
        pass

    def no_links(source: object, target: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(source), None, str(target))

    monkeypatch.setattr(os, "link", no_links)
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(HubSetupError, match="does not take hard links"):
            build_server(HubHome(tmp_path / "hub"), sock)
    finally:
        sock.close()
    assert [path.name for path in (tmp_path / "hub" / "blobs").iterdir()] == []


def test_an_upload_needs_the_admin_token_and_a_name(hub: RunningHub, tmp_path: Path) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    data = make_image(tmp_path, [signer]).read_bytes()
    anonymous = hub.request("POST", f"{FIRMWARE}/releases", params={"name": "x"}, data=data)
    assert anonymous.status_code == 401
    nameless = hub.admin("POST", f"{FIRMWARE}/releases", data=data)
    assert nameless.status_code == 400
    for bad in ["", "tab\there", "x" * 257]:
        assert upload(hub, data, bad).status_code == 400
    assert_nothing_stored(hub)


def test_an_unknown_release_is_not_found(hub: RunningHub) -> None:
    for release_id in ["0" * 32, "nope", "%00", "a" * 500]:
        response = hub.admin("GET", f"{FIRMWARE}/releases/{release_id}")
        assert response.status_code == 404, release_id
        assert response.json()["error"] == "not_found"


def test_a_large_upload_is_spooled_with_memory_that_does_not_grow_with_its_size(
    hub: RunningHub, tmp_path: Path
) -> None:
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    image = make_image(tmp_path, [signer], payload=os.urandom(64 << 20))
    tracemalloc.start()
    try:
        with open(image, "rb") as body:  # requests streams a file object
            response = hub.admin("POST", f"{FIRMWARE}/releases", params={"name": "large"}, data=body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 201, response.text
    assert response.json()["size"] == image.stat().st_size
    assert peak < 24 << 20, f"peak {peak >> 20} MiB for a {image.stat().st_size >> 20} MiB upload"


def test_releases_of_any_size_and_counter_are_stored_on_postgresql(
    postgres_hub: RunningHub, tmp_path: Path
) -> None:
    signer = signer_for(KeyAlgorithm.RSA3072)
    trust(postgres_hub, signer)
    image = make_image(tmp_path, [signer], security_counter=0xFFFFFFFF)
    response = upload(postgres_hub, image)
    assert response.status_code == 201, response.text
    assert response.json()["securityCounter"] == 0xFFFFFFFF
    assert upload(postgres_hub, image).status_code == 200
    assert upload(postgres_hub, image, "nul\x00").status_code == 400
    assert postgres_hub.admin("GET", f"{FIRMWARE}/releases/%00").status_code == 404
    pem = signer_for(KeyAlgorithm.ED25519).public_key.pem().decode()
    refused = postgres_hub.admin("POST", f"{FIRMWARE}/trustedKeys", json={"name": "k", "pem": pem + "\x00"})
    assert refused.status_code == 400

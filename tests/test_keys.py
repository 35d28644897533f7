"""Key files: generation, loading, and a distinct error for each way a key can be unusable."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing.errors import (
    KeyFileError,
    KeyFormatError,
    NotAPrivateKeyError,
    PassphraseRequiredError,
    UnsupportedKeyTypeError,
    WrongPassphraseError,
)
from signing.key_sources import KeyAccess, load_any_public_key
from signing.keys import (
    KeyAlgorithm,
    load_private_key,
    load_public_key,
    public_key_from_bytes,
    read_passphrase_file,
    write_key_pair,
)
from tests.signing_helpers import signer_for


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_keygen_writes_a_private_key_only_its_owner_can_read_and_its_public_half(tmp_path, algorithm):
    private, public = write_key_pair(tmp_path / "release.pem", algorithm)
    assert public == tmp_path / "release.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signer = load_private_key(private)
    assert signer.public_key.algorithm is algorithm
    assert load_public_key(public).key_hash == signer.public_key.key_hash


def test_keygen_never_overwrites_an_existing_key(tmp_path):
    write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519)
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519)
    assert (tmp_path / "k.pem").read_bytes() == before


def test_an_encrypted_key_needs_its_passphrase_and_refuses_a_wrong_one(tmp_path):
    private, _ = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ECDSA_P256, b"correct horse")
    assert b"ENCRYPTED" in private.read_bytes()
    assert load_private_key(private, b"correct horse").public_key.algorithm is KeyAlgorithm.ECDSA_P256
    with pytest.raises(PassphraseRequiredError):
        load_private_key(private)
    with pytest.raises(WrongPassphraseError):
        load_private_key(private, b"battery staple")


def test_a_passphrase_given_for_a_plain_key_is_ignored(tmp_path):
    private, _ = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519)
    assert load_private_key(private, b"unneeded").public_key.algorithm is KeyAlgorithm.ED25519


def test_a_public_key_where_a_private_one_is_needed_says_so(tmp_path):
    _, public = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519)
    with pytest.raises(NotAPrivateKeyError):
        load_private_key(public)


def test_missing_and_garbage_key_files_get_different_errors(tmp_path):
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "absent.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key at all")
    with pytest.raises(KeyFormatError):
        load_private_key(garbage)
    with pytest.raises(KeyFormatError):
        load_public_key(garbage)


def test_a_private_key_given_as_a_trust_anchor_is_refused(tmp_path):
    private, _ = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519)
    with pytest.raises(KeyFormatError, match="private key"):
        load_public_key(private)


@pytest.mark.parametrize(
    "key",
    [rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())],
    ids=["rsa-2048", "p-384"],
)
def test_keys_the_image_format_does_not_carry_are_refused(tmp_path, key):
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(UnsupportedKeyTypeError):
        load_private_key(path)


def test_the_rsa_key_hash_is_over_pkcs1_der_as_mcuboot_embeds_it():
    public = signer_for(KeyAlgorithm.RSA3072).public_key
    pkcs1 = public.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert public.der == pkcs1
    assert public.key_hash == hashlib.sha256(pkcs1).digest()


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ED25519])
def test_other_key_hashes_are_over_subject_public_key_info(algorithm):
    public = signer_for(algorithm).public_key
    spki = public.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public.key_hash == hashlib.sha256(spki).digest()


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_a_trust_anchor_reads_from_pem_and_from_the_der_getpub_prints(algorithm):
    public = signer_for(algorithm).public_key
    assert public_key_from_bytes(public.pem(), source="pem").key_hash == public.key_hash
    assert public_key_from_bytes(public.der, source="der").key_hash == public.key_hash


def test_getpub_reads_the_public_half_of_a_private_key_file(tmp_path):
    private, public = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.RSA3072, b"pw")
    expected = load_public_key(public).key_hash
    assert load_any_public_key(str(private), KeyAccess(passphrase=b"pw")).key_hash == expected
    assert load_any_public_key(str(public), KeyAccess()).key_hash == expected


def test_a_passphrase_file_loses_only_its_trailing_newline(tmp_path):
    path = tmp_path / "pass"
    path.write_bytes(b" secret with spaces \n")
    assert read_passphrase_file(path) == b" secret with spaces "
    path.write_bytes(b"\n")
    with pytest.raises(KeyFileError, match="empty"):
        read_passphrase_file(path)


# --- ECDSA signatures padded by `imgtool sign --pad-sig` ----------------------------------------------

ECDSA_PADDED_SIZE = 72  # what imgtool pads to


def short_ecdsa_signature(digest: bytes) -> bytes:
    """An ECDSA signature of `digest` at most 70 bytes long, so padding it adds at least two bytes (1 in 4
    signatures are that short)."""
    signer = signer_for(KeyAlgorithm.ECDSA_P256)
    for _ in range(64):
        signature = signer.sign_digest(digest)
        if len(signature) <= ECDSA_PADDED_SIZE - 2:
            return signature
    raise AssertionError("64 ECDSA signatures in a row were over 70 bytes long")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda der: der.ljust(ECDSA_PADDED_SIZE - 1, b"\0") + b"\x01", id="a non-zero pad byte"),
        pytest.param(
            lambda der: der[:1] + bytes([der[1] + 2]) + der[2:] + b"\0\0",
            id="a SEQUENCE length over the padding",
        ),
        pytest.param(
            lambda der: der[:1] + bytes([der[1] + 4]) + der[2:], id="a SEQUENCE longer than the signature"
        ),
        pytest.param(lambda der: der[:1] + b"\x81" + der[1:], id="a long-form SEQUENCE length"),
        pytest.param(lambda der: der + b"\0", id="zeros up to another length than 72"),
        pytest.param(lambda der: der.ljust(ECDSA_PADDED_SIZE + 1, b"\0"), id="zeros past 72"),
    ],
)
def test_an_ecdsa_signature_padded_with_zeros_verifies_and_with_anything_else_does_not(damage):
    """`imgtool sign --pad-sig` appends zeros up to 72 bytes, which MCUboot accepts. imgtool verify cuts at
    the SEQUENCE length and ignores the rest; bytes in the unhashed area that no check covers would make
    signatures malleable, so ours accepts zeros only."""
    digest = hashlib.sha256(b"image").digest()
    public = signer_for(KeyAlgorithm.ECDSA_P256).public_key
    signature = short_ecdsa_signature(digest)
    assert public.verifies(signature.ljust(ECDSA_PADDED_SIZE, b"\0"), digest)
    assert not public.verifies(damage(signature), digest)


# --- keygen interrupted ---------------------------------------------------------------------------


def interrupt_fsync_of(monkeypatch, name_part: str) -> None:
    """Fault injection at the system-call boundary: Ctrl-C arrives while a file whose name contains
    `name_part` (its final name or a temporary one beside it) is being made durable."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    "interrupted",
    ["release.pem", "release.pub.pem"],
    ids=["writing the private half", "writing the public half"],
)
def test_keygen_interrupted_leaves_neither_half_nor_a_temporary_file(tmp_path, monkeypatch, interrupted):
    """A private key without its public half (or a partial one at the key's name) looks like a made key;
    whatever keygen created is removed when it is interrupted, and the interrupt still propagates."""
    interrupt_fsync_of(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    assert list(tmp_path.iterdir()) == []


def test_keygen_refuses_a_name_taken_while_it_ran_and_removes_only_what_it_made(tmp_path, monkeypatch):
    """The public half's name taken by someone else after keygen looked: link(2) refuses it, and the
    cleanup removes only this keygen's private half, never the other file."""
    theirs = tmp_path / "release.pub.pem"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "release.pub.pem" in os.readlink(f"/proc/self/fd/{fd}") and not theirs.exists():
            theirs.write_bytes(b"someone else's key\n")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    assert list(tmp_path.iterdir()) == [theirs]
    assert theirs.read_bytes() == b"someone else's key\n"


def test_keygen_on_a_filesystem_without_hard_links_creates_each_half_exclusively(tmp_path, monkeypatch):
    """vfat and exFAT sticks, many CIFS and FUSE mounts answer link(2) with EPERM or EOPNOTSUPP."""

    def no_link(source: object, target: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_link)
    private, public = write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    assert sorted(tmp_path.iterdir()) == [private, public]  # no temporary file left
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_public_key(public) == load_private_key(private).public_key
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)


@pytest.mark.parametrize("call", ["fdopen", "fsync"])
def test_keygen_interrupted_on_a_filesystem_without_hard_links_leaves_nothing(tmp_path, monkeypatch, call):
    """There the final name is created directly: an interrupt from its creation on (as soon as the
    descriptor is wrapped, or while the key is made durable) removes it too."""
    real = getattr(os, call)

    def no_link(source: object, target: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def interrupted(fd: int, *args: object, **kwargs: object) -> object:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/release.pub.pem"):  # the final name's
            raise KeyboardInterrupt
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, call, interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    assert list(tmp_path.iterdir()) == []


def test_keygen_gives_the_public_half_the_umask_s_mode(tmp_path):
    previous = os.umask(0o077)
    try:
        _, public = write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(public.stat().st_mode) == 0o600


def test_keygen_interrupted_still_raises_the_interrupt_when_its_cleanup_fails(tmp_path, monkeypatch):
    interrupted = threading.Event()
    real_fsync, real_open = os.fsync, os.open

    def fsync(fd: int) -> None:  # Ctrl-C while the public half is made durable
        if "release.pub.pem" in os.readlink(f"/proc/self/fd/{fd}"):
            interrupted.set()
            raise KeyboardInterrupt
        real_fsync(fd)

    def open_(path, flags, *args, **kwargs):  # ...then the cleanup's directory sync fails
        if interrupted.is_set() and flags & os.O_DIRECTORY:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(KeyboardInterrupt):
        write_key_pair(tmp_path / "release.pem", KeyAlgorithm.ED25519)
    assert list(tmp_path.iterdir()) == []


# --- passphrases --------------------------------------------------------------------------------------


def test_keygen_refuses_a_passphrase_longer_than_a_pem_key_can_be_encrypted_with(tmp_path):
    with pytest.raises(KeyFileError, match="1023"):
        write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519, b"x" * 1024)
    assert list(tmp_path.iterdir()) == []
    private, _ = write_key_pair(tmp_path / "k.pem", KeyAlgorithm.ED25519, b"x" * 1023)
    assert load_private_key(private, b"x" * 1023).public_key.algorithm is KeyAlgorithm.ED25519


def test_a_passphrase_file_longer_than_a_passphrase_can_be_is_refused(tmp_path):
    path = tmp_path / "pass"
    path.write_bytes(b"x" * 1023 + b"\r\n")
    assert read_passphrase_file(path) == b"x" * 1023
    path.write_bytes(b"x" * 1024 + b"\n")
    with pytest.raises(KeyFileError, match="more than 1023 bytes"):
        read_passphrase_file(path)


def test_a_passphrase_read_from_an_endless_pipe_stops_at_the_bound(tmp_path):
    """/dev/zero or a pipe that never ends must be an error, not a read that never returns: the pipe here
    holds 4 KiB and stays open, so only a bounded read can finish while it does."""
    pipe = tmp_path / "pass.pipe"
    os.mkfifo(pipe)
    writer = os.open(pipe, os.O_RDWR)  # Linux: a FIFO opened read-write needs no reader yet
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_passphrase_file(pipe))
        except KeyFileError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    try:
        os.write(writer, b"x" * 4096)
        reader.start()
        reader.join(timeout=30)
        finished_while_open = not reader.is_alive()
    finally:
        os.close(writer)  # ends an unbounded read too, so no thread outlives the test
        reader.join(timeout=30)
    assert finished_while_open, "the passphrase read waited for the end of an endless pipe"
    assert len(outcome) == 1
    assert isinstance(outcome[0], KeyFileError)

"""Signing keys and trust anchors: the three algorithms an image may carry, and how each signs a digest.

MCUboot signs the 32-byte SHA-256 image digest, never the image itself, and names the key by the SHA-256
of its embedded public form (PKCS#1 RSAPublicKey DER for RSA, SubjectPublicKeyInfo DER otherwise). This
module is the one place that knows those conventions; everything else deals in `PublicKey` and `Signer`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import (
    KeyFileError,
    KeyFormatError,
    NotAPrivateKeyError,
    PassphraseRequiredError,
    SigningFaultError,
    UnsupportedKeyTypeError,
    WrongPassphraseError,
)
from .image_format import TlvType
from .output import fsync_directory

_RSA_BITS = 3072
_PSS_SALT_LENGTH = 32  # MCUboot accepts only a salt as long as the hash


class KeyAlgorithm(enum.Enum):
    """The signature algorithms of docs/design.md §3, each with the TLV type that carries its signature."""

    RSA3072 = "rsa-3072"
    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"

    @property
    def signature_tlv(self) -> TlvType:
        return _SIGNATURE_TLV[self]


_SIGNATURE_TLV = {
    KeyAlgorithm.RSA3072: TlvType.RSA3072,
    KeyAlgorithm.ECDSA_P256: TlvType.ECDSASIG,
    KeyAlgorithm.ED25519: TlvType.ED25519,
}

PublicKeyObject = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKeyObject = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def algorithm_of(key: PublicKeyObject | PrivateKeyObject) -> KeyAlgorithm:
    """The image algorithm of a key, refusing sizes and curves MCUboot images do not carry."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size != _RSA_BITS:
            raise UnsupportedKeyTypeError(f"RSA-{key.key_size} key: only RSA-3072 is supported")
        return KeyAlgorithm.RSA3072
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedKeyTypeError(f"EC key on {key.curve.name}: only P-256 is supported")
        return KeyAlgorithm.ECDSA_P256
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return KeyAlgorithm.ED25519
    raise UnsupportedKeyTypeError(
        f"{type(key).__name__}: only RSA-3072, ECDSA P-256 and Ed25519 are supported"
    )


@dataclass(frozen=True)
class PublicKey:
    """A trust anchor or the public half of a signer: what KEYHASH names and what checks a signature."""

    key: PublicKeyObject

    @property
    def algorithm(self) -> KeyAlgorithm:
        return algorithm_of(self.key)

    @property
    def der(self) -> bytes:
        """The form MCUboot embeds and hashes: PKCS#1 for RSA, SubjectPublicKeyInfo for the others."""
        if isinstance(self.key, rsa.RSAPublicKey):
            return self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_hash(self) -> bytes:
        """SHA-256 of `der`: the KEYHASH TLV value and the board's key-slot hash."""
        return hashlib.sha256(self.der).digest()

    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifies(self, signature: bytes, digest: bytes) -> bool:
        """True when `signature` is this key's signature of the 32-byte image digest, as MCUboot checks it."""
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, digest, _pss(), utils.Prehashed(hashes.SHA256()))
            elif isinstance(self.key, ec.EllipticCurvePublicKey):
                der = _unpadded_ecdsa_der(signature)
                if der is None:
                    return False
                self.key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            else:
                self.key.verify(signature, digest)
        except (InvalidSignature, ValueError):
            return False
        return True


#: DER tags of an ECDSA-Sig-Value: SEQUENCE { INTEGER r, INTEGER s }
_DER_SEQUENCE = 0x30
_DER_SHORT_LENGTH_MAX = 0x7F
#: the one length `imgtool sign --pad-sig` pads an ECDSA P-256 signature to
ECDSA_PADDED_SIZE = 72


def _unpadded_ecdsa_der(signature: bytes) -> bytes | None:
    """The DER signature inside an ECDSASIG TLV value, without the zero bytes `imgtool sign --pad-sig`
    appends to reach a fixed 72 bytes (for MCUboot before 1.5), which MCUboot and imgtool verify accept.

    Unlike imgtool, which cuts at the SEQUENCE length and ignores the rest, anything but zeros after the
    SEQUENCE is refused (None): the unprotected area is not covered by the hash, and a verifier that
    ignored bytes there would let anyone hide data in a signed image. A P-256 signature's SEQUENCE holds
    at most 70 bytes, so its length is always in DER's short form."""
    if len(signature) < 2 or signature[0] != _DER_SEQUENCE or signature[1] > _DER_SHORT_LENGTH_MAX:
        return None
    end = 2 + signature[1]
    if end > len(signature) or any(signature[end:]):
        return None
    if end != len(signature) and len(signature) != ECDSA_PADDED_SIZE:
        return None  # imgtool pads to exactly 72: other lengths would make one image many files
    return signature[:end]


class Signer(Protocol):
    """Anything that signs an image digest: a key file, an HSM object, an offline signer's answer."""

    @property
    def public_key(self) -> PublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature TLV value for the 32-byte SHA-256 image digest."""
        ...

    def close(self) -> None:
        """Release what the signer holds (an HSM session); signing afterwards is an error."""
        ...


@dataclass(frozen=True)
class SoftwareSigner:
    """A private key held in memory, loaded from a PEM file."""

    private_key: PrivateKeyObject

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.private_key.public_key())

    def sign_digest(self, digest: bytes) -> bytes:
        signature = self._raw_sign(digest)
        # A signature that does not verify means a corrupt key or a faulty computation; publishing it
        # would brick no device (they reject it) but could leak the key (RSA-CRT fault attacks).
        if not self.public_key.verifies(signature, digest):
            raise SigningFaultError("the key produced a signature that does not verify: refusing to use it")
        return signature

    def close(self) -> None:
        """Nothing to release: the key lives in this process's memory."""

    def _raw_sign(self, digest: bytes) -> bytes:
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, _pss(), utils.Prehashed(hashes.SHA256()))
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return key.sign(digest)


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_PSS_SALT_LENGTH)


# --- files -----------------------------------------------------------------------------------------


def generate_private_key(algorithm: KeyAlgorithm) -> PrivateKeyObject:
    if algorithm is KeyAlgorithm.RSA3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    if algorithm is KeyAlgorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_key_path_for(private_path: Path) -> Path:
    """`key.pem` -> `key.pub.pem`: where keygen puts the public half."""
    stem = private_path.name.removesuffix(".pem")
    return private_path.with_name(f"{stem}.pub.pem")


#: the longest passphrase cryptography's PEM encryption takes (OpenSSL's PEM_BUFSIZE less the NUL)
MAX_PASSPHRASE_BYTES = 1023


def write_key_pair(
    private_path: Path, algorithm: KeyAlgorithm, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Generate a key pair: the private PEM at mode 0600 (encrypted with `passphrase` if given) and its
    public PEM beside it. Refuses to overwrite either file: a release key is never lost to a typo.

    Both halves appear or neither: a failure or a Ctrl-C between them removes what this call created,
    since a private key without its public half looks made but cannot be handed to the devices."""
    public_path = public_key_path_for(private_path)
    for path in (private_path, public_path):
        if os.path.lexists(path):  # lexists: a dangling symlink is in the way too
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    if passphrase is not None and len(passphrase) > MAX_PASSPHRASE_BYTES:
        raise KeyFileError(
            f"the passphrase is {len(passphrase)} bytes; at most {MAX_PASSPHRASE_BYTES} can encrypt a key",
            field="passphrase",
        )
    private_key = generate_private_key(algorithm)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = PublicKey(private_key.public_key()).pem()
    published: list[_Published] = []
    try:
        _publish_new_file(private_path, private_pem, mode=0o600, published=published)
        _publish_new_file(public_path, public_pem, mode=0o644, published=published)
    except BaseException:
        for entry in published:
            # best effort: what went wrong first (a Ctrl-C, a full disk) is what the caller must see
            with contextlib.suppress(OSError, KeyFileError):
                entry.remove_if_ours()
        raise
    return private_path, public_path


@dataclass(frozen=True)
class _Published:
    """A name `_publish_new_file` may have given a file, and that file's identity: the name is removed
    on failure only if it still is that file, never a key someone else put there."""

    path: Path
    device: int
    inode: int

    def remove_if_ours(self) -> None:
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (found.st_dev, found.st_ino) == (self.device, self.inode):
            self.path.unlink()
            _fsync_directory(self.path.parent)


#: link(2) errors of filesystems that have no hard links (vfat and exFAT sticks, many CIFS and FUSE mounts)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV})


def _publish_new_file(path: Path, data: bytes, *, mode: int, published: list[_Published]) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, and give it its name with link(2), which
    refuses an existing name (a file made since the caller looked). The final name so never holds a
    partial key, even after a crash. The temporary file is created with `mode` (and the umask), so a secret
    is never briefly readable by others.

    On a filesystem without hard links (a vfat USB stick), the file is created at its final name with
    O_EXCL instead: still never overwriting, but a crash mid-write can leave a partial file there.

    The file's identity is added to `published` before it gets its name, so an interrupt arriving just
    after still lets the caller find and remove exactly what was published."""
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            _write_new(temp_path, data, mode, published, published_as=path)
            try:
                os.link(temp_path, path)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                _write_new(path, data, mode, published, published_as=path)
        except FileExistsError as exc:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        temp_path.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _write_new(
    path: Path, data: bytes, mode: int, published: list[_Published], *, published_as: Path
) -> None:
    """Create `path` (never an existing one) with `data`, durable. The new file's identity, as the name
    `published_as` will have it, goes to `published` straight after the create, before anything else
    can fail: an interrupt later still finds and removes exactly this file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        identity = os.fstat(fd)
        published.append(_Published(published_as, identity.st_dev, identity.st_ino))
        handle = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    """`fsync_directory`, its failure a `KeyFileError`."""
    try:
        fsync_directory(directory)
    except OSError as exc:
        raise KeyFileError(f"cannot sync directory {directory}: {exc.strerror}") from exc


#: far beyond any PEM key (an encrypted RSA-4096 private key is about 3.4 KiB): the read stops here, so a
#: mistyped path such as /dev/zero is an error, not a process that eats memory until it is killed
MAX_KEY_FILE_BYTES = 1 << 20


def read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} holds more than {MAX_KEY_FILE_BYTES} bytes: it is no key")
    return data


def load_private_key(path: Path, passphrase: bytes | None = None) -> SoftwareSigner:
    """A signer from a PEM private key file, with distinct errors for each way it can go wrong."""
    data = read_key_file(path)
    try:
        key = _load_pem_private(data, passphrase)
    except TypeError as exc:
        # cryptography says TypeError both for "encrypted, no password" and "not encrypted, password given"
        if passphrase is None:
            raise PassphraseRequiredError(
                f"{path} is encrypted: give its passphrase (--passphrase-file)"
            ) from exc
        key = _load_pem_private(data, None)
    except ValueError as exc:
        if b"ENCRYPTED" in data and passphrase is not None:
            raise WrongPassphraseError(f"wrong passphrase for {path}") from exc
        if _looks_public(data):
            raise NotAPrivateKeyError(f"{path} holds a public key; signing needs the private key") from exc
        raise KeyFormatError(f"{path} is not a PEM private key") from exc
    except UnsupportedAlgorithm as exc:
        raise UnsupportedKeyTypeError(f"{path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise UnsupportedKeyTypeError(f"{path}: {type(key).__name__} keys cannot sign images")
    _check_algorithm(key, str(path))
    return SoftwareSigner(key)


def _check_algorithm(key: PublicKeyObject | PrivateKeyObject, source: str) -> None:
    """`algorithm_of`, with the file named, so a user with several --key options knows which one."""
    try:
        algorithm_of(key)
    except UnsupportedKeyTypeError as exc:
        raise UnsupportedKeyTypeError(f"{source}: {exc}") from exc


def _load_pem_private(data: bytes, passphrase: bytes | None) -> PrivateKeyTypes:
    """Load without cryptography's RSA key validation: its primality checks cost ~0.3 s per RSA-3072 load,
    more than hashing a 256 MiB image, and `SoftwareSigner` verifies every signature it makes instead,
    which catches a corrupt key at the moment it matters."""
    return serialization.load_pem_private_key(data, password=passphrase, unsafe_skip_rsa_key_validation=True)


def _looks_public(data: bytes) -> bool:
    return b"PUBLIC KEY-----" in data or _try_public(data) is not None


def _try_public(data: bytes) -> PublicKeyObject | None:
    # load_der_public_key also takes the PKCS#1 form that `getpub --format der` prints for RSA
    loaders = (serialization.load_pem_public_key, serialization.load_der_public_key)
    for loader in loaders:
        try:
            key = loader(data)
        except (ValueError, UnsupportedAlgorithm):
            continue
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            return key
    return None


def public_key_from_bytes(data: bytes, *, source: str) -> PublicKey:
    """A trust anchor from PEM or DER bytes (SubjectPublicKeyInfo, or PKCS#1 for RSA)."""
    key = _try_public(data)
    if key is None:
        if b"PRIVATE KEY-----" in data:
            raise KeyFormatError(f"{source} holds a private key; give the public key (mers-sign getpub)")
        raise KeyFormatError(f"{source} is not a public key (PEM or DER)")
    _check_algorithm(key, source)
    return PublicKey(key)


def load_public_key(path: Path) -> PublicKey:
    return public_key_from_bytes(read_key_file(path), source=str(path))


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase in `path`, without the one trailing newline editors add.

    The read is bounded, so a wrong path such as /dev/zero or an endless pipe is an error, not a process
    that eats memory until it is killed; a pipe (`--passphrase-file <(pass show release)`) is fine."""
    limit = MAX_PASSPHRASE_BYTES + len(b"\r\n")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise KeyFileError(
            f"passphrase file {path} holds more than {MAX_PASSPHRASE_BYTES} bytes, the longest passphrase "
            "a PEM key can be encrypted with"
        )
    if not data:
        raise KeyFileError(f"passphrase file {path} is empty")
    return data

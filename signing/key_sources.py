"""Where a key comes from, named the way users name it: a PEM file path or a PKCS#11 URI (RFC 7512).

The PKCS#11 backend is imported only when a `pkcs11:` URI is given, so signing with key files needs
nothing beyond the core dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .keys import PublicKey, Signer, load_private_key, public_key_from_bytes, read_key_file

PKCS11_SCHEME = "pkcs11:"


@dataclass(frozen=True)
class KeyAccess:
    """The secrets that may be needed to open a key: a PEM passphrase, or a PKCS#11 module and PIN."""

    passphrase: bytes | None = None
    pkcs11_module: str | None = None
    pkcs11_pin: str | None = None


def is_pkcs11_uri(spec: str) -> bool:
    return spec.startswith(PKCS11_SCHEME)


def load_signer(spec: str, access: KeyAccess) -> Signer:
    """A signer for a private key file or a PKCS#11 private key object."""
    if is_pkcs11_uri(spec):
        from .pkcs11 import load_pkcs11_signer  # noqa: PLC0415 - only when a token is named

        return load_pkcs11_signer(spec, module_path=access.pkcs11_module, pin=access.pkcs11_pin)
    return load_private_key(Path(spec), access.passphrase)


def load_any_public_key(spec: str, access: KeyAccess) -> PublicKey:
    """The public key of whatever `spec` names: a public key file, a private key file, or a token key."""
    if is_pkcs11_uri(spec):
        signer = load_signer(spec, access)
        try:
            return signer.public_key
        finally:
            signer.close()
    data = read_key_file(Path(spec))
    if b"PRIVATE KEY-----" in data:
        return load_private_key(Path(spec), access.passphrase).public_key
    return public_key_from_bytes(data, source=spec)

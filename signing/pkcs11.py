"""Signing with a key that never leaves its token: PKCS#11 URIs (RFC 7512) and a `Signer` over a session.

A release key kept in an HSM cannot be copied off a build machine, only used while the machine holds the
PIN. This module turns a URI such as `pkcs11:token=release;object=fw-2025` into a signer that produces
exactly the signature forms `keys.SoftwareSigner` produces (RSA-PSS over the prehashed digest, DER ECDSA,
Ed25519 over the 32 digest bytes), so nothing downstream can tell the two apart.

python-pkcs11 is an optional dependency (`mers[hsm]`): it is imported only once a token is really needed,
so the URI parser and the rest of the package work without it. Every failure a user can cause (a wrong
PIN, a missing token or object, a module that is not one) becomes a one-line `Pkcs11Error`; no exception
of the PKCS#11 library escapes.

PKCS#11 modules are initialised once per process (C_Initialize), and python-pkcs11 keeps a loaded module
for the life of the process; `Pkcs11Signer.close` ends the session and logs out, it does not unload it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .errors import Pkcs11Error, UnsupportedKeyTypeError
from .keys import KeyAlgorithm, PublicKey, PublicKeyObject, algorithm_of
from .pkcs11_uri import ObjectType, Pkcs11Uri, parse_pkcs11_uri, resolve_module_path, resolve_pin

if TYPE_CHECKING:
    from pkcs11 import Mechanism, Session, Token
    from pkcs11._pkcs11 import lib as Pkcs11Library
    from pkcs11.types import Object

__all__ = ["ObjectType", "Pkcs11Signer", "Pkcs11Uri", "load_pkcs11_signer", "parse_pkcs11_uri"]

_INSTALL_HINT = "PKCS#11 support is not installed: install mers[hsm]"
_DIGEST_SIZE = 32


# --- the signer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mechanism:
    """How the token must sign for the image's signature TLV to verify the way MCUboot checks it."""

    mechanism: Mechanism
    parameter: Any | None
    raw_is_r_and_s: bool  # ECDSA tokens return r||s, the image carries DER


class Pkcs11Signer:
    """A private key on a token, reached through one logged-in session.

    The session stays open so several digests can be signed with one login; `close()` (or leaving a
    `with` block) logs out and ends it. Every signature is checked against the public key before it is
    returned: a public key object that does not pair with the private key would otherwise yield images
    whose KEYHASH names a key that did not sign them, found out only on a device.
    """

    def __init__(
        self, session: Session, key: Object, public_key: PublicKey, mechanism: _Mechanism, description: str
    ) -> None:
        self._session: Session | None = session
        self._key = key
        self._public_key = public_key
        self._mechanism = mechanism
        self._description = description
        self._lock = threading.Lock()  # a PKCS#11 session runs one operation at a time

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def description(self) -> str:
        """The key as messages name it: label, id and token (no PIN)."""
        return self._description

    @property
    def closed(self) -> bool:
        return self._session is None

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature TLV value for the 32-byte SHA-256 image digest, made by the token."""
        if len(digest) != _DIGEST_SIZE:
            raise Pkcs11Error(f"a signer signs a {_DIGEST_SIZE}-byte SHA-256 digest, not {len(digest)} bytes")
        import pkcs11  # noqa: PLC0415 - present: the signer could not exist without it

        with self._lock:
            if self._session is None:
                raise Pkcs11Error(f"the PKCS#11 signer for {self._description} is closed")
            try:
                raw = self._key.sign(  # type: ignore[attr-defined]
                    digest, mechanism=self._mechanism.mechanism, mechanism_param=self._mechanism.parameter
                )
            except pkcs11.PKCS11Error as exc:
                message = f"the token refused to sign with {self._description}: {_name(exc)}"
                raise Pkcs11Error(message) from exc
        signature = _der_ecdsa(raw) if self._mechanism.raw_is_r_and_s else bytes(raw)
        if not self._public_key.verifies(signature, digest):
            raise Pkcs11Error(
                f"the signature by {self._description} does not verify with its public key object: "
                "the token's public and private objects do not belong together"
            )
        return signature

    def close(self) -> None:
        """Log out and end the session; closing twice is harmless."""
        import pkcs11  # noqa: PLC0415 - present: the signer could not exist without it

        with self._lock:
            session, self._session = self._session, None
        if session is None:
            return
        try:
            session.close()
        except pkcs11.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot close the session of {self._description}: {_name(exc)}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._public_key.algorithm.value
        return f"<Pkcs11Signer {self._description} {state}>"


def _der_ecdsa(raw: bytes) -> bytes:
    """PKCS#11 ECDSA gives r||s, each as long as the order; MCUboot's ECDSASIG TLV is DER."""
    if len(raw) != 2 * _DIGEST_SIZE:
        raise Pkcs11Error(f"the token returned a {len(raw)}-byte ECDSA signature; P-256 gives 64")
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


def _name(exc: BaseException) -> str:
    """python-pkcs11 errors mostly carry no message: their class names the CKR_ code."""
    text = str(exc).replace("\n", " ").strip()
    return f"{type(exc).__name__} ({text})" if text else type(exc).__name__


# --- loading ---------------------------------------------------------------------------------------


def load_pkcs11_signer(uri: str, *, module_path: str | None = None, pin: str | None = None) -> Pkcs11Signer:
    """Open the token the URI names, log in, and find the private key and its public half.

    `module_path` and `pin` override the URI's `module-path` and `pin-value`/`pin-source`. Every check
    that can fail does so here, before a caller has written any output: the key's type and size, its
    permission to sign, and the token's support for the mechanism MCUboot's signature type needs.
    """
    parsed = parse_pkcs11_uri(uri)
    _check_names_a_private_key(parsed)
    module = resolve_module_path(parsed, module_path)
    user_pin = resolve_pin(parsed, pin)
    try:
        import pkcs11  # noqa: PLC0415 - optional dependency, imported only when a token is used
    except ImportError as exc:
        raise Pkcs11Error(_INSTALL_HINT) from exc
    try:
        token = _find_token(_load_module(module), parsed, module)
        session = _log_in(token, user_pin)
        try:
            return _signer_in_session(session, token, parsed)
        except BaseException:
            # the error being raised is the one the user must see; a failing close must not hide it
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()
            raise
    except pkcs11.PKCS11Error as exc:
        raise Pkcs11Error(f"PKCS#11 error with {parsed.describe_object()}: {_name(exc)}") from exc


def _check_names_a_private_key(uri: Pkcs11Uri) -> None:
    if uri.object is None and uri.id is None:
        raise Pkcs11Error("the PKCS#11 URI names no key: add object=LABEL and/or id=... to it")
    if uri.type is not None and uri.type is not ObjectType.PRIVATE:
        raise Pkcs11Error(f"the PKCS#11 URI names a {uri.type.value} object; signing needs type=private")


def _load_module(module: str) -> Pkcs11Library:
    import pkcs11  # noqa: PLC0415 - optional dependency, checked by the caller

    if not os.path.isfile(module):
        raise Pkcs11Error(f"PKCS#11 module {module} does not exist")
    try:
        return pkcs11.lib(module)
    except pkcs11.PKCS11Error as exc:
        reason = str(exc).rsplit(": ", 1)[-1].strip() or type(exc).__name__
        raise Pkcs11Error(f"{module} is not a loadable PKCS#11 module: {reason}") from exc


def _find_token(library: Pkcs11Library, uri: Pkcs11Uri, module: str) -> Token:
    """The one initialised token the URI's token attributes select (all of them, when it gives none)."""
    from pkcs11 import TokenFlag  # noqa: PLC0415 - optional dependency, checked by the caller

    present = [slot.get_token() for slot in library.get_slots(token_present=True)]
    tokens = [token for token in present if token.flags & TokenFlag.TOKEN_INITIALIZED]
    matches = [token for token in tokens if _token_matches(token, uri)]
    wanted = _describe_token_query(uri)
    if not matches:
        labels = ", ".join(sorted(repr(token.label) for token in tokens)) or "none"
        raise Pkcs11Error(f"no PKCS#11 token {wanted} in {module} (initialised tokens: {labels})")
    if len(matches) > 1:
        found = ", ".join(sorted(f"{token.label!r} serial {_serial(token)}" for token in matches))
        raise Pkcs11Error(f"{len(matches)} PKCS#11 tokens match {wanted}: {found}; add token= or serial=")
    return matches[0]


def _token_matches(token: Token, uri: Pkcs11Uri) -> bool:
    wanted = (uri.token, uri.manufacturer, uri.serial, uri.model)
    actual = (token.label, token.manufacturer_id, _serial(token), token.model)
    return all(want is None or want == have for want, have in zip(wanted, actual, strict=True))


def _serial(token: Token) -> str:
    return token.serial.rstrip(b"\0 ").decode("ascii", "replace")


def _describe_token_query(uri: Pkcs11Uri) -> str:
    pairs = {"token": uri.token, "manufacturer": uri.manufacturer, "serial": uri.serial, "model": uri.model}
    given = [f"{name}={value!r}" for name, value in pairs.items() if value is not None]
    return "matching " + " ".join(given) if given else "at all"


def _log_in(token: Token, pin: str) -> Session:
    import pkcs11  # noqa: PLC0415 - optional dependency, checked by the caller

    reasons: dict[type[Exception], str] = {
        pkcs11.PinIncorrect: "wrong PIN for PKCS#11 token {label!r}",
        pkcs11.PinLocked: "the PIN of PKCS#11 token {label!r} is locked after too many wrong attempts",
        pkcs11.PinExpired: "the PIN of PKCS#11 token {label!r} has expired",
        pkcs11.PinLenRange: "the PIN given for PKCS#11 token {label!r} has a length the token rejects",
        pkcs11.PinInvalid: "the PIN given for PKCS#11 token {label!r} has characters the token rejects",
        pkcs11.UserPinNotInitialized: "PKCS#11 token {label!r} has no user PIN set",
    }
    try:
        return token.open(user_pin=pin)
    except tuple(reasons) as exc:
        raise Pkcs11Error(reasons[type(exc)].format(label=token.label)) from exc


def _signer_in_session(session: Session, token: Token, uri: Pkcs11Uri) -> Pkcs11Signer:
    from pkcs11 import Attribute  # noqa: PLC0415 - optional dependency, checked by the caller

    key = _find_private_key(session, uri, token.label)
    label, key_id = _attribute(key, Attribute.LABEL, ""), _attribute(key, Attribute.ID, b"")
    description = f"object={label!r} id={key_id.hex() or '(none)'}"
    description += f" on token {token.label!r}"
    if not _attribute(key, Attribute.SIGN, True):
        raise Pkcs11Error(f"key {description} may not sign (its CKA_SIGN is false)")
    public_key = _public_key_of(session, key, description)
    mechanism = _mechanism_for(public_key, token, description)
    return Pkcs11Signer(session, key, public_key, mechanism, description)


def _find_private_key(session: Session, uri: Pkcs11Uri, token_label: str) -> Object:
    """Exactly one private key with the URI's label and id; when none, say what those do name."""
    from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415 - optional dependency, checked by the caller

    template: dict[Attribute, Any] = {}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    matches = list(session.get_objects({**template, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    where = f"{uri.describe_object()} on PKCS#11 token {token_label!r}"
    if len(matches) > 1:
        ids = ", ".join(sorted(f"id={_attribute(key, Attribute.ID, b'').hex()}" for key in matches))
        raise Pkcs11Error(f"{len(matches)} private keys match {where} ({ids}); add id= to choose one")
    if not matches:
        others = sorted({_class_name(obj) for obj in session.get_objects(template)})
        hint = f" (it holds only: {', '.join(others)})" if others else ""
        raise Pkcs11Error(f"no private key {where}{hint}")
    return matches[0]


def _class_name(obj: Object) -> str:
    from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415 - optional dependency, checked by the caller

    object_class = obj[Attribute.CLASS]
    names = {
        ObjectClass.PUBLIC_KEY: "a public key",
        ObjectClass.CERTIFICATE: "a certificate",
        ObjectClass.SECRET_KEY: "a secret key",
        ObjectClass.DATA: "a data object",
    }
    return names.get(object_class, f"object class {int(object_class):#x}")


def _attribute(obj: Object, attribute: Any, default: Any) -> Any:
    """An attribute the token may not define for this object (CKA_ID is optional, for one)."""
    import pkcs11  # noqa: PLC0415 - optional dependency, checked by the caller

    try:
        return obj[attribute]
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive):
        return default


# --- public key and mechanism ----------------------------------------------------------------------


def _public_key_of(session: Session, key: Object, description: str) -> PublicKey:
    """The public half as a cryptography key, refused unless it is one MCUboot images carry."""
    from pkcs11 import Attribute, KeyType  # noqa: PLC0415 - optional dependency, checked by the caller

    key_type = key[Attribute.KEY_TYPE]
    public: PublicKeyObject
    if key_type == KeyType.RSA:
        public = _rsa_public_key(session, key, description)
    elif key_type == KeyType.EC:
        public = _ec_public_key(_public_object(session, key, description), description)
    elif key_type == KeyType.EC_EDWARDS:
        public = _ed25519_public_key(_public_object(session, key, description), description)
    else:
        kind = getattr(key_type, "name", f"{int(key_type):#x}")
        raise Pkcs11Error(f"key {description} is of type {kind}: only RSA-3072, ECDSA P-256 and Ed25519 sign")
    try:
        algorithm_of(public)
    except UnsupportedKeyTypeError as exc:
        raise Pkcs11Error(f"key {description} is unusable: {exc}") from exc
    return PublicKey(public)


def _rsa_public_key(session: Session, key: Object, description: str) -> rsa.RSAPublicKey:
    """An RSA private key object normally carries its modulus and exponent; a public object otherwise."""
    from pkcs11 import Attribute  # noqa: PLC0415 - optional dependency, checked by the caller

    source = key
    if _attribute(key, Attribute.MODULUS, None) is None:
        source = _public_object(session, key, description)
    modulus = int.from_bytes(source[Attribute.MODULUS], "big")
    exponent = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise Pkcs11Error(f"the RSA public key of {description} is invalid: {exc}") from exc


def _public_object(session: Session, key: Object, description: str) -> Object:
    """The public key object paired with `key`: same CKA_ID (the PKCS#11 convention), else same label."""
    from pkcs11 import Attribute, ObjectClass  # noqa: PLC0415 - optional dependency, checked by the caller

    template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: key[Attribute.KEY_TYPE]}
    key_id = _attribute(key, Attribute.ID, b"")
    matches = list(session.get_objects({**template, Attribute.ID: key_id})) if key_id else []
    if not matches:
        label = _attribute(key, Attribute.LABEL, "")
        matches = list(session.get_objects({**template, Attribute.LABEL: label})) if label else []
    if len(matches) > 1:
        raise Pkcs11Error(f"{len(matches)} public key objects could pair with {description}: ambiguous")
    if not matches:
        raise Pkcs11Error(
            f"no public key object with the id or label of {description}: the token must hold the public half"
        )
    return matches[0]


_EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1, id-ecPublicKey
_ED25519_PARAMS = (
    bytes.fromhex("06032b6570"),  # OID 1.3.101.112
    b"\x13\x0cedwards25519",  # PrintableString, the PKCS#11 3.0 alternative
)


def _ec_public_key(public: Object, description: str) -> ec.EllipticCurvePublicKey:
    """Rebuild SubjectPublicKeyInfo from CKA_EC_PARAMS and CKA_EC_POINT and let cryptography judge it.

    CKA_EC_POINT should be a DER OCTET STRING, but some tokens give the bare point; both are tried."""
    from pkcs11 import Attribute  # noqa: PLC0415 - optional dependency, checked by the caller

    params = bytes(public[Attribute.EC_PARAMS])
    stored = bytes(public[Attribute.EC_POINT])
    candidates = [point for point in (_unwrap_octet_string(stored), stored) if point is not None]
    for point in candidates:
        spki = _der(0x30, _der(0x30, _EC_PUBLIC_KEY_OID + params) + _der(0x03, b"\x00" + point))
        try:
            loaded = serialization.load_der_public_key(spki)
        except UnsupportedAlgorithm as exc:
            raise Pkcs11Error(f"key {description} is on an EC curve mers cannot use") from exc
        except ValueError:
            continue
        if isinstance(loaded, ec.EllipticCurvePublicKey):
            return loaded
    raise Pkcs11Error(f"the EC public key object of {description} holds no valid point")


def _ed25519_public_key(public: Object, description: str) -> ed25519.Ed25519PublicKey:
    from pkcs11 import Attribute  # noqa: PLC0415 - optional dependency, checked by the caller

    if bytes(public[Attribute.EC_PARAMS]) not in _ED25519_PARAMS:
        raise Pkcs11Error(f"key {description} is an Edwards key but not Ed25519 (Ed448 is not supported)")
    stored = bytes(public[Attribute.EC_POINT])
    point = stored if len(stored) == 32 else _unwrap_octet_string(stored)
    if point is None or len(point) != 32:
        raise Pkcs11Error(f"the Ed25519 public key object of {description} holds no 32-byte key")
    return ed25519.Ed25519PublicKey.from_public_bytes(point)


def _der(tag: int, body: bytes) -> bytes:
    """One DER TLV; enough DER to wrap token attributes in the structures cryptography parses."""
    length = len(body)
    if length < 0x80:
        return bytes((tag, length)) + body
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(encoded))) + encoded + body


def _unwrap_octet_string(data: bytes) -> bytes | None:
    """The content of a DER OCTET STRING that spans all of `data`, or None when `data` is not one."""
    if len(data) < 2 or data[0] != 0x04:
        return None
    length, offset = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 2 or len(data) < 2 + count:
            return None
        length, offset = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    return data[offset:] if len(data) - offset == length else None


def _mechanism_for(public_key: PublicKey, token: Token, description: str) -> _Mechanism:
    """The mechanism for the key's image signature type, refused now if the token does not offer it."""
    from pkcs11 import MGF, Mechanism  # noqa: PLC0415 - optional dependency, checked by the caller

    algorithm = public_key.algorithm
    if algorithm is KeyAlgorithm.RSA3072:
        # MCUboot's RSA3072 TLV: PSS, SHA-256, MGF1-SHA256, 32-byte salt, over the digest as given
        chosen = _Mechanism(Mechanism.RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32), raw_is_r_and_s=False)
    elif algorithm is KeyAlgorithm.ECDSA_P256:
        chosen = _Mechanism(Mechanism.ECDSA, None, raw_is_r_and_s=True)
    else:
        chosen = _Mechanism(Mechanism.EDDSA, None, raw_is_r_and_s=False)
    if chosen.mechanism not in token.slot.get_mechanisms():
        raise Pkcs11Error(
            f"token {token.label!r} does not offer CKM_{chosen.mechanism.name}, "
            f"which {algorithm.value} image signatures need (key {description})"
        )
    return chosen

"""PKCS#11 URIs (RFC 7512), and where the module and PIN a URI leaves open come from.

Parsing is strict (unknown, duplicated or badly escaped attributes are refused) and needs no PKCS#11
library, so a malformed `--key pkcs11:...` is reported before any module is loaded. A PIN never appears in
a message or a repr.
"""

from __future__ import annotations

import enum
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

from .errors import Pkcs11Error

_PIN_FILE_LIMIT = 1024  # a PIN file is a few bytes; `pin-source=/dev/zero` must not hang the signer


# --- URI (RFC 7512) --------------------------------------------------------------------------------


class ObjectType(enum.Enum):
    """The RFC 7512 `type` attribute: the PKCS#11 object class a URI names."""

    PUBLIC = "public"
    PRIVATE = "private"
    CERT = "cert"
    SECRET_KEY = "secret-key"  # noqa: S105 - an object class name, not a secret
    DATA = "data"


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI: which token and object, and optionally how to reach them.

    Text attributes are percent-decoded UTF-8; `id` is the raw CKA_ID bytes. `pin_value` is kept out of
    `repr` so a logged or printed URI object never shows the PIN.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: ObjectType | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None
    module_path: str | None = None

    def describe_object(self) -> str:
        """How messages name the key: its label and id as the URI gives them, never a secret."""
        parts = []
        if self.object is not None:
            parts.append(f"object={self.object!r}")
        if self.id is not None:
            parts.append(f"id={self.id.hex() or '(empty)'}")
        return " ".join(parts) or "(any object)"


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
# "&" may stand unencoded in the path, "/", "?" and "|" in the query (RFC 7512 section 2.3)
_PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
_HEX_DIGITS = frozenset(string.hexdigits)

_TEXT_PATH_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "object")
_PATH_ATTRIBUTES = frozenset((*_TEXT_PATH_ATTRIBUTES, "id", "type"))
_QUERY_ATTRIBUTES = frozenset(("pin-value", "pin-source", "module-path"))
# standard attributes we understand but cannot honour: refusing them beats silently matching more
_UNSUPPORTED_ATTRIBUTES = frozenset(
    (
        "library-manufacturer",
        "library-description",
        "library-version",
        "slot-manufacturer",
        "slot-description",
        "slot-id",
        "module-name",
    )
)


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 PKCS#11 URI, strictly.

    Strict because a URI selects a signing key: an attribute we ignored, a duplicate we resolved one way,
    or a sloppy escape we guessed at could pick a different key than the one the user named. Messages
    name the attribute, never echo the URI, as it may carry a PIN.
    """
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "pkcs11":
        raise Pkcs11Error("not a PKCS#11 URI: it must start with 'pkcs11:'")
    path, _, query = rest.partition("?")
    path_values = _split_attributes(path, ";", _PATH_CHARS, _PATH_ATTRIBUTES, "path")
    query_values = _split_attributes(query, "&", _QUERY_CHARS, _QUERY_ATTRIBUTES, "query")
    if "pin-value" in query_values and "pin-source" in query_values:
        raise Pkcs11Error("PKCS#11 URI gives both pin-value and pin-source: give one")
    text = {name: _utf8(value, name) for name, value in (path_values | query_values).items() if name != "id"}
    return Pkcs11Uri(
        token=text.get("token"),
        manufacturer=text.get("manufacturer"),
        serial=text.get("serial"),
        model=text.get("model"),
        object=text.get("object"),
        id=path_values.get("id"),
        type=_object_type(text["type"]) if "type" in text else None,
        pin_value=text.get("pin-value"),
        pin_source=text.get("pin-source"),
        module_path=text.get("module-path"),
    )


def _split_attributes(
    component: str, separator: str, allowed: frozenset[str], known: frozenset[str], where: str
) -> dict[str, bytes]:
    """`name=value` pairs of one URI component, values percent-decoded to bytes."""
    values: dict[str, bytes] = {}
    if not component:
        return values
    for attribute in component.split(separator):
        name, equals, raw_value = attribute.partition("=")
        if not equals or not name:
            raise Pkcs11Error(f"malformed PKCS#11 URI: {where} attribute {name or '(empty)'!r} has no value")
        if name not in known:
            raise Pkcs11Error(_unknown_attribute_message(name, where))
        if name in values:
            raise Pkcs11Error(f"malformed PKCS#11 URI: attribute {name!r} appears twice")
        values[name] = _percent_decode(raw_value, allowed, name)
    return values


def _unknown_attribute_message(name: str, where: str) -> str:
    if name in _UNSUPPORTED_ATTRIBUTES:
        return f"PKCS#11 URI attribute {name!r} is not supported by mers"
    return f"unknown PKCS#11 URI {where} attribute {name!r}"


def _percent_decode(raw: str, allowed: frozenset[str], name: str) -> bytes:
    """RFC 3986 percent-decoding that rejects what lenient decoders pass through (`%g1`, a raw space).

    The PIN's characters are never quoted in a message."""
    for index, char in enumerate(raw):
        if char == "%":
            pair = raw[index + 1 : index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX_DIGITS:
                shown = "" if name == "pin-value" else f" {raw[index : index + 3]!r}"
                raise Pkcs11Error(f"malformed PKCS#11 URI: bad percent-encoding{shown} in {name}")
        elif char not in allowed:
            if name == "pin-value":
                raise Pkcs11Error("malformed PKCS#11 URI: pin-value has a character that must be %-encoded")
            escaped = "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
            raise Pkcs11Error(f"malformed PKCS#11 URI: {char!r} in {name} must be written {escaped}")
    return unquote_to_bytes(raw)


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Pkcs11Error(f"malformed PKCS#11 URI: {name} is not UTF-8 text once decoded") from exc


def _object_type(value: str) -> ObjectType:
    try:
        return ObjectType(value)
    except ValueError:
        choices = ", ".join(member.value for member in ObjectType)
        raise Pkcs11Error(f"unknown PKCS#11 object type {value!r} (one of {choices})") from None


# --- what the URI leaves to the caller: module and PIN ---------------------------------------------


def resolve_module_path(uri: Pkcs11Uri, module_path: str | None) -> str:
    chosen = module_path if module_path is not None else uri.module_path
    if not chosen:
        raise Pkcs11Error("no PKCS#11 module given: pass the module path or add module-path=... to the URI")
    return os.path.abspath(chosen)


def resolve_pin(uri: Pkcs11Uri, pin: str | None) -> str:
    if pin is not None:
        return pin
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        return _read_pin_file(_pin_source_path(uri.pin_source))
    raise Pkcs11Error("no PIN for the PKCS#11 token: give a PIN file, or pin-source=... in the URI")


def _pin_source_path(source: str) -> Path:
    """`pin-source` is a path or a `file:` URI (RFC 8089: `file:/p`, `file:///p`, `file://localhost/p`)."""
    if not source.lower().startswith("file:"):
        return Path(source)
    rest = source[len("file:") :]
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise Pkcs11Error(f"pin-source {source!r} names another host; only local files can hold a PIN")
        rest = slash + path
    try:
        return Path(unquote_to_bytes(rest).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Pkcs11Error(f"pin-source {source!r} is not a UTF-8 path") from exc


def _read_pin_file(path: Path) -> str:
    """The PIN in `path` without the one trailing newline an editor or `echo` adds; bounded in size."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_PIN_FILE_LIMIT + 1)
    except OSError as exc:
        raise Pkcs11Error(f"cannot read PIN file {path}: {exc.strerror}") from exc
    if len(data) > _PIN_FILE_LIMIT:
        raise Pkcs11Error(f"PIN file {path} is longer than {_PIN_FILE_LIMIT} bytes; is it the right file?")
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise Pkcs11Error(f"PIN file {path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Pkcs11Error(f"PIN file {path} is not UTF-8 text") from exc

"""The serial provisioning protocol's wire format (docs/design.md §5), shared by the board and the factory.

This module is the whole contract between the factory station and a board's console: identifiers,
request and response schemas, error codes, transport limits and the lock digest. It does no I/O, so
the station imports it (and nothing else of `board`) and both sides agree by construction.

Transport: SMP (MCUmgr's Simple Management Protocol) over serial. A message is the 8-byte SMP header
(`smp.header.Header`) followed by one CBOR map; `smp.packet` frames it as base64 lines with a CRC16
(start `06 09`, continuation `04 14`, each line at most `MAX_LINE_LENGTH` bytes). A response echoes the
request's SMP version, group, command and sequence, with the op turned into its response op.

Commands (group, command, request op):

=====  =======  =====  ==================  =================================================================
group  command  op     name                body in -> body out
=====  =======  =====  ==================  =================================================================
0      0        write  echo                ``{d: tstr}`` -> ``{r: tstr}``
0      5        write  reset               ``{force?: uint, boot_mode?: uint}`` -> ``{}``
0      6        read   MCUmgr parameters   ``{}`` -> ``{buf_size: uint, buf_count: uint}``
64     0        read   info                ``{}`` -> `InfoResponse`
64     1        write  write_key           `WriteKeyRequest` -> `WriteKeyResponse`
64     2        write  write_boarding      `WriteBoardingRequest` or `WriteBoardingChunk`
                                           -> `WriteBoardingResponse`
64     3        write  lock                `LockRequest` -> `LockResponse`
=====  =======  =====  ==================  =================================================================

Errors (the board answers in the request's SMP version):

- Transport and generic problems (unknown group or command, wrong op, undecodable CBOR, a field of the
  wrong type, a message larger than the buffer, a truncated body) are ``{rc: MGMT_ERR, rsn?: tstr}``
  with the generic codes of `GenericRc` (SMP's MGMT_ERR), in both versions, as Zephyr answers them.
- Refusals of the provisioning group are group errors with the codes of `ProvisioningRc`: in SMP
  version 2 ``{err: {group: 64, rc: N}, rsn?: tstr}``; in version 1 ``{rc: 256 + N, rsn?: tstr}``
  (MCUmgr reserves codes from 256, `EPERUSER`, for user groups), so no information is lost.
- ``rsn`` is the MCUmgr "verbose error" reason: a human sentence for logs, never parsed.

Writes are idempotent: the same data again is a success that changes nothing, so a station retries a
request whose answer was lost with the same data. `write_boarding` also takes the data in chunks
(`WriteBoardingChunk`), because at a byte error rate of 1e-3 a 4 KiB frame almost never arrives intact.
`write_key` carries the key's SHA-256 so that a line error CRC16 misses cannot burn a wrong key into a
write-once slot, and `lock` carries the `lock_digest` the station computed over what it wrote.

A station sends ``frame_lines(encode_request(WRITE_KEY, sequence, WriteKeyRequest.for_key(...).to_cbor()))``
and reads the reassembled answer with ``decode_answer(WRITE_KEY, sequence, message)`` and the response
schema's ``from_cbor``; `wire_size` tells how long a message takes on the line.
"""

from __future__ import annotations

import enum
import hashlib
import io
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard, TypeVar

import cbor2
from smp import header as smp_header
from smp import packet as smp_packet
from smp.error import MGMT_ERR

from . import interface
from .errors import BoardError
from .interface import KEY_SLOT_COUNT

PROTOCOL_VERSION: Final = 1
"""Reported by `info` as ``proto``; raised when a schema changes incompatibly."""

# --- transport limits --------------------------------------------------------------------------------

MAX_LINE_LENGTH: Final = 127
"""No serial line (delimiter, base64, newline) is longer; the board drops a longer one as broken."""

ENCODER_LINE_LENGTH: Final = 128
"""The `line_length` to give `smp.packet.encode` (it counts 128 by convention and emits at most 127)."""

BUFFER_SIZE: Final = 8192
"""The board's decoded reassembly buffer, reported as MCUmgr ``buf_size``: the 2-byte frame length, the
SMP message and the 2-byte CRC16 (the meaning smpclient gives it)."""

BUFFER_COUNT: Final = 1
"""Reported as MCUmgr ``buf_count``: the board handles one request at a time; keep one in flight."""

MAX_MESSAGE_SIZE: Final = BUFFER_SIZE - 4
"""The largest SMP message (header and body) a board accepts; a larger frame is refused."""

MAX_BOARDING_SIZE: Final = 256 * 1024
"""The largest chunked `write_boarding` upload (its ``len``, `WriteBoardingRequest.upload_size`): bounds
the board's staging memory."""


# What a board stores of its boarding data, at most: part of the wire format, defined with the board's
# interface, which the device side reads without this module and its SMP stack.
MAX_CONFIG_SIZE: Final = interface.MAX_CONFIG_SIZE
MAX_CA_BUNDLE_SIZE: Final = interface.MAX_CA_BUNDLE_SIZE
MAX_NETWORK_SIZE: Final = interface.MAX_NETWORK_SIZE

RECOMMENDED_CHUNK_SIZE: Final = 256
"""A `write_boarding` chunk size that survives a byte error rate of 1e-3 about two times in three."""

KEY_SLOTS: Final = KEY_SLOT_COUNT
#: a serial number names the board in the records (and in file names on the line): short and printable
MAX_SERIAL_NUMBER: Final = 128
SHA256_SIZE: Final = 32

# --- identifiers -----------------------------------------------------------------------------------------

Op = smp_header.OP
SmpVersion = smp_header.Version
GenericRc = MGMT_ERR
"""SMP's generic error codes (``rc``), re-exported so the station needs only this module."""

OS_GROUP: Final = 0
PROVISIONING_GROUP: Final = 64
USER_RC_BASE: Final = int(MGMT_ERR.EPERUSER)


class OsCommand(enum.IntEnum):
    ECHO = 0
    RESET = 5
    MCUMGR_PARAMETERS = 6


class ProvisioningCommand(enum.IntEnum):
    INFO = 0
    WRITE_KEY = 1
    WRITE_BOARDING = 2
    LOCK = 3


@dataclass(frozen=True)
class Command:
    """One command of the protocol: where it lives and which request op it answers."""

    group: int
    command: int
    op: Op
    name: str


ECHO: Final = Command(OS_GROUP, OsCommand.ECHO, Op.WRITE, "echo")
RESET: Final = Command(OS_GROUP, OsCommand.RESET, Op.WRITE, "reset")
MCUMGR_PARAMETERS: Final = Command(OS_GROUP, OsCommand.MCUMGR_PARAMETERS, Op.READ, "mcumgr_parameters")
INFO: Final = Command(PROVISIONING_GROUP, ProvisioningCommand.INFO, Op.READ, "info")
WRITE_KEY: Final = Command(PROVISIONING_GROUP, ProvisioningCommand.WRITE_KEY, Op.WRITE, "write_key")
WRITE_BOARDING: Final = Command(
    PROVISIONING_GROUP, ProvisioningCommand.WRITE_BOARDING, Op.WRITE, "write_boarding"
)
LOCK: Final = Command(PROVISIONING_GROUP, ProvisioningCommand.LOCK, Op.WRITE, "lock")
COMMANDS: Final = (ECHO, RESET, MCUMGR_PARAMETERS, INFO, WRITE_KEY, WRITE_BOARDING, LOCK)


class ProvisioningRc(enum.IntEnum):
    """Group 64 error codes: each names one reason a board refuses, so the station can act on it."""

    OK = 0
    UNKNOWN = 1
    """The board failed in a way it did not expect; nothing was committed."""
    LOCKED = 2
    """Provisioning is locked: every write is refused (a lock with the same digest is not a write)."""
    SLOT_OCCUPIED = 3
    """The key slot holds another key: trust anchors are write-once."""
    SLOT_REVOKED = 4
    """The key slot's key is revoked; nothing can be written there again."""
    DUPLICATE_KEY = 5
    """The key is already in another slot (revoking one copy would leave the other trusted)."""
    INVALID_SLOT = 6
    """No key slot has this index."""
    INVALID_KEY = 7
    """Not a supported public key (RSA-3072, ECDSA P-256, Ed25519) in the DER form MCUboot embeds
    (PKCS#1 for RSA, SubjectPublicKeyInfo otherwise)."""
    KEY_HASH_MISMATCH = 8
    """The key that arrived does not hash to the ``key_hash`` the station sent: corrupted on the line."""
    INVALID_BOARDING = 9
    """The boarding data failed the board's validation (JSON, profile, IAT ``sub`` = ``clientId``, CA)."""
    NOT_READY = 10
    """Lock needs at least one key and the boarding data."""
    DIGEST_MISMATCH = 11
    """The station's lock digest differs from the board's: the board holds other data than intended."""
    STORAGE = 12
    """The board's storage failed; the write did not commit (the old state is intact)."""
    UPLOAD_TOO_LARGE = 13
    """A chunked upload announced more than `MAX_BOARDING_SIZE` bytes."""
    UPLOAD_MISMATCH = 14
    """A completed chunked upload does not hash to its announced ``sha``; the staging was discarded."""


# --- errors ------------------------------------------------------------------------------------------------


class ProtocolError(BoardError):
    """A message or body does not follow this wire format; `field` names the part that failed."""


@dataclass(frozen=True)
class ErrorReply:
    """An SMP error answer: a generic ``rc`` (`group` None) or a group error (`group` set)."""

    rc: int
    group: int | None = None
    reason: str = ""

    def to_map(self, version: SmpVersion) -> dict[str, object]:
        body: dict[str, object]
        if self.group is None:
            body = {"rc": self.rc}
        elif version is SmpVersion.V2:
            body = {"err": {"group": self.group, "rc": self.rc}}
        else:
            body = {"rc": USER_RC_BASE + self.rc}
        if self.reason:
            body["rsn"] = self.reason
        return body

    @classmethod
    def from_map(cls, body: Mapping[str, object], group: int) -> ErrorReply | None:
        """The error `body` carries (answering a request to `group`), or None for a success."""
        reason = body.get("rsn")
        text = reason if isinstance(reason, str) else ""
        err = body.get("err")
        if isinstance(err, Mapping):
            rc = err.get("rc")
            err_group = err.get("group")
            if _is_int(rc) and _is_int(err_group):
                return None if rc == 0 else cls(rc, err_group, text)
            raise ProtocolError("err is not {group, rc}", field="err")
        rc = body.get("rc", 0)
        if not _is_int(rc):
            raise ProtocolError("rc is not an integer", field="rc")
        if rc == 0:
            return None
        if rc >= USER_RC_BASE and group >= PROVISIONING_GROUP:
            return cls(rc - USER_RC_BASE, group, text)
        return cls(rc, None, text)

    def describe(self) -> str:
        """One line for people: the code's name and the reason."""
        name = f"rc {self.rc}" if self.group is None else f"group {self.group} rc {self.rc}"
        tables: dict[int | None, type[enum.IntEnum]] = {None: MGMT_ERR, PROVISIONING_GROUP: ProvisioningRc}
        codes = tables.get(self.group)
        if codes is not None and self.rc in {int(code) for code in codes}:
            name = codes(self.rc).name
        return f"{name}: {self.reason}" if self.reason else name


# --- messages --------------------------------------------------------------------------------------------


def encode_request(
    command: Command, sequence: int, body: bytes, version: SmpVersion = SmpVersion.V2
) -> bytes:
    """The SMP message (header and CBOR body) a station sends for `command`."""
    header = smp_header.Header(
        op=command.op,
        version=version,
        flags=smp_header.Flag(0),
        length=len(body),
        group_id=command.group,
        sequence=sequence & 0xFF,
        command_id=command.command,
    )
    return bytes(header) + body


def encode_response(request: smp_header.Header, body: bytes) -> bytes:
    """The SMP message answering `request`: same version, group, command and sequence."""
    header = smp_header.Header(
        op=Op(int(request.op) + 1),
        version=request.version,
        flags=smp_header.Flag(0),
        length=len(body),
        group_id=request.group_id,
        sequence=request.sequence,
        command_id=request.command_id,
    )
    return bytes(header) + body


# the header's layout (SMP: res/version/op byte, flags, length, group, sequence, command), read by hand only
# where the smp library will not represent a header: a command it does not know in a group it knows
_RAW_HEADER: Final = struct.Struct("!BBHHBB")
_OP_BITS: Final = 0b111


class UnknownCommandError(ProtocolError):
    """A header naming a command the smp library does not know in a group it knows (OS command 20, say).
    The library refuses to build such a header, yet Zephyr answers the request ``ENOTSUP``, and a client
    left unanswered waits out its timeout: `answer` frames that answer from the raw header."""

    field = "header"

    def __init__(self, raw_header: bytes, reason: str) -> None:
        super().__init__(f"SMP header not understood: {reason}")
        self.raw_header = raw_header

    @property
    def is_request(self) -> bool:
        return Op(self.raw_header[0] & _OP_BITS) in (Op.READ, Op.WRITE)

    def answer(self, body: bytes) -> bytes:
        """The response message: the request's version, group, sequence and command, op + 1, no flags."""
        first, _, _, group, sequence, command = _RAW_HEADER.unpack(self.raw_header)
        response_op = (first & ~_OP_BITS) | ((first & _OP_BITS) + 1)
        return _RAW_HEADER.pack(response_op, 0, len(body), group, sequence, command) + body


def _only_the_command_is_unknown(raw_header: bytes) -> bool:
    """The library refused a header whose op, version and flags are valid: its command is what it does not
    know (the one other check it makes)."""
    first, flags, *_ = _RAW_HEADER.unpack(raw_header)
    try:
        Op(first & _OP_BITS)
        smp_header.Version((first >> 3) & 0b11)
        smp_header.Flag(flags)
    except ValueError:
        return False
    return True


def decode_message(message: bytes) -> tuple[smp_header.Header, bytes]:
    """The header and body of one SMP message; the header's length must match the body exactly."""
    if len(message) < smp_header.Header.SIZE:
        raise ProtocolError(f"{len(message)} bytes are shorter than an SMP header", field="header")
    raw_header = message[: smp_header.Header.SIZE]
    try:
        header = smp_header.Header.loads(raw_header)
    except ValueError as error:
        if _only_the_command_is_unknown(raw_header):
            raise UnknownCommandError(raw_header, str(error)) from None
        raise ProtocolError(f"SMP header not understood: {error}", field="header") from None
    body = message[smp_header.Header.SIZE :]
    if header.length != len(body):
        raise BodyLengthError(header, len(body))
    return header, body


class BodyLengthError(ProtocolError):
    """The body is shorter (truncated) or longer than its header says; `header` is still usable."""

    field = "length"

    def __init__(self, header: smp_header.Header, received: int) -> None:
        what = "truncated" if header.length > received else "followed by extra bytes"
        super().__init__(f"body {what}: the header says {header.length} bytes, {received} arrived")
        self.header = header


def decode_answer(command: Command, sequence: int, message: bytes) -> bytes | ErrorReply:
    """What a station makes of an answer: the body (for a response schema's ``from_cbor``), or the
    error it carries. An answer to another command or sequence is a `ProtocolError`: a stale answer
    to an earlier, retried request must never be taken for this one."""
    header, body = decode_message(message)
    expected = (Op(int(command.op) + 1), command.group, command.command, sequence & 0xFF)
    got = (header.op, int(header.group_id), int(header.command_id), header.sequence)
    if got != expected:
        raise ProtocolError(
            f"answer {got} does not answer {command.name} sequence {sequence}", field="header"
        )
    error = ErrorReply.from_map(decode_body(body), command.group)
    return body if error is None else error


def frame_lines(message: bytes) -> Iterator[bytes]:
    """The serial lines carrying `message` (base64, CRC16, at most `MAX_LINE_LENGTH` bytes each)."""
    return smp_packet.encode(message, line_length=ENCODER_LINE_LENGTH)


def wire_size(message_size: int) -> int:
    """Bytes on the wire for an SMP message of `message_size` bytes; with 8N1 a byte takes 10 bit
    times, so a station's timeout is at least ``wire_size(n) * 10 / baud`` seconds each way."""
    encoded = 4 * math.ceil((message_size + 4) / 3)
    per_line = ((ENCODER_LINE_LENGTH - 4) // 4) * 4
    lines = max(1, math.ceil(encoded / per_line))
    return encoded + lines * (len(smp_packet.START_DELIMITER) + len(smp_packet.END_DELIMITER))


# --- CBOR bodies -----------------------------------------------------------------------------------------


def decode_body(data: bytes) -> dict[str, object]:
    """One CBOR map with text keys and nothing after it; anything else is a `ProtocolError`.

    cbor2 reads only the first item and bounds nesting itself; the checks here stop a trailing second
    item from hiding in a body, and keep every decoder failure inside our error type."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as error:
        raise ProtocolError(f"body is not CBOR: {error}", field="body") from None
    if stream.tell() != len(data):
        raise ProtocolError("body has bytes after its CBOR map", field="body")
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ProtocolError("body is not a CBOR map with text keys", field="body")
    _refuse_big_integers(value, "body")
    return value


#: the integers CBOR encodes without a bignum tag; no field of ours needs more, and an unbounded one
#: (a 16,000-digit slot number) would fail far from here, where Python refuses to print it
_CBOR_INT_RANGE = range(-(1 << 64), 1 << 64)


def _refuse_big_integers(value: object, where: str) -> None:
    """Every integer anywhere in a body (cbor2 bounds the nesting) within CBOR's plain integer range."""
    if isinstance(value, int) and value not in _CBOR_INT_RANGE:
        raise ProtocolError(f"{where} holds an integer beyond 64 bits", field=where)
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_big_integers(item, key if where == "body" else where)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_big_integers(item, where)


def encode_body(body: Mapping[str, object]) -> bytes:
    """Canonical CBOR, so equal bodies are equal bytes (chunked uploads hash them)."""
    return cbor2.dumps(dict(body), canonical=True)


_T = TypeVar("_T")


def _is_int(value: object) -> TypeGuard[int]:
    # CBOR booleans decode to bool, which Python counts as int: a schema integer must refuse them
    return isinstance(value, int) and not isinstance(value, bool)


def _get(body: Mapping[str, object], key: str, kind: type[_T], *, optional: bool = False) -> _T | None:
    if key not in body or (optional and body[key] is None):
        if optional:
            return None
        raise ProtocolError(f"{key} is missing", field=key)
    value = body[key]
    wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    if wrong:
        raise ProtocolError(f"{key} must be {kind.__name__}, not {type(value).__name__}", field=key)
    return value  # type: ignore[return-value]  # isinstance checked above


def _required(body: Mapping[str, object], key: str, kind: type[_T]) -> _T:
    value = _get(body, key, kind)
    assert value is not None
    return value


def _optional(body: Mapping[str, object], key: str, kind: type[_T]) -> _T | None:
    return _get(body, key, kind, optional=True)


def _uint(body: Mapping[str, object], key: str) -> int:
    value = _required(body, key, int)
    if value < 0:
        raise ProtocolError(f"{key} must not be negative", field=key)
    return value


def _digest(value: bytes | None, key: str) -> bytes | None:
    if value is not None and len(value) != SHA256_SIZE:
        raise ProtocolError(f"{key} must be {SHA256_SIZE} bytes, not {len(value)}", field=key)
    return value


def _only(body: Mapping[str, object], allowed: Sequence[str], what: str) -> None:
    """Requests are strict: an unknown field may be a safety check the board would silently skip."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ProtocolError(f"{what} has unknown fields: {', '.join(unknown)}", field=unknown[0])


# --- OS group ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoRequest:
    text: str

    def to_cbor(self) -> bytes:
        return encode_body({"d": self.text})

    @classmethod
    def from_cbor(cls, data: bytes) -> EchoRequest:
        body = decode_body(data)
        _only(body, ("d",), "echo")
        return cls(_required(body, "d", str))


@dataclass(frozen=True)
class EchoResponse:
    text: str

    def to_cbor(self) -> bytes:
        return encode_body({"r": self.text})

    @classmethod
    def from_cbor(cls, data: bytes) -> EchoResponse:
        return cls(_required(decode_body(data), "r", str))


@dataclass(frozen=True)
class ResetRequest:
    """MCUmgr's reset; ``force`` and ``boot_mode`` are accepted as smpclient sends them and not used."""

    force: int | None = None
    boot_mode: int | None = None

    def to_cbor(self) -> bytes:
        body = {"force": self.force, "boot_mode": self.boot_mode}
        return encode_body({key: value for key, value in body.items() if value is not None})

    @classmethod
    def from_cbor(cls, data: bytes) -> ResetRequest:
        body = decode_body(data)
        _only(body, ("force", "boot_mode"), "reset")
        force = body.get("force")
        if force is not None and not isinstance(force, int):  # a bool is fine here: 0/1 either way
            raise ProtocolError(f"force must be 0 or 1, not {type(force).__name__}", field="force")
        return cls(None if force is None else int(force), _optional(body, "boot_mode", int))


@dataclass(frozen=True)
class McumgrParameters:
    buf_size: int = BUFFER_SIZE
    buf_count: int = BUFFER_COUNT

    def to_cbor(self) -> bytes:
        return encode_body({"buf_size": self.buf_size, "buf_count": self.buf_count})

    @classmethod
    def from_cbor(cls, data: bytes) -> McumgrParameters:
        body = decode_body(data)
        return cls(_uint(body, "buf_size"), _uint(body, "buf_count"))


@dataclass(frozen=True)
class EmptyRequest:
    """The body of a read without arguments (info, MCUmgr parameters): an empty map."""

    def to_cbor(self) -> bytes:
        return encode_body({})

    @classmethod
    def from_cbor(cls, data: bytes) -> EmptyRequest:
        _only(decode_body(data), (), "request")
        return cls()


# --- provisioning group: info ---------------------------------------------------------------------------


class SlotState(enum.StrEnum):
    """A key slot's state as the wire spells it."""

    EMPTY = "empty"
    WRITTEN = "written"
    REVOKED = "revoked"


@dataclass(frozen=True)
class SlotInfo:
    state: SlotState
    key_hash: bytes | None = None  # SHA-256 of the key's DER (the KEYHASH images carry)

    def to_map(self) -> dict[str, object]:
        body: dict[str, object] = {"state": self.state.value}
        if self.key_hash is not None:
            body["key_hash"] = self.key_hash
        return body

    @classmethod
    def from_map(cls, body: Mapping[str, object]) -> SlotInfo:
        state = _required(body, "state", str)
        try:
            known = SlotState(state)
        except ValueError:
            raise ProtocolError(f"unknown slot state {state!r}", field="state") from None
        return cls(known, _digest(_optional(body, "key_hash", bytes), "key_hash"))


@dataclass(frozen=True)
class BoardingHashes:
    """SHA-256 of each part of the boarding data as the board stores it."""

    config_sha256: bytes
    ca_sha256: bytes
    network_sha256: bytes | None = None

    @classmethod
    def of(cls, config: bytes, ca: bytes, network: bytes | None) -> BoardingHashes:
        return cls(
            hashlib.sha256(config).digest(),
            hashlib.sha256(ca).digest(),
            None if network is None else hashlib.sha256(network).digest(),
        )

    def to_map(self) -> dict[str, object]:
        body: dict[str, object] = {"config_sha256": self.config_sha256, "ca_sha256": self.ca_sha256}
        if self.network_sha256 is not None:
            body["network_sha256"] = self.network_sha256
        return body

    @classmethod
    def from_map(cls, body: Mapping[str, object]) -> BoardingHashes:
        config = _digest(_required(body, "config_sha256", bytes), "config_sha256")
        ca = _digest(_required(body, "ca_sha256", bytes), "ca_sha256")
        network = _digest(_optional(body, "network_sha256", bytes), "network_sha256")
        assert config is not None and ca is not None
        return cls(config, ca, network)


@dataclass(frozen=True)
class BoardingInfo:
    """What `info` tells about the stored boarding data. `client_id` is the configuration's
    ``content.clientId``; `expires` the IAT's ``exp`` (seconds since the epoch); either is None when the
    board cannot read it."""

    hashes: BoardingHashes
    client_id: str | None = None
    expires: int | None = None

    def to_map(self) -> dict[str, object]:
        return {**self.hashes.to_map(), "client_id": self.client_id, "expires": self.expires}

    @classmethod
    def from_map(cls, body: Mapping[str, object]) -> BoardingInfo:
        return cls(
            BoardingHashes.from_map(body),
            _optional(body, "client_id", str),
            _optional(body, "expires", int),
        )


@dataclass(frozen=True)
class InfoResponse:
    """Everything a station reads back before it locks, and checks afterwards.

    CBOR: ``{proto, serial, vendor, class, hw_rev, locked, slots: [{state, key_hash?}...], boarding:
    {config_sha256, ca_sha256, network_sha256?, client_id, expires} | null, digest: bstr | null}``;
    ``digest`` is the board's `lock_digest` when it could lock (at least one key and boarding data)."""

    serial_number: str
    vendor: str
    image_class: str
    hardware_revision: str
    locked: bool
    slots: tuple[SlotInfo, ...]
    boarding: BoardingInfo | None
    digest: bytes | None = None
    protocol: int = PROTOCOL_VERSION

    def to_cbor(self) -> bytes:
        return encode_body(
            {
                "proto": self.protocol,
                "serial": self.serial_number,
                "vendor": self.vendor,
                "class": self.image_class,
                "hw_rev": self.hardware_revision,
                "locked": self.locked,
                "slots": [slot.to_map() for slot in self.slots],
                "boarding": None if self.boarding is None else self.boarding.to_map(),
                "digest": self.digest,
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> InfoResponse:
        """Lenient about unknown fields: a newer board may tell more than this station knows."""
        body = decode_body(data)
        slots = _required(body, "slots", list)
        if not all(isinstance(slot, dict) for slot in slots):
            raise ProtocolError("slots must be maps", field="slots")
        if len(slots) != KEY_SLOTS:  # the lock digest covers every slot: a station cannot skip one
            raise ProtocolError(f"{len(slots)} key slots, a board has {KEY_SLOTS}", field="slots")
        serial_number = _required(body, "serial", str)
        if not 0 < len(serial_number) <= MAX_SERIAL_NUMBER or not serial_number.isprintable():
            raise ProtocolError(
                f"the serial number must be 1 to {MAX_SERIAL_NUMBER} printable characters", field="serial"
            )
        boarding = _optional(body, "boarding", dict)
        return cls(
            serial_number=serial_number,
            vendor=_required(body, "vendor", str),
            image_class=_required(body, "class", str),
            hardware_revision=_required(body, "hw_rev", str),
            locked=_required(body, "locked", bool),
            slots=tuple(SlotInfo.from_map(slot) for slot in slots),
            boarding=None if boarding is None else BoardingInfo.from_map(boarding),
            digest=_digest(_optional(body, "digest", bytes), "digest"),
            protocol=_uint(body, "proto"),
        )

    def key_hashes(self) -> tuple[bytes | None, ...]:
        return tuple(slot.key_hash for slot in self.slots)


# --- provisioning group: writes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteKeyRequest:
    """``{slot: uint, key: bstr, key_hash?: bstr}``. `key` is the DER MCUboot embeds (PKCS#1 for RSA,
    SubjectPublicKeyInfo otherwise). A station should send `key_hash` (SHA-256 of `key`): slots are
    write-once, and a line error that CRC16 misses would otherwise burn a wrong key for good."""

    slot: int
    key: bytes
    key_hash: bytes | None = None

    @classmethod
    def for_key(cls, slot: int, key: bytes) -> WriteKeyRequest:
        return cls(slot, key, hashlib.sha256(key).digest())

    def to_cbor(self) -> bytes:
        body: dict[str, object] = {"slot": self.slot, "key": self.key}
        if self.key_hash is not None:
            body["key_hash"] = self.key_hash
        return encode_body(body)

    @classmethod
    def from_cbor(cls, data: bytes) -> WriteKeyRequest:
        body = decode_body(data)
        _only(body, ("slot", "key", "key_hash"), "write_key")
        return cls(
            _uint(body, "slot"),
            _required(body, "key", bytes),
            _digest(_optional(body, "key_hash", bytes), "key_hash"),
        )


@dataclass(frozen=True)
class WriteKeyResponse:
    """``{slot, key_hash}``: the hash of the key the slot now holds."""

    slot: int
    key_hash: bytes

    def to_cbor(self) -> bytes:
        return encode_body({"slot": self.slot, "key_hash": self.key_hash})

    @classmethod
    def from_cbor(cls, data: bytes) -> WriteKeyResponse:
        body = decode_body(data)
        key_hash = _digest(_required(body, "key_hash", bytes), "key_hash")
        assert key_hash is not None
        return cls(_uint(body, "slot"), key_hash)


@dataclass(frozen=True)
class WriteBoardingRequest:
    """``{config: bstr, ca: bstr, network?: bstr}``: the boarding configuration JSON (with the IAT), the CA
    bundle PEM the device trusts for its hub, and the optional network configuration JSON."""

    config: bytes
    ca: bytes
    network: bytes | None = None

    def to_map(self) -> dict[str, object]:
        body: dict[str, object] = {"config": self.config, "ca": self.ca}
        if self.network is not None:
            body["network"] = self.network
        return body

    def to_cbor(self) -> bytes:
        return encode_body(self.to_map())

    @classmethod
    def from_map(cls, body: Mapping[str, object]) -> WriteBoardingRequest:
        _only(body, ("config", "ca", "network"), "write_boarding")
        return cls(
            _required(body, "config", bytes),
            _required(body, "ca", bytes),
            _optional(body, "network", bytes),
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> WriteBoardingRequest:
        return cls.from_map(decode_body(data))

    def hashes(self) -> BoardingHashes:
        return BoardingHashes.of(self.config, self.ca, self.network)

    def upload_size(self) -> int:
        """The bytes `chunks` uploads, which the board holds to `MAX_BOARDING_SIZE`."""
        return len(self.to_cbor())

    def chunks(self, chunk_size: int = RECOMMENDED_CHUNK_SIZE) -> list[WriteBoardingChunk]:
        """This request as a chunked upload: the CBOR of its whole form, cut into `chunk_size` pieces."""
        if chunk_size < 1:
            raise ProtocolError("chunk size must be positive", field="chunk_size")
        blob = self.to_cbor()
        sha = hashlib.sha256(blob).digest()
        return [
            WriteBoardingChunk(
                off=offset,
                data=blob[offset : offset + chunk_size],
                total=len(blob) if offset == 0 else None,
                sha256=sha if offset == 0 else None,
            )
            for offset in range(0, len(blob), chunk_size)
        ]


@dataclass(frozen=True)
class WriteBoardingChunk:
    """``{off: uint, data: bstr, len?: uint, sha?: bstr}``: one piece of a chunked `write_boarding`, the
    way MCUmgr uploads images. The uploaded bytes are the CBOR of the whole form
    (`WriteBoardingRequest.to_cbor`).

    - ``off`` 0 starts (or restarts) an upload and must carry ``len`` (total bytes, at most
      `MAX_BOARDING_SIZE`) and should carry ``sha`` (SHA-256 of all of them).
    - A chunk at any offset up to the next expected one is taken (the staging is cut to ``off``), so a
      resent chunk is harmless; a chunk beyond it changes nothing. Either way the answer's ``off`` is the
      next offset the board expects, and the station continues from there (0: start again).
    - The chunk that completes the upload commits it exactly like the whole form, and its answer carries
      the hashes. The staging lives in the console's memory: a restarted console answers ``off`` 0."""

    off: int
    data: bytes
    total: int | None = None
    sha256: bytes | None = None

    def to_cbor(self) -> bytes:
        body: dict[str, object] = {"off": self.off, "data": self.data}
        if self.total is not None:
            body["len"] = self.total
        if self.sha256 is not None:
            body["sha"] = self.sha256
        return encode_body(body)

    @classmethod
    def from_map(cls, body: Mapping[str, object]) -> WriteBoardingChunk:
        _only(body, ("off", "data", "len", "sha"), "write_boarding chunk")
        total = _optional(body, "len", int)
        if total is not None and total < 0:
            raise ProtocolError("len must not be negative", field="len")
        chunk = cls(
            _uint(body, "off"),
            _required(body, "data", bytes),
            total,
            _digest(_optional(body, "sha", bytes), "sha"),
        )
        if chunk.off == 0 and chunk.total is None:
            raise ProtocolError("the first chunk (off 0) must carry len", field="len")
        return chunk

    @classmethod
    def from_cbor(cls, data: bytes) -> WriteBoardingChunk:
        return cls.from_map(decode_body(data))


def decode_write_boarding(data: bytes) -> WriteBoardingRequest | WriteBoardingChunk:
    """Either form of a `write_boarding` body: a chunk has ``off``, the whole form does not."""
    body = decode_body(data)
    if "off" in body:
        return WriteBoardingChunk.from_map(body)
    return WriteBoardingRequest.from_map(body)


@dataclass(frozen=True)
class WriteBoardingResponse:
    """``{config_sha256, ca_sha256, network_sha256?}`` once the data is committed; a chunk's answer has
    ``off`` (the next offset expected) and the hashes only when that chunk completed the upload."""

    hashes: BoardingHashes | None
    off: int | None = None

    def to_cbor(self) -> bytes:
        body: dict[str, object] = {} if self.hashes is None else self.hashes.to_map()
        if self.off is not None:
            body["off"] = self.off
        return encode_body(body)

    @classmethod
    def from_cbor(cls, data: bytes) -> WriteBoardingResponse:
        body = decode_body(data)
        hashes = BoardingHashes.from_map(body) if "config_sha256" in body else None
        off = _uint(body, "off") if "off" in body else None
        if hashes is None and off is None:
            raise ProtocolError("write_boarding answer has neither hashes nor off", field="body")
        return cls(hashes, off)


@dataclass(frozen=True)
class LockRequest:
    """``{digest: bstr}``: the `lock_digest` the station computed over what it meant to write."""

    digest: bytes

    def to_cbor(self) -> bytes:
        return encode_body({"digest": self.digest})

    @classmethod
    def from_cbor(cls, data: bytes) -> LockRequest:
        body = decode_body(data)
        _only(body, ("digest",), "lock")
        digest = _digest(_required(body, "digest", bytes), "digest")
        assert digest is not None
        return cls(digest)


@dataclass(frozen=True)
class LockResponse:
    """``{locked: true, digest}``: the board is locked over exactly this digest."""

    digest: bytes
    locked: bool = True

    def to_cbor(self) -> bytes:
        return encode_body({"locked": self.locked, "digest": self.digest})

    @classmethod
    def from_cbor(cls, data: bytes) -> LockResponse:
        body = decode_body(data)
        digest = _digest(_required(body, "digest", bytes), "digest")
        assert digest is not None
        return cls(digest, _required(body, "locked", bool))


# --- the lock digest -------------------------------------------------------------------------------------

LOCK_DIGEST_DOMAIN: Final = b"mers/board/lock-digest/v1\x00"


def lock_digest(
    serial_number: str,
    key_hashes: Sequence[bytes | None],
    boarding: BoardingHashes,
) -> bytes:
    """What `lock` compares: SHA-256 over a fixed concatenation, computed by the station over what it
    wrote and by the board over what it holds, so a lock can only seal the data the station intended.

    The input, in this order (``u16`` big-endian)::

        "mers/board/lock-digest/v1" 0x00
        u16 len(serial) || serial (UTF-8)          -- binds the seal to this board: a swapped cable fails
        for each of the KEY_SLOTS slots, in index order:
            0x01 || key_hash (32)   when the slot holds a key (written or revoked)
            0x00 || 32 zero bytes   when it is empty
        config_sha256 (32) || ca_sha256 (32)
        0x01 || network_sha256 (32)  or  0x00 || 32 zero bytes without a network configuration

    A presence byte precedes each optional hash, so "absent" never collides with any real hash."""
    if len(key_hashes) != KEY_SLOTS:
        raise ProtocolError(f"{len(key_hashes)} key hashes, the board has {KEY_SLOTS} slots", field="slots")
    serial = serial_number.encode("utf-8")
    if len(serial) > 0xFFFF:
        raise ProtocolError("serial number too long", field="serial")
    digest = hashlib.sha256(LOCK_DIGEST_DOMAIN)
    digest.update(len(serial).to_bytes(2, "big") + serial)
    for key_hash in key_hashes:
        digest.update(_present(_digest(key_hash, "key_hash")))
    digest.update(_need(boarding.config_sha256, "config_sha256"))
    digest.update(_need(boarding.ca_sha256, "ca_sha256"))
    digest.update(_present(_digest(boarding.network_sha256, "network_sha256")))
    return digest.digest()


def lock_digest_of(info: InfoResponse) -> bytes | None:
    """The digest a board reporting `info` would lock over, or None while it cannot lock."""
    if info.boarding is None or all(key_hash is None for key_hash in info.key_hashes()):
        return None
    return lock_digest(info.serial_number, info.key_hashes(), info.boarding.hashes)


def _present(value: bytes | None) -> bytes:
    return b"\x00" + bytes(SHA256_SIZE) if value is None else b"\x01" + value


def _need(value: bytes, field: str) -> bytes:
    checked = _digest(value, field)
    assert checked is not None
    return checked

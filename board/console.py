"""The board's provisioning console: a `Board` served over a serial port or a pseudo-terminal.

The commands (docs/design.md §5, wire format in `board.protocol`): the OS group's echo, reset and MCUmgr
parameters, so any MCUmgr client can talk to a board, and the provisioning group's info, write_key,
write_boarding and lock. The console adds no state of its own beyond a chunked upload in progress:
every rule (write-once slots, the lock, validation, atomic commits) is the `Board`'s, and every
refusal of the board becomes the SMP error that names it. The console keeps serving after any error;
only a port that fails ends it, and the port is closed whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import select
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import serial

from . import protocol as wire
from .errors import (
    BoardError,
    BoardingDataError,
    BoardLockedError,
    DuplicateKeyError,
    InvalidKeyError,
    KeyRevokedError,
    KeySlotIndexError,
    NotReadyToLockError,
    StorageError,
    WriteOnceError,
)
from .interface import Board, BoardingData, KeySlot, KeySlotState
from .keystore import validate_boarding_data
from .line import ImpairedPort, LineConditions, Port
from .smp_server import RequestRefusedError, Route, ServerStats, SmpServer

logger = logging.getLogger(__name__)

POLL_INTERVAL: Final = 0.05  # how soon a stop request is noticed while the line is idle
WRITE_TIMEOUT: Final = 2.0  # plus the line time of a full buffer; then an answer no one reads is dropped

_RC_OF_ERROR: Final[dict[type[BoardError], wire.ProvisioningRc]] = {
    BoardLockedError: wire.ProvisioningRc.LOCKED,
    WriteOnceError: wire.ProvisioningRc.SLOT_OCCUPIED,
    KeyRevokedError: wire.ProvisioningRc.SLOT_REVOKED,
    DuplicateKeyError: wire.ProvisioningRc.DUPLICATE_KEY,
    KeySlotIndexError: wire.ProvisioningRc.INVALID_SLOT,
    InvalidKeyError: wire.ProvisioningRc.INVALID_KEY,
    BoardingDataError: wire.ProvisioningRc.INVALID_BOARDING,
    NotReadyToLockError: wire.ProvisioningRc.NOT_READY,
    StorageError: wire.ProvisioningRc.STORAGE,
}
_SLOT_STATES: Final = {
    KeySlotState.EMPTY: wire.SlotState.EMPTY,
    KeySlotState.WRITTEN: wire.SlotState.WRITTEN,
    KeySlotState.REVOKED: wire.SlotState.REVOKED,
}


class ConsolePortError(BoardError):
    """The serial port or pseudo-terminal could not be opened or failed while serving."""

    field = "port"


def refusal(rc: wire.ProvisioningRc, reason: str) -> RequestRefusedError:
    return RequestRefusedError(wire.ErrorReply(rc, wire.PROVISIONING_GROUP, reason))


def rc_for(error: BoardError) -> wire.ProvisioningRc:
    """The provisioning error code for a board refusal: the nearest mapped class in its ancestry."""
    for cls in type(error).__mro__:
        if cls in _RC_OF_ERROR:
            return _RC_OF_ERROR[cls]
    return wire.ProvisioningRc.UNKNOWN


@contextlib.contextmanager
def board_refusals() -> Iterator[None]:
    """Turn a board's refusal into the group error that names it; our own protocol errors pass."""
    try:
        yield
    except (wire.ProtocolError, RequestRefusedError):
        raise
    except BoardError as error:
        raise refusal(rc_for(error), str(error)) from error


# --- the commands -----------------------------------------------------------------------------------------


@dataclass
class _Upload:
    """A chunked write_boarding in progress (console memory only: a restart starts it again)."""

    total: int
    sha256: bytes | None
    data: bytearray


class ProvisioningService:
    """The handlers of the OS and provisioning groups over one board."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._upload: _Upload | None = None

    def routes(self) -> dict[tuple[int, int], Route]:
        """The routing table: each command of `board.protocol` with its op and handler."""
        handlers = {
            wire.ECHO: self.echo,
            wire.RESET: self.reset,
            wire.MCUMGR_PARAMETERS: self.mcumgr_parameters,
            wire.INFO: self.info,
            wire.WRITE_KEY: self.write_key,
            wire.WRITE_BOARDING: self.write_boarding,
            wire.LOCK: self.lock,
        }
        after = {wire.RESET: self.after_reset}
        return {
            (command.group, command.command): Route(command.op, handler, after.get(command))
            for command, handler in handlers.items()
        }

    # --- OS group

    def echo(self, body: bytes) -> bytes:
        return wire.EchoResponse(wire.EchoRequest.from_cbor(body).text).to_cbor()

    def mcumgr_parameters(self, body: bytes) -> bytes:
        wire.EmptyRequest.from_cbor(body)
        return wire.McumgrParameters().to_cbor()

    def reset(self, body: bytes) -> bytes:
        wire.ResetRequest.from_cbor(body)
        return wire.encode_body({})

    def after_reset(self) -> None:
        """Once the answer is out, as MCUmgr asks: forget the session and reboot the board."""
        self._upload = None
        try:
            self.board.reboot()
        except BoardError as error:
            logger.error("reset: the board could not reboot: %s", error)

    # --- provisioning group

    def info(self, body: bytes) -> bytes:
        wire.EmptyRequest.from_cbor(body)
        with board_refusals():
            return self.read_info().to_cbor()

    def read_info(self) -> wire.InfoResponse:
        identity = self.board.identity
        slots = self.board.key_slots()
        boarding = self.board.boarding_data()
        return wire.InfoResponse(
            serial_number=identity.serial_number,
            vendor=identity.vendor,
            image_class=identity.image_class,
            hardware_revision=identity.hardware_revision,
            locked=self.board.is_locked(),
            slots=tuple(wire.SlotInfo(_SLOT_STATES[slot.state], slot.key_hash) for slot in slots),
            boarding=None if boarding is None else _boarding_info(boarding),
            digest=self._digest(),
        )

    def write_key(self, body: bytes) -> bytes:
        request = wire.WriteKeyRequest.from_cbor(body)
        if request.key_hash is not None and hashlib.sha256(request.key).digest() != request.key_hash:
            raise refusal(
                wire.ProvisioningRc.KEY_HASH_MISMATCH,
                f"the key that arrived does not hash to key_hash; slot {request.slot} left unchanged",
            )
        with board_refusals():
            slot = self.board.write_key(request.slot, request.key)
        assert slot.key_hash is not None
        return wire.WriteKeyResponse(request.slot, slot.key_hash).to_cbor()

    def write_boarding(self, body: bytes) -> bytes:
        request = wire.decode_write_boarding(body)
        with board_refusals():
            if isinstance(request, wire.WriteBoardingChunk):
                return self._take_chunk(request).to_cbor()
            return wire.WriteBoardingResponse(self._commit_boarding(request)).to_cbor()

    def lock(self, body: bytes) -> bytes:
        request = wire.LockRequest.from_cbor(body)
        with board_refusals():
            digest = self._digest()
            if self.board.is_locked():
                if digest != request.digest:
                    raise refusal(wire.ProvisioningRc.LOCKED, "the board is already locked over other data")
                return wire.LockResponse(request.digest).to_cbor()
            if digest is None:
                raise refusal(wire.ProvisioningRc.NOT_READY, "lock needs at least one key and boarding data")
            if digest != request.digest:
                raise refusal(
                    wire.ProvisioningRc.DIGEST_MISMATCH,
                    f"the board holds other data than the station wrote (board digest {digest.hex()[:16]})",
                )
            self.board.lock(lambda slots, boarding: self._check_sealed(slots, boarding, request.digest))
        return wire.LockResponse(digest).to_cbor()

    # --- helpers

    def _digest(self) -> bytes | None:
        """The lock digest over what the board holds now; None while it could not lock."""
        return self._digest_of(self.board.key_slots(), self.board.boarding_data())

    def _digest_of(self, slots: tuple[KeySlot, ...], boarding: BoardingData | None) -> bytes | None:
        if boarding is None or all(slot.key_hash is None for slot in slots):
            return None
        hashes = wire.BoardingHashes.of(boarding.config, boarding.ca_bundle, boarding.network)
        return wire.lock_digest(self.board.identity.serial_number, [slot.key_hash for slot in slots], hashes)

    def _check_sealed(
        self, slots: tuple[KeySlot, ...], boarding: BoardingData | None, expected: bytes
    ) -> None:
        """Run under the key store's lock: what is sealed must be what the station wrote, even if another
        writer changed the board between the comparison above and the lock."""
        if self._digest_of(slots, boarding) != expected:
            raise refusal(wire.ProvisioningRc.DIGEST_MISMATCH, "the board changed while it was being locked")

    def _commit_boarding(self, request: wire.WriteBoardingRequest) -> wire.BoardingHashes:
        self.board.write_boarding_data(BoardingData(request.config, request.ca, request.network))
        stored = self.board.boarding_data()
        if stored is None:  # only another writer could do this between the two calls
            raise refusal(wire.ProvisioningRc.STORAGE, "the boarding data vanished after it was written")
        return wire.BoardingHashes.of(stored.config, stored.ca_bundle, stored.network)

    def _take_chunk(self, chunk: wire.WriteBoardingChunk) -> wire.WriteBoardingResponse:
        if chunk.off == 0:
            self._start_upload(chunk)
        upload = self._upload
        if upload is None or chunk.off > len(upload.data):
            return wire.WriteBoardingResponse(None, off=0 if upload is None else len(upload.data))
        if chunk.off + len(chunk.data) > upload.total:
            raise wire.ProtocolError(
                f"chunk at {chunk.off} of {len(chunk.data)} bytes runs past len {upload.total}", field="data"
            )
        del upload.data[chunk.off :]  # a resent chunk replaces what followed it
        upload.data += chunk.data
        if len(upload.data) < upload.total:
            return wire.WriteBoardingResponse(None, off=len(upload.data))
        blob = bytes(upload.data)
        if upload.sha256 is not None and hashlib.sha256(blob).digest() != upload.sha256:
            self._upload = None
            raise refusal(wire.ProvisioningRc.UPLOAD_MISMATCH, "the uploaded bytes do not hash to sha")
        # the upload stays staged: resending its last chunk commits again, which changes nothing
        hashes = self._commit_boarding(wire.WriteBoardingRequest.from_cbor(blob))
        return wire.WriteBoardingResponse(hashes, off=len(blob))

    def _start_upload(self, chunk: wire.WriteBoardingChunk) -> None:
        assert chunk.total is not None  # the schema requires len at offset 0
        self._upload = None
        if chunk.total > wire.MAX_BOARDING_SIZE:
            raise refusal(
                wire.ProvisioningRc.UPLOAD_TOO_LARGE,
                f"{chunk.total} bytes announced; at most {wire.MAX_BOARDING_SIZE} are accepted",
            )
        if self.board.is_locked():  # refuse now rather than after the whole upload
            raise BoardLockedError("the board is locked: boarding data cannot be written")
        self._upload = _Upload(chunk.total, chunk.sha256, bytearray())


def _boarding_info(data: BoardingData) -> wire.BoardingInfo:
    hashes = wire.BoardingHashes.of(data.config, data.ca_bundle, data.network)
    try:
        summary = validate_boarding_data(data)
    except BoardError as error:  # stored before today's rules; the hashes still tell what it is
        logger.warning("stored boarding data does not validate: %s", error)
        return wire.BoardingInfo(hashes)
    return wire.BoardingInfo(hashes, summary.client_id, summary.iat_expires_at)


# --- serving ----------------------------------------------------------------------------------------------


def serve(board: Board, port: Port, stop: threading.Event) -> ServerStats:
    """Answer requests on `port` until `stop` is set; a failing port raises `ConsolePortError`."""
    server = SmpServer(ProvisioningService(board).routes())
    while not stop.is_set():
        data = port.read(POLL_INTERVAL)
        if not data:
            continue
        for reply in server.feed(data):
            port.write(reply.wire)
            if reply.after_response is not None:
                reply.after_response()
    return server.stats


def write_timeout_for(baud: int | None) -> float:
    """Long enough for the largest answer at `baud`; a slow line must not look like a dead one."""
    if baud is None:
        return WRITE_TIMEOUT
    return WRITE_TIMEOUT + wire.wire_size(wire.MAX_MESSAGE_SIZE) * 10 / baud


class PtyPort:
    """The board's end (the master) of a pseudo-terminal; the station opens the slave by its path.

    The slave stays open here too: its raw mode then holds between stations, and the master never
    reads EIO while no station is connected."""

    def __init__(self, master: int, slave: int, write_timeout: float = WRITE_TIMEOUT) -> None:
        self.master = master
        self.slave = slave
        self.path = os.ttyname(slave)
        self._write_timeout = write_timeout
        os.set_blocking(master, False)

    @classmethod
    def open(cls, write_timeout: float = WRITE_TIMEOUT) -> PtyPort:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # otherwise the line discipline turns 0x0a into 0x0d 0x0a and echoes
            return cls(master, slave, write_timeout)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, 65536)
        except BlockingIOError:
            return b""
        except OSError as error:
            raise ConsolePortError(f"reading {self.path} failed: {error.strerror}") from error

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.master], [], self._write_timeout)
            if not ready:
                logger.warning("no one reads %s: %d bytes of an answer dropped", self.path, len(view))
                return
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                continue
            except OSError as error:
                raise ConsolePortError(f"writing {self.path} failed: {error.strerror}") from error

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SerialPort:
    """A real serial device, opened exclusively so that two stations (or consoles) never share it."""

    def __init__(self, connection: serial.Serial) -> None:
        self._connection = connection
        self.path = str(connection.port)

    @classmethod
    def open(cls, device: str, baud: int) -> SerialPort:
        try:
            connection = serial.Serial(
                port=device, baudrate=baud, timeout=0, write_timeout=write_timeout_for(baud), exclusive=True
            )
        except (serial.SerialException, ValueError) as error:
            raise ConsolePortError(f"cannot open {device}: {_serial_reason(error)}") from error
        return cls(connection)

    def read(self, timeout: float) -> bytes:
        try:
            self._connection.timeout = timeout
            first = self._connection.read(1)
            if not first:
                return b""
            return bytes(first) + bytes(self._connection.read(self._connection.in_waiting))
        except serial.SerialException as error:
            raise ConsolePortError(f"reading {self.path} failed: {_serial_reason(error)}") from error

    def write(self, data: bytes) -> None:
        try:
            self._connection.write(data)
        except serial.SerialTimeoutException:
            logger.warning("%s did not take an answer within its write timeout; dropped", self.path)
        except serial.SerialException as error:
            raise ConsolePortError(f"writing {self.path} failed: {_serial_reason(error)}") from error

    def close(self) -> None:
        self._connection.close()


def _serial_reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return "it is in use (another program holds it exclusively)"
    text = str(error)
    if "Could not exclusively lock port" in text:
        return "it is in use (another program holds it exclusively)"
    return text


def impaired(port: Port, conditions: LineConditions) -> Port:
    """`port` as is on a perfect line, else behind the simulated damage."""
    if conditions.is_perfect:
        return port
    return ImpairedPort(port, conditions)

"""The station sequence (docs/design.md §5): one serial session per board, checks before every
irreversible step, and one record per attempt whatever happens.

    open (exclusive) -> params, echo -> info
      locked over the expected digest: "already provisioned", nothing written, no IAT consumed
      locked over anything else: refused
    -> boarding configuration: the serial number claimed for this attempt in the records (a second board
       with the same serial on another port or station at the same moment is refused here), the IAT
       valid beyond the margin, the boarding data within the board's size limits (the CA bundle and
       network configuration are checked once, when the `StationConfig` is built), the IAT claimed for
       this serial in the records
    -> write_key (slots in order), write_boarding (chunked) -> info: read-back must match
    -> lock {digest} -> info: locked over that digest -> record, claim released

A stop request (`Station.stop`, set by the CLI on Ctrl-C or SIGTERM) takes effect between steps: the
board's step in hand finishes, the attempt is recorded as stopped and its serial number released. It
is not honoured once `lock` was sent, so a locked board is always confirmed and recorded.

`lock` is sent only after the read-back matched what the station computed, and the board itself refuses
a lock over a digest it does not hold, so a board is never sealed over mismatched data. Every write is
idempotent, so a re-run after any failure (a cut cable, a dead hub) continues where the board is.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from board import protocol as wire
from signing import PublicKey

from .boarding_source import Boarding, BoardingSource
from .errors import (
    BoardingTooLargeError,
    BoardProtocolError,
    FactoryError,
    IatError,
    InputError,
    LockedOverOtherDataError,
    RecordsError,
    SerialAlreadyProvisionedError,
    StoppedError,
    UnexpectedError,
    VerificationError,
)
from .ports import stable_path
from .records import Attempt, Outcome, Records, SerialClaim, timestamp
from .smp_link import DEFAULT_RETRIES, SmpLink

DEFAULT_IAT_MARGIN_S: Final = 24 * 3600.0
# a board takes seconds to provision, and its attempt checks in before every writing step: a claim
# without a check-in for this long was left by a station that stopped
DEFAULT_SERIAL_CLAIM_TIMEOUT_S: Final = 300.0
MAX_UPLOAD_RESTARTS: Final = 3
ECHO_TEXT: Final = "mers-factory"


@dataclass(frozen=True)
class StationConfig:
    """What every board of a run receives, and how the station talks to it."""

    keys: tuple[PublicKey, ...]
    device_ca: bytes
    network: bytes | None = None
    iat_margin: float = DEFAULT_IAT_MARGIN_S
    baud: int = 115200
    station: str = "station"
    retries: int = DEFAULT_RETRIES
    chunk_size: int = wire.RECOMMENDED_CHUNK_SIZE
    serial_claim_timeout: float = DEFAULT_SERIAL_CLAIM_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= wire.KEY_SLOTS:
            raise InputError(f"give between 1 and {wire.KEY_SLOTS} keys", field="key")
        if len({key.key_hash for key in self.keys}) != len(self.keys):
            raise InputError("the same key is given twice", field="key")
        check_fits_a_board(wire.WriteBoardingRequest(b"", self.device_ca, self.network))

    def key_hashes(self) -> list[bytes | None]:
        """The slots as the station means them: its keys in order, the rest empty."""
        hashes: list[bytes | None] = [key.key_hash for key in self.keys]
        return hashes + [None] * (wire.KEY_SLOTS - len(hashes))


@dataclass(frozen=True)
class Event:
    """One step of one board, for progress lines and ``--json``."""

    port: str
    step: str
    status: str  # "ok", "skipped", "failed", or the outcome for step "done"
    serial: str | None = None
    detail: str = ""
    wire_bytes: int = 0  # bytes both ways on this board's line so far


@dataclass(frozen=True)
class Result:
    port: str
    serial: str | None
    outcome: Outcome
    error: FactoryError | None
    seconds: float
    bytes_on_wire: int = 0


@dataclass
class _Progress:
    """What one attempt has learnt so far: it becomes the record."""

    port: str
    started: float
    serial: str | None = None
    boarding: Boarding | None = None
    hashes: wire.BoardingHashes | None = None
    digest: bytes | None = None
    outcome: Outcome = Outcome.FAILED
    error: FactoryError | None = None
    link: SmpLink | None = None
    claim: SerialClaim | None = None
    step: str = ""
    sealing: bool = False

    @property
    def wire_bytes(self) -> int:
        return 0 if self.link is None else self.link.stats.bytes_sent + self.link.stats.bytes_received


EventSink = Callable[[Event], None]


@dataclass
class Station:
    config: StationConfig
    source: BoardingSource
    records: Records
    on_event: EventSink = field(default=lambda event: None)
    clock: Callable[[], float] = time.time
    stop: threading.Event = field(default_factory=threading.Event)
    """Set to stop every board of the run before its next step (see the module's docstring)."""
    _sealing: int = field(default=0, init=False, repr=False)
    _sealing_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def sealing(self) -> bool:
        """A board is between sending `lock` and the end of its attempt (confirmed, marked provisioned,
        recorded). An interruption there would leave a locked board that the records do not know, so an
        "at once" interruption must wait for this to be False."""
        return self._sealing > 0

    def _count_sealing(self, change: int) -> None:
        with self._sealing_lock:
            self._sealing += change

    def provision_all(self, ports: Sequence[str]) -> list[Result]:
        """Each port concurrently, one board per port; results in the order of `ports`."""
        if len(set(ports)) != len(ports):
            raise InputError("a port is given twice", field="port")
        if len(ports) == 1:
            return [self.provision(ports[0])]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(ports)) as pool:
            return list(pool.map(self.provision, ports))

    def provision(self, port: str) -> Result:
        """Provision the board on `port`; never raises a `FactoryError` (it is in the result and record)."""
        progress = _Progress(stable_path(port), self.clock())
        try:
            try:
                with self._step(progress, "open"):
                    link = progress.link = SmpLink.open(port, self.config.baud, self.config.retries)
                try:
                    self._sequence(link, progress)
                finally:
                    link.close()  # released before the record is written: the next board may go on
            except FactoryError as error:
                progress.error = error
                progress.outcome = Outcome.FAILED
            except BaseException as error:  # one record per attempt, even for what no check foresaw
                if isinstance(error, KeyboardInterrupt):  # a stop that did not wait for the step to end
                    progress.error = StoppedError(f"interrupted during {progress.step or 'open'}")
                else:
                    progress.error = UnexpectedError(
                        f"{progress.step or 'open'}: {type(error).__name__}: {error}", field="unexpected"
                    )
                progress.outcome = Outcome.FAILED
                self._record(progress)
                raise
            self._record(progress)
        finally:
            self._release_claim(progress)  # after an interruption (Ctrl-C) too: a re-run goes on at once
            if progress.sealing:
                progress.sealing = False
                self._count_sealing(-1)
        self._emit(progress, "done", progress.outcome.value, _describe(progress.error))
        return Result(
            progress.port,
            progress.serial,
            progress.outcome,
            progress.error,
            self.clock() - progress.started,
            progress.wire_bytes,
        )

    # --- the sequence

    def _sequence(self, link: SmpLink, progress: _Progress) -> None:
        with self._step(progress, "params"):
            wire.McumgrParameters.from_cbor(
                _call(link, wire.MCUMGR_PARAMETERS, wire.EmptyRequest().to_cbor())
            )
        with self._step(progress, "echo"):
            echo = wire.EchoResponse.from_cbor(_call(link, wire.ECHO, wire.EchoRequest(ECHO_TEXT).to_cbor()))
            if echo.text != ECHO_TEXT:
                raise BoardProtocolError(f"the board echoed {echo.text!r}", field="echo")
        with self._step(progress, "info"):
            info = _info(link)
            progress.serial = info.serial_number
        if info.locked:
            self._check_already_provisioned(info, progress)
            return
        with self._step(progress, "boarding"):
            boarding = self._obtain_boarding(info.serial_number, progress)
        request = wire.WriteBoardingRequest(boarding.config, self.config.device_ca, self.config.network)
        progress.hashes = request.hashes()
        progress.digest = wire.lock_digest(info.serial_number, self.config.key_hashes(), progress.hashes)
        self._write_keys(link, info, progress)
        self._write_boarding(link, info, request, progress)
        with self._step(progress, "verify"):
            self._check_readback(_info(link), progress.digest, request, len(self.config.keys))
        with self._step(progress, "lock"):
            self._check_in(progress)
            # counted first: once counted, the CLI's "at once" interruption waits, so the flag gets set
            self._count_sealing(+1)
            progress.sealing = True  # until the attempt's end (`provision`): see `sealing`
            locked = wire.LockResponse.from_cbor(
                _call(link, wire.LOCK, wire.LockRequest(progress.digest).to_cbor())
            )
            if not locked.locked or locked.digest != progress.digest:
                raise VerificationError("the board's answer to lock does not confirm the digest")
        with self._step(progress, "confirm", stoppable=False):  # locked: confirmed and recorded whatever
            final = _info(link)
            if not final.locked or final.digest != progress.digest:
                raise VerificationError("after lock, info does not show the board locked over the digest")
            self.records.mark_provisioned(info.serial_number, progress.digest.hex(), boarding.iat_jti)
        progress.outcome = Outcome.PROVISIONED

    def _check_already_provisioned(self, info: wire.InfoResponse, progress: _Progress) -> None:
        """A locked board: fine if sealed over exactly what this station would write; nothing is
        written and no fresh IAT is asked for (the current configuration is read, not renewed)."""
        with self._step(progress, "already_provisioned"):
            boarding = self.source.current(info.serial_number)
            if boarding is None:
                raise LockedOverOtherDataError(
                    f"{info.serial_number} is locked, and no configuration is known"
                )
            progress.boarding = boarding
            request = wire.WriteBoardingRequest(boarding.config, self.config.device_ca, self.config.network)
            progress.hashes = request.hashes()
            expected = wire.lock_digest(info.serial_number, self.config.key_hashes(), progress.hashes)
            if info.digest != expected:
                raise LockedOverOtherDataError(
                    f"{info.serial_number} is locked over other data than expected"
                )
            progress.digest = expected
            self.records.mark_provisioned(info.serial_number, expected.hex(), boarding.iat_jti)
        progress.outcome = Outcome.ALREADY_PROVISIONED

    def _obtain_boarding(self, serial_number: str, progress: _Progress) -> Boarding:
        progress.claim = SerialClaim(
            serial_number,
            uuid.uuid4().hex,
            self.config.station,
            progress.port,
            self.config.serial_claim_timeout,
        )
        self.records.claim_serial(progress.claim)
        if self.records.provisioned_digest(serial_number) is not None:
            raise SerialAlreadyProvisionedError(
                f"a board with serial {serial_number} was already provisioned and locked; this one is not"
            )
        try:
            boarding = self.source.fresh(serial_number, self.clock() + self.config.iat_margin)
        except IatError as error:
            if isinstance(error.facts, Boarding):
                progress.boarding = error.facts  # the record names the refused IAT
            raise
        progress.boarding = boarding
        check_fits_a_board(
            wire.WriteBoardingRequest(boarding.config, self.config.device_ca, self.config.network)
        )
        self.records.claim_iat(boarding.iat_jti, serial_number)
        return boarding

    def _write_keys(self, link: SmpLink, info: wire.InfoResponse, progress: _Progress) -> None:
        with self._step(progress, "write_key"):
            self._check_in(progress)
            for slot, key in enumerate(self.config.keys):
                if info.slots[slot].key_hash == key.key_hash:
                    if info.slots[slot].state is not wire.SlotState.WRITTEN:
                        raise VerificationError(
                            f"slot {slot} holds this station's key revoked: the board cannot trust it",
                            field="write_key",
                        )
                    continue  # written by an earlier attempt
                request = wire.WriteKeyRequest.for_key(slot, key.der)
                answer = wire.WriteKeyResponse.from_cbor(_call(link, wire.WRITE_KEY, request.to_cbor()))
                if answer.key_hash != key.key_hash:
                    raise VerificationError(f"slot {slot} reports another key hash than the key written")

    def _write_boarding(
        self, link: SmpLink, info: wire.InfoResponse, request: wire.WriteBoardingRequest, progress: _Progress
    ) -> None:
        with self._step(progress, "write_boarding"):
            self._check_in(progress)
            if info.boarding is not None and info.boarding.hashes == progress.hashes:
                return  # written by an earlier attempt
            hashes = _upload(link, request, self.config.chunk_size)
            if hashes != progress.hashes:
                raise VerificationError("the board stored boarding data with other hashes than sent")

    @staticmethod
    def _check_readback(
        info: wire.InfoResponse, digest: bytes, request: wire.WriteBoardingRequest, key_count: int
    ) -> None:
        if info.locked:
            raise VerificationError("the board locked before the station asked it to")
        if info.boarding is None or info.boarding.hashes != request.hashes():
            raise VerificationError("the boarding data read back differs from what was written")
        if info.digest != digest:
            raise VerificationError("the key slots read back differ from what was written")
        # the digest covers the keys' hashes, not their state: a revoked key would pass it
        if any(slot.state is not wire.SlotState.WRITTEN for slot in info.slots[:key_count]):
            raise VerificationError("a key slot read back is not in use (revoked)")

    # --- the serial number's claim

    def _check_in(self, progress: _Progress) -> None:
        """Before each writing step: this attempt still holds its serial number (`Records.check_in`)."""
        if progress.claim is None:
            raise RuntimeError("a board is written only under its serial number's claim")
        self.records.check_in(progress.claim)

    def _release_claim(self, progress: _Progress) -> None:
        """Let the serial number go once the attempt ended (recorded, or interrupted). If the records cannot
        be reached, the claim stays until it expires: a later attempt on this serial waits, nothing is
        lost."""
        if progress.claim is not None:
            with contextlib.suppress(RecordsError):
                self.records.release_serial(progress.claim)

    # --- events and records

    @contextlib.contextmanager
    def _step(self, progress: _Progress, step: str, *, stoppable: bool = True) -> Iterator[None]:
        progress.step = step
        try:
            try:
                if stoppable and self.stop.is_set():
                    raise StoppedError(f"the station was stopped before {step}")
                yield
            except wire.ProtocolError as error:  # an answer that does not follow the schema
                raise BoardProtocolError(f"{step}: {error}", field=step) from None
        except FactoryError as error:
            self._emit(progress, step, "failed", _describe(error))
            raise
        self._emit(progress, step, "ok")

    def _emit(self, progress: _Progress, step: str, status: str, detail: str = "") -> None:
        self.on_event(Event(progress.port, step, status, progress.serial, detail, progress.wire_bytes))

    def _record(self, progress: _Progress) -> None:
        boarding, hashes = progress.boarding, progress.hashes
        attempt = Attempt(
            serial_number=progress.serial or "",
            agent_id=None if boarding is None else boarding.agent_id,
            key_hashes=",".join(key.key_hash.hex() for key in self.config.keys),
            boarding_sha256=None if hashes is None else hashes.config_sha256.hex(),
            ca_sha256=None if hashes is None else hashes.ca_sha256.hex(),
            network_sha256=None
            if hashes is None or hashes.network_sha256 is None
            else hashes.network_sha256.hex(),
            lock_digest=None if progress.digest is None else progress.digest.hex(),
            iat_jti=None if boarding is None else boarding.iat_jti,
            iat_expires=None if boarding is None else boarding.iat_expires,
            station=self.config.station,
            port=progress.port,
            started_at=timestamp(progress.started),
            ended_at=timestamp(self.clock()),
            outcome=progress.outcome,
            error=_describe(progress.error),
        )
        try:
            self.records.append(attempt)
        except RecordsError as error:
            # a board without its record is a failure: the line must not ship it unnoticed
            progress.outcome, progress.error = Outcome.FAILED, progress.error or error
            self._emit(progress, "record", "failed", _describe(error))


def check_fits_a_board(request: wire.WriteBoardingRequest) -> None:
    """`BoardingTooLargeError` for boarding data a board would refuse for its size: as each part, or as
    the upload it becomes (its encoded form, the size the board measures). The board refuses it only at
    write_boarding, after the write-once key slots are burned and the IAT claimed; see the error."""
    parts = (
        ("the boarding configuration", "boarding", request.config, wire.MAX_CONFIG_SIZE),
        ("the CA bundle", "device-ca", request.ca, wire.MAX_CA_BUNDLE_SIZE),
        ("the network configuration", "network", request.network or b"", wire.MAX_NETWORK_SIZE),
    )
    for what, name, data, limit in parts:
        if len(data) > limit:
            raise BoardingTooLargeError(
                f"{what} is {len(data)} bytes; a board accepts at most {limit}", len(data), limit, field=name
            )
    size = request.upload_size()
    if size > wire.MAX_BOARDING_SIZE:
        what, name, data, _ = max(parts, key=lambda part: len(part[2]))
        raise BoardingTooLargeError(
            f"{what} ({len(data)} bytes) makes the boarding upload {size} bytes; "
            f"a board accepts at most {wire.MAX_BOARDING_SIZE}",
            size,
            wire.MAX_BOARDING_SIZE,
            field=name,
        )


def _call(link: SmpLink, command: wire.Command, body: bytes, answer_size: int = 128) -> bytes:
    return link.call(command, body, answer_size)


def _info(link: SmpLink) -> wire.InfoResponse:
    try:
        return wire.InfoResponse.from_cbor(_call(link, wire.INFO, wire.EmptyRequest().to_cbor(), 1024))
    except wire.ProtocolError as error:
        raise BoardProtocolError(f"info: {error}") from None


def _upload(link: SmpLink, request: wire.WriteBoardingRequest, chunk_size: int) -> wire.BoardingHashes:
    """A chunked write_boarding, following the offset the board asks for (0 after a console restart)."""
    chunks = {chunk.off: chunk for chunk in request.chunks(chunk_size)}
    offset, restarts = 0, 0
    while True:
        chunk = chunks.get(offset)
        if chunk is None:
            raise BoardProtocolError(f"write_boarding: the board asks for offset {offset}")
        answer = wire.WriteBoardingResponse.from_cbor(_call(link, wire.WRITE_BOARDING, chunk.to_cbor()))
        if answer.hashes is not None:
            return answer.hashes
        expected = chunk.off + len(chunk.data)
        if answer.off != expected:
            restarts += 1
            if restarts > MAX_UPLOAD_RESTARTS:
                raise BoardProtocolError("write_boarding: the board keeps losing the upload")
        offset = expected if answer.off is None else answer.off


def _describe(error: FactoryError | None) -> str:
    if error is None:
        return ""
    return f"[{error.field}] {error}" if error.field else str(error)

"""The installer (docs/design.md §8): from an installation task, a signed URL or a file, to an inactive slot
holding a fully verified image, a boot environment that tries it, and a reboot.

Every step is journalled (`mers.journal`) before the next begins, and each step can be done again after a
crash: a restart with the same source continues where the journal stands. The rules that keep the board
bootable:

- nothing is written before the header and trailer passed every early check (`mers.image_check`);
- only the inactive slot is ever opened for writing, and only through the board, which refuses the slot
  that runs, boots next or is the fallback of a trial;
- the download resumes from the journalled offset after hashing the slot's prefix again, so the digest is
  always of what the slot really holds;
- the slot record and the boot environment are written only after the full hash and signature check,
  the environment in ONE write (`boot_slot`, `upgrade_available=1`, `bootcount=0`, and `bootlimit` when
  U-Boot would read no usable one there: without it U-Boot never rolls a failed trial back).

`InstallStep` names the points a hook sees; the power-cut tests SIGKILL the process there.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from board.errors import StorageError as BoardStorageError
from board.interface import (
    DEFAULT_BOOTLIMIT,
    ENV_BOOT_SLOT,
    ENV_BOOTCOUNT,
    ENV_BOOTLIMIT,
    ENV_UPGRADE_AVAILABLE,
    Board,
    SlotName,
    SlotRecord,
    uboot_number,
)
from board.slots import writable_slot
from signing import ImageHead, ImageVerifier, SigningError, Trust

from .boarding import current_boarding, parse_network
from .client import DeviceClient
from .credentials import load_credentials
from .download import BlobFetcher, DownloadSettings, DownloadStats, check_image_url, redacted
from .errors import (
    HubUnreachableError,
    ImageChangedError,
    ImageRejectedError,
    InputError,
    InstallBusyError,
    MersError,
    NoBoardingDataError,
    SlotStorageError,
    StorageError,
    TaskClosedError,
)
from .image_check import board_trust, read_image_head, stored_image_head
from .journal import Journal, Phase, SourceKind, journal_owner, load_journal, save_journal
from .tasks import CLOSED_STATES, Artifact, InstallationTask, TaskClient, TaskState

_REHASH_CHUNK = 1 << 20
#: the trial boots armed with a new slot when the environment has no positive `bootlimit`: U-Boot reads a
#: missing, zero or non-numeric `bootlimit` as "no limit", and would boot a failing trial for ever
TRIAL_BOOTLIMIT = DEFAULT_BOOTLIMIT
log = logging.getLogger("mers.install")


class InstallStep(enum.StrEnum):
    """Points of an install a hook sees, in order (CHECKPOINT repeats)."""

    CHECKED = "checked"  # header and trailer passed the early checks; nothing written
    STARTED = "started"  # journal DOWNLOADING at offset 0 (or resumed)
    CHECKPOINT = "checkpoint"  # a further durable offset is journalled
    DOWNLOADED = "downloaded"  # the whole payload is durable in the slot
    VERIFIED = "verified"  # journal VERIFIED
    RECORDED = "recorded"  # the slot record is written; the environment not yet
    SWITCHED = "switched"  # the environment is flipped; the journal not yet
    REBOOTING = "rebooting"  # journal REBOOTING; the reboot not yet requested


Hook = Callable[[InstallStep], None]
#: bytes of the payload in the slot, and the payload's size
Progress = Callable[[int, int], None]


class InstallOutcome(enum.StrEnum):
    REBOOTING = "rebooting"  # the new slot is armed and the reboot requested
    AWAITING_CONFIRM = "awaiting-confirm"  # the new slot runs: `mers confirm` decides
    STOPPED = "stopped"  # asked to stop (SIGTERM) with the journal at a durable offset


@dataclass(frozen=True)
class InstallResult:
    outcome: InstallOutcome
    journal: Journal
    stats: DownloadStats = field(default_factory=DownloadStats)


@dataclass(frozen=True)
class InstallSettings:
    download: DownloadSettings = field(default_factory=DownloadSettings)
    checkpoint_bytes: int = 32 << 20  # fsync and journal at least this often...
    checkpoint_seconds: float = 1.0  # ...or this often, whichever comes first
    report_seconds: float = 1.0  # DOWNLOADING progress to the hub at most this often


class _Source(Protocol):
    """Where the image bytes come from: a signed URL or a file."""

    size: int
    etag: str
    stats: DownloadStats

    def read(self, start: int, stop: int) -> bytes: ...

    def stream(self, start: int, stop: int) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class Installer:
    """Installs one image at a time on `board`; `client` is needed for tasks and signed URLs."""

    def __init__(
        self,
        board: Board,
        client: DeviceClient | None = None,
        *,
        settings: InstallSettings | None = None,
        hook: Hook | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.board = board
        self.client = client
        self.settings = settings or InstallSettings()
        self._hook = hook
        self._progress = progress
        self._should_stop = should_stop or (lambda: False)

    # --- entry points ---------------------------------------------------------------------------------

    def install_task(self, task_id: str) -> InstallResult:
        return self._install(Journal(source=SourceKind.TASK, task_id=task_id))

    def install_url(self, url: str) -> InstallResult:
        check_image_url(url)  # the operator's typo is exit 2 at once, not a retried network error
        return self._install(Journal(source=SourceKind.URL, location=url))

    def install_file(self, path: Path) -> InstallResult:
        return self._install(Journal(source=SourceKind.FILE, location=str(path.absolute())))

    def resume(self) -> InstallResult | None:
        """Continue the journalled install, if one is under way (the daemon calls this at start)."""
        with journal_owner(self.board.state):
            journal = load_journal(self.board.state)
            return self._continue(journal) if journal.busy else None

    # --- the steps ------------------------------------------------------------------------------------

    def _install(self, wanted: Journal) -> InstallResult:
        with journal_owner(self.board.state):
            return self._install_owned(wanted)

    def _install_owned(self, wanted: Journal) -> InstallResult:
        journal = load_journal(self.board.state)
        if (
            journal.source is SourceKind.URL is wanted.source
            and journal.phase is Phase.DOWNLOADING
            and journal.location != wanted.location
        ):
            # a new URL for an interrupted download (the old one expired): the ETag check decides
            journal = replace(journal, location=wanted.location)
            self._refuse_another_image(journal)
        if journal.busy:
            if (journal.source, journal.task_id, journal.location) != (
                wanted.source,
                wanted.task_id,
                wanted.location,
            ):
                raise InstallBusyError(
                    f"another install is in progress ({journal.phase}, {describe_install(journal)}): "
                    "let it finish (mers run / mers install with the same source), confirm it, or end "
                    "it with `mers abandon`"
                )
            return self._continue(journal)
        with self._ended_on_refusal(wanted):
            return self._start(wanted)

    def _refuse_another_image(self, journal: Journal) -> None:
        """A new URL that names another image (another ETag or size) is another install, refused while
        this one is under way: taken as "the image changed", it would fail the download in progress and
        end its journal, because the operator pasted the wrong URL."""
        source = self._open(journal)
        try:
            if (source.etag, source.size) != (journal.etag, journal.image_size):
                raise InstallBusyError(
                    f"another install is in progress ({journal.phase}, of {journal.version}), and this URL "
                    "names another image: give the URL of that image to resume it, or end it with "
                    "`mers abandon`"
                )
        finally:
            source.close()

    def _start(self, wanted: Journal) -> InstallResult:
        active = self.board.active_slot()
        target = writable_slot(active, self.board.boot_env.read())
        trust = board_trust(self.board, self.board.slot(target).size)
        source = self._open(wanted)
        try:
            head = read_image_head(source.read, source.size, trust)
            self._step(InstallStep.CHECKED)
            journal = wanted.advanced(
                Phase.DOWNLOADING,
                etag=source.etag,
                image_size=source.size,
                slot=target,
                previous_slot=active,
                offset=0,
                header_and_tlvs=head.record_bytes,
                version=str(head.version),
                security_counter=head.security_counter,
                message="",
            )
            self._report(
                journal, TaskState.DOWNLOADING, progress=0.0, message=f"downloading {journal.version}"
            )
            save_journal(self.board.state, journal)
            return self._download_and_activate(journal, head, trust, source)
        finally:
            source.close()

    def _continue(self, journal: Journal) -> InstallResult:
        """Pick up where the journal stands (after a crash, a SIGTERM or a reboot)."""
        if journal.phase is Phase.DOWNLOADING:
            with self._ended_on_refusal(journal):
                return self._resume_download(journal)
        if journal.phase is Phase.VERIFIED and self.board.active_slot() == journal.previous_slot:
            # VERIFIED is journalled only before the switch (SWITCHED is saved before the env write),
            # so the environment still boots the old slot: activating again is safe, once the slot is
            # checked again (it lay unguarded while the device was down)
            with self._ended_on_refusal(journal):
                self._verify_slot(journal)
                return self._activate(journal)
        if self._reboot_pending(journal):
            return self._reboot(journal.advanced(Phase.REBOOTING))
        return InstallResult(InstallOutcome.AWAITING_CONFIRM, journal)

    def _resume_download(self, journal: Journal) -> InstallResult:
        if journal.slot is None or self.board.active_slot() != journal.previous_slot:
            raise ImageChangedError("the board no longer runs the slot the install started from")
        trust = board_trust(self.board, self.board.slot(journal.slot).size)
        head = stored_image_head(journal.header_and_tlvs, journal.image_size, trust)
        source = self._open(journal)
        try:
            if (source.etag, source.size) != (journal.etag, journal.image_size):
                raise ImageChangedError(
                    f"the image is not the one the install started with (ETag or size differ: "
                    f"{source.size} bytes now, {journal.image_size} then)"
                )
            return self._download_and_activate(journal, head, trust, source)
        finally:
            source.close()

    def _download_and_activate(
        self, journal: Journal, head: ImageHead, trust: Trust, source: _Source
    ) -> InstallResult:
        self._step(InstallStep.STARTED)
        with _rejected():
            verifier = ImageVerifier(head, trust)
        journal, stopped = self._download(journal, verifier, source)
        if stopped:
            return InstallResult(InstallOutcome.STOPPED, journal, source.stats)
        self._step(InstallStep.DOWNLOADED)
        with _rejected():
            verifier.finish()
        journal = journal.advanced(Phase.VERIFIED)
        save_journal(self.board.state, journal)
        self._step(InstallStep.VERIFIED)
        self._report(journal, TaskState.DOWNLOADED, progress=1.0, message=f"{journal.version} verified")
        result = self._activate(journal)
        return InstallResult(result.outcome, result.journal, source.stats)

    def _verify_slot(self, journal: Journal) -> None:
        """Hash the whole payload the slot holds and check the signature again, as after a download."""
        assert journal.slot is not None
        trust = board_trust(self.board, self.board.slot(journal.slot).size)
        head = stored_image_head(journal.header_and_tlvs, journal.image_size, trust)
        with _rejected(f"slot {journal.slot} no longer holds the verified image: "):
            verifier = ImageVerifier(head, trust)
            with self.board.slot(journal.slot).open_for_reading() as slot:
                _rehash_prefix(slot.fileno(), head.payload_size, verifier, journal.slot)
            verifier.finish()

    def _download(self, journal: Journal, verifier: ImageVerifier, source: _Source) -> tuple[Journal, bool]:
        """Stream the payload into the slot from the journalled offset, into `verifier` as the slot holds
        it (the prefix already there read back first); True when asked to stop."""
        head = verifier.head
        size = head.payload_size
        with self._open_slot(journal) as slot:
            fd = slot.fileno()
            _check_free_space(fd, size, journal.slot)
            offset = _rehash_prefix(fd, journal.offset, verifier, journal.slot)
            slot.seek(offset)
            self._show(offset, size)
            stream = source.stream(head.hdr_size + offset, head.hdr_size + size)
            writer = _SlotWriter(slot, verifier, journal.slot)
            with _rejected():
                return self._pump(stream, writer, journal, offset, size)

    def _pump(
        self, stream: Iterator[bytes], writer: _SlotWriter, journal: Journal, offset: int, size: int
    ) -> tuple[Journal, bool]:
        """Hand the chunks to the writer, checkpointing as the settings say; True when asked to stop."""
        last_sync = last_report = time.monotonic()
        synced = offset
        for chunk in stream:
            writer.put(chunk)
            offset += len(chunk)
            self._show(offset, size)
            now = time.monotonic()
            stop = self._should_stop()
            if (
                offset - synced >= self.settings.checkpoint_bytes
                or now - last_sync >= self.settings.checkpoint_seconds
                or stop
            ):
                journal = self._checkpoint(writer, journal, offset)
                synced, last_sync = offset, now
                if now - last_report >= self.settings.report_seconds:
                    self._report_progress(journal, offset / size if size else 1.0)
                    last_report = now
                if stop:
                    stream.close()  # type: ignore[attr-defined]
                    return journal, True
        if offset != size:
            raise StorageError(f"the payload stream ended at {offset} of {size} bytes")
        return self._checkpoint(writer, journal, offset), False

    def _checkpoint(self, writer: _SlotWriter, journal: Journal, offset: int) -> Journal:
        """Data first, then the journal: the journalled offset never runs ahead of durable bytes."""
        writer.sync()
        journal = journal.advanced(Phase.DOWNLOADING, offset=offset)
        save_journal(self.board.state, journal)
        self._step(InstallStep.CHECKPOINT)
        return journal

    def _open_slot(self, journal: Journal) -> BinaryIO:
        """The inactive slot, through the board (the only way), refused if it is no longer the slot the
        journal started writing."""
        target = writable_slot(self.board.active_slot(), self.board.boot_env.read())
        if target != journal.slot:
            raise ImageChangedError(f"slot {journal.slot} is no longer the inactive slot ({target} is)")
        return self.board.open_inactive_slot_for_writing()

    def _activate(self, journal: Journal) -> InstallResult:
        """Record the verified image beside its slot, then flip the environment in one write."""
        assert journal.slot is not None
        record_slot = journal.slot
        self._report(
            journal, TaskState.INSTALLING, message=f"activating {journal.version} in slot {journal.slot}"
        )
        record = SlotRecord(journal.header_and_tlvs, _payload_size(journal), journal.version)
        self.board.write_slot_record(journal.slot, record)
        self._step(InstallStep.RECORDED)
        # SWITCHED is journalled BEFORE the env write: a power cut between the two then reads as "switched,
        # and the board is back on the old slot", which `confirm` reports as FAILED. The other order would
        # leave VERIFIED behind a written env, and after a rollback of a bad image a restart would arm it
        # again, for ever.
        journal = journal.advanced(Phase.SWITCHED)
        save_journal(self.board.state, journal)
        self.board.boot_env.write(trial_env_changes(self.board.boot_env.read(), record_slot))
        self._step(InstallStep.SWITCHED)
        self._report_after_switch(journal, TaskState.INSTALLED, f"{journal.version} in slot {journal.slot}")
        return self._reboot(journal.advanced(Phase.REBOOTING))

    def _reboot(self, journal: Journal) -> InstallResult:
        save_journal(self.board.state, journal)
        self._step(InstallStep.REBOOTING)
        self._report_after_switch(
            journal, TaskState.ACTIVATING, f"rebooting into {journal.version} (trial boot)"
        )
        self.board.reboot()
        return InstallResult(InstallOutcome.REBOOTING, journal)

    def _report_after_switch(self, journal: Journal, state: TaskState, message: str) -> None:
        """Once the environment is flipped the board must reboot, whatever the hub says: a report that
        cannot be made now is made by `confirm`, which advances the task through the states it missed."""
        try:
            self._report(journal, state, message=message)
        except MersError as exc:
            log.warning("not reported as %s (the reboot goes on): %s", state, exc)

    def _reboot_pending(self, journal: Journal) -> bool:
        """The environment tries the new slot but the board still runs the old one: the reboot was
        requested (or about to be) when the process stopped."""
        if journal.phase not in (Phase.VERIFIED, Phase.SWITCHED, Phase.REBOOTING):
            return False
        env = self.board.boot_env.read()
        return (
            self.board.active_slot() == journal.previous_slot
            and env.get(ENV_BOOT_SLOT) == journal.slot
            and env.get(ENV_UPGRADE_AVAILABLE) == "1"
        )

    # --- sources, reports -----------------------------------------------------------------------------

    def _open(self, journal: Journal) -> _Source:
        if journal.source is SourceKind.FILE:
            return _FileSource(Path(journal.location))
        ca_file, proxy = self._hub_trust()
        settings = self.settings.download
        if journal.source is SourceKind.URL:
            fetcher = BlobFetcher(journal.location, ca_file, settings=settings, proxy_url=proxy)
            return _HttpSource(fetcher, expected_sha256=None, expected_size=None)
        tasks = TaskClient(self._require_client())
        task = tasks.task(journal.task_id)
        if task.state in CLOSED_STATES:
            raise TaskClosedError(f"installation task {task.id} is {task.state}")
        if len(task.artifacts) != 1:
            raise InputError(f"task {task.id} has {len(task.artifacts)} artifacts; one image is expected")
        artifact = task.artifacts[0]

        def refresh() -> str:
            return refreshed_uri(tasks.task(journal.task_id), artifact)

        fetcher = BlobFetcher(artifact.uri, ca_file, settings=settings, refresh=refresh, proxy_url=proxy)
        return _HttpSource(fetcher, expected_sha256=artifact.sha256, expected_size=artifact.size)

    def _hub_trust(self) -> tuple[Path, str | None]:
        """The CA file the hub's URLs are checked against (the boarding CA) and the boarding proxy."""
        stored = load_credentials(self.board.state)
        if stored is not None:
            data = stored.boarding
        else:
            boarding = current_boarding(self.board)
            if boarding is None:
                raise NoBoardingDataError(
                    "no boarding data: the hub's CA is unknown, so no URL can be trusted"
                )
            data = boarding.data
        name = f"ca-{hashlib.sha256(data.ca_bundle).hexdigest()[:16]}.pem"
        if self.board.state.read(name) != data.ca_bundle:
            self.board.state.write(name, data.ca_bundle)
        proxy = None if data.network is None else parse_network(data.network).proxy_url
        return self.board.state.directory / name, proxy

    def _require_client(self) -> DeviceClient:
        if self.client is None:
            raise InputError("installing a task needs the device client (onboarded device)")
        return self.client

    def _report(
        self, journal: Journal, state: TaskState, *, progress: float | None = None, message: str | None = None
    ) -> None:
        if journal.source is SourceKind.TASK:
            TaskClient(self._require_client()).advance(
                journal.task_id, state, progress=progress, message=message
            )

    def _report_progress(self, journal: Journal, progress: float) -> None:
        """Progress is news, not state: a hub that cannot take it now does not stop the download (the
        image may come from elsewhere than the hub's API, and the next report catches up)."""
        try:
            self._report(journal, TaskState.DOWNLOADING, progress=progress)
        except HubUnreachableError as exc:
            log.warning("progress not reported: %s", exc)

    @contextlib.contextmanager
    def _ended_on_refusal(self, journal: Journal) -> Iterator[None]:
        """Before the switch, a refused image fails the install (reported, journal ended) and a task the
        operator closed is abandoned: either way the next install can start. Everything else propagates
        with the journal kept, to be resumed."""
        try:
            yield
        except (ImageRejectedError, ImageChangedError) as exc:
            self._fail(journal, str(exc))
            raise
        except TaskClosedError as exc:
            self._abandon(str(exc))
            raise

    def _fail(self, journal: Journal, reason: str) -> None:
        """Report the failure and end the journal, so the next task can start. The journal ends even when
        the report cannot be sent: the task then stays open, and the next poll refuses it again."""
        try:
            if journal.source is SourceKind.TASK:
                TaskClient(self._require_client()).advance(journal.task_id, TaskState.FAILED, message=reason)
        finally:
            save_journal(self.board.state, journal.finished(f"FAILED: {reason}"))

    def _abandon(self, reason: str) -> None:
        """The operator closed the task (cancelled it) before the switch: end the journal, so the daemon
        moves on; the inactive slot is never booted (the environment was not flipped: that comes after
        SWITCHED is journalled)."""
        journal = load_journal(self.board.state)
        if journal.phase in (Phase.IDLE, Phase.DOWNLOADING, Phase.VERIFIED):
            save_journal(self.board.state, journal.finished(f"abandoned: {reason}"))

    def _step(self, step: InstallStep) -> None:
        if self._hook is not None:
            self._hook(step)

    def _show(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)


def refreshed_uri(task: InstallationTask, artifact: Artifact) -> str:
    """The new signed URL of `artifact` from `task` fetched again after a 403. The task may have changed
    while the URL was in use: a task the operator closed meanwhile ends the install (`TaskClosedError`,
    the journal abandoned), and a task that no longer names exactly this image (other checksum or size, or
    no artifact at all) is `ImageChangedError`, never bytes of two images spliced into one slot."""
    if task.state in CLOSED_STATES:
        raise TaskClosedError(f"installation task {task.id} is {task.state}")
    if len(task.artifacts) != 1:
        raise ImageChangedError(
            f"task {task.id} now has {len(task.artifacts)} artifacts instead of the image being downloaded"
        )
    fresh = task.artifacts[0]
    if (fresh.sha256, fresh.size) != (artifact.sha256, artifact.size):
        raise ImageChangedError(f"task {task.id} now names another image")
    return fresh.uri


_ULONG32_MAX = 0xFFFFFFFF


def trial_env_changes(env: Mapping[str, str], slot: SlotName) -> dict[str, str]:
    """The ONE environment write that arms a trial of `slot`. It sets `bootlimit` too when U-Boot would
    read none (`uboot_number` is 0: missing, 0, or no digits): U-Boot then never counts a trial out, so a
    new slot that fails its health check would be booted for ever instead of rolled back. A limit U-Boot
    honours (``3``, ``0x5``) is the integrator's choice and stays."""
    changes = {ENV_BOOT_SLOT: slot.value, ENV_UPGRADE_AVAILABLE: "1", ENV_BOOTCOUNT: "0"}
    # past 32 bits the installer cannot tell what U-Boot reads: a 32-bit one wraps (2**32 is 0: no limit;
    # 0x100000005 is 5), a 64-bit one would never count that far; so such a limit is replaced too
    if not 0 < uboot_number(env.get(ENV_BOOTLIMIT)) <= _ULONG32_MAX:
        changes[ENV_BOOTLIMIT] = str(TRIAL_BOOTLIMIT)
    return changes


def _payload_size(journal: Journal) -> int:
    return journal.image_size - len(journal.header_and_tlvs)


def _check_free_space(fd: int, length: int, slot: SlotName | None) -> None:
    """Before the first payload byte is written, check that the slot can hold `length` bytes (docs/design.md
    §8: "check the image against the slot size and free space before downloading"). A partition has its size,
    checked with the image's header; a slot that is a file (a simulated board, a gateway with file-backed
    slots) may be sparse, on a filesystem with less room than the image: that download would fail with ENOSPC
    halfway. So the blocks the file still lacks are compared with the filesystem's free space, and a shortfall
    is one `SlotStorageError` up front (the daemon retries it: space may be freed). Only a check, nothing
    written: `posix_fallocate` would reserve the space, but musl's fails on filesystems without fallocate and
    glibc's emulates it by writing into every block. On a resume only the blocks still missing count."""
    with _slot_io(slot, "measure the free space of"):
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return
        missing = min(length, status.st_size) - status.st_blocks * 512
        if missing <= 0:
            return
        filesystem = os.fstatvfs(fd)
    free = filesystem.f_bavail * filesystem.f_frsize
    if free < missing:
        raise SlotStorageError(
            f"slot {slot} is a file on a filesystem with {free} bytes free, and the image needs {missing} "
            "more: free space there (or give the slot a partition)"
        )


def _rehash_prefix(fd: int, length: int, hasher: ImageVerifier, slot: SlotName | None) -> int:
    """Hash the first `length` bytes the slot already holds (a resumed download), one chunk at a time."""
    offset = 0
    while offset < length:
        with _slot_io(slot, f"read byte {offset} of"):
            chunk = os.pread(fd, min(_REHASH_CHUNK, length - offset), offset)
        if not chunk:
            raise StorageError(f"the slot ends at {offset}, before the journalled offset {length}")
        hasher.update(chunk)
        offset += len(chunk)
    return offset


@contextlib.contextmanager
def _rejected(context: str = "") -> Iterator[None]:
    """A `SigningError` of the image's verification is the image's rejection: `ImageRejectedError`, its
    field kept (the task is reported FAILED with it, and nothing is activated)."""
    try:
        yield
    except SigningError as exc:
        raise ImageRejectedError(f"{context}{exc}", field=exc.field or type(exc).__name__) from exc


def describe_install(journal: Journal) -> str:
    """Where the journal's image comes from, fit for a log or a message (a URL redacted)."""
    if journal.source is SourceKind.TASK:
        return f"task {journal.task_id}"
    if journal.source is SourceKind.URL:
        return f"URL {redacted(journal.location)}"
    return f"file {journal.location}"


@contextlib.contextmanager
def _slot_io(slot: SlotName | None, action: str) -> Iterator[None]:
    """A slot that fails to read, write or sync (worn flash: EIO; a file-size limit: EFBIG) is the
    board's storage failing: one `SlotStorageError` naming the slot, so the CLI exits 4 with one line (an
    operator must look at the device) and the daemon logs that line and retries with its backoff, instead
    of a traceback. The journal is unharmed: it is written only after a sync succeeded, so it still names
    a durable offset, and the next attempt re-hashes the slot from there."""
    try:
        yield
    except OSError as exc:
        raise SlotStorageError(f"cannot {action} slot {slot}: {exc.strerror or exc}") from exc
    except BoardStorageError as exc:
        raise SlotStorageError(str(exc)) from exc


class _SlotWriter:
    """Writes the payload's chunks into the slot and hashes them as written, so the digest is of what
    the slot holds; `sync` makes every chunk so far durable (before the journal may say so)."""

    def __init__(self, slot: BinaryIO, hasher: ImageVerifier, name: SlotName | None) -> None:
        self._slot = slot
        self._hasher = hasher
        self._name = name

    def put(self, chunk: bytes) -> None:
        with _slot_io(self._name, "write"):
            self._slot.write(chunk)
        self._hasher.update(chunk)

    def sync(self) -> None:
        with _slot_io(self._name, "sync"):
            self._slot.flush()
            os.fsync(self._slot.fileno())


class _HttpSource:
    def __init__(
        self, fetcher: BlobFetcher, *, expected_sha256: str | None, expected_size: int | None
    ) -> None:
        self._fetcher = fetcher
        self.stats = fetcher.stats
        try:
            remote = fetcher.probe()
        except BaseException:
            fetcher.close()
            raise
        self.size = remote.size
        self.etag = remote.etag.strip('"')
        if expected_sha256 is not None and self.etag != expected_sha256:
            fetcher.close()
            raise ImageChangedError("the download's ETag is not the task's checksum")
        if expected_size is not None and self.size != expected_size:
            fetcher.close()
            raise ImageChangedError(f"the download has {self.size} bytes, the task says {expected_size}")

    def read(self, start: int, stop: int) -> bytes:
        return self._fetcher.read_range(start, stop)

    def stream(self, start: int, stop: int) -> Iterator[bytes]:
        return self._fetcher.stream(start, stop)

    def close(self) -> None:
        self._fetcher.close()


class _FileSource:
    """A local image (USB stick). Its identity is size and modification time: cheap, and enough to
    notice a stick swapped between a crash and the restart (the hash check catches anything else)."""

    def __init__(self, path: Path) -> None:
        self.stats = DownloadStats()
        self._path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InputError(f"cannot open the image {path}: {exc.strerror}") from exc
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise InputError(f"the image {path} is not a regular file")
        except BaseException:
            os.close(self._fd)
            raise
        self.size = info.st_size
        self.etag = f"file:{info.st_size}:{info.st_mtime_ns}"

    def read(self, start: int, stop: int) -> bytes:
        return self._pread(stop - start, start)

    def stream(self, start: int, stop: int) -> Iterator[bytes]:
        offset = start
        while offset < stop:
            chunk = self._pread(min(1 << 20, stop - offset), offset)
            if not chunk:
                raise InputError(f"the image file ended at byte {offset}, before {stop}")
            offset += len(chunk)
            self.stats.received += len(chunk)
            yield chunk

    def _pread(self, length: int, offset: int) -> bytes:
        """A USB stick pulled or failing mid-read (EIO) is the operator's input failing: an `InputError`
        (exit 2) with the journal kept at its durable offset, to resume or `mers abandon`."""
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise InputError(f"cannot read the image {self._path} at byte {offset}: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)

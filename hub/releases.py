"""Release upload: receive an image, vet it, and keep it once under its SHA-256.

The body is streamed into a temporary file in the blob directory while it is hashed, in bounded chunks,
so an upload of gigabytes costs a few MiB of memory; more than `max_release_size` bytes is refused as it
arrives (the endless-data attack). The finished file is then verified by the signing library against the
hub's release trust keys, the same strict checks a device makes, so the hub never hands a device an image
it would refuse (or one signed by a key the operator did not trust). Only a verified image is linked to
`blobs/<sha256>`; a refused, oversized or interrupted upload, or one whose release the database could not
record, leaves nothing behind. Identical bytes are stored once and answered with the release that already
holds them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from signing import PublicKey, SigningError, Trust, VerifiedImage, verify_image

from .database import Database
from .errors import (
    HubSetupError,
    InsufficientStorageError,
    NotFoundError,
    PayloadTooLargeError,
    ReleaseRejectedError,
)
from .models import Release
from .timefmt import iso
from .tokens import Clock
from .trust import trust_anchors

#: bytes gathered from the request before one write-and-hash in a worker thread
WRITE_CHUNK = 4 << 20
UPLOAD_PREFIX = ".upload-"
LEFTOVER_AGE_S = 3600.0  # an upload's temporary file untouched this long belongs to no live upload
_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ReleaseView:
    id: str
    name: str
    version: str
    security_counter: int
    vendor_uuid: str | None
    class_uuid: str | None
    size: int
    sha256: str
    image_digest: str
    signed_by: tuple[str, ...]
    uploaded_at: float

    @classmethod
    def of(cls, row: Release) -> ReleaseView:
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            security_counter=row.security_counter,
            vendor_uuid=row.vendor_uuid,
            class_uuid=row.class_uuid,
            size=row.size,
            sha256=row.sha256,
            image_digest=row.image_digest,
            signed_by=tuple(json.loads(row.signed_by)),
            uploaded_at=row.uploaded_at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "securityCounter": self.security_counter,
            "vendorUuid": self.vendor_uuid,
            "classUuid": self.class_uuid,
            "size": self.size,
            "sha256": self.sha256,
            "imageDigest": self.image_digest,
            "signedBy": list(self.signed_by),
            "uploadedAt": iso(self.uploaded_at),
        }


@dataclass(frozen=True)
class Upload:
    release: ReleaseView
    #: False when the same bytes had been uploaded before
    created: bool


@dataclass(frozen=True)
class Spooled:
    """A received body, complete, on disk and hashed, but not yet trusted."""

    path: Path
    sha256: str
    size: int


def new_id() -> str:
    """The id of a new release or task: 32 hex digits."""
    return uuid.uuid4().hex


def is_well_formed_id(text: str) -> bool:
    """True for what `new_id` makes; anything else is looked up nowhere (a NUL byte, say, is an error on
    PostgreSQL, and an unknown id must be a 404, never a 5xx)."""
    return _ID.fullmatch(text) is not None


def blob_file(blobs: Path, sha256: str) -> Path:
    """Where the bytes of the release with this SHA-256 live."""
    return blobs / sha256


async def receive_release(
    database: Database,
    blobs: Path,
    name: str,
    body: AsyncIterable[bytes],
    *,
    max_size: int,
    clock: Clock,
) -> Upload:
    """Spool, verify and store the image streamed in `body` as release `name`. Database, disk and
    verification work runs in worker threads: the event loop keeps serving other requests meanwhile."""
    anchors = await anyio.to_thread.run_sync(trust_anchors, database)
    if not anchors:
        # refused before a byte is stored: nothing could ever verify
        raise ReleaseRejectedError("no release trust key is configured: add one (POST /trustedKeys) first")
    spooled = await spool(body, blobs, max_size)
    try:
        return await anyio.to_thread.run_sync(_admit, database, blobs, name, spooled, anchors, clock)
    finally:
        spooled.path.unlink(missing_ok=True)


def _admit(
    database: Database, blobs: Path, name: str, spooled: Spooled, anchors: tuple[PublicKey, ...], clock: Clock
) -> Upload:
    """The release the spooled file becomes: the existing one for known bytes, else a new one if the
    image verifies (its blob put in place first, so a recorded release always has its bytes). Known
    bytes whose blob has gone missing (a restore without the blob directory, a hand's `rm`) put it back:
    they are those very bytes, their SHA-256 says so. A blob this upload put in place whose release could
    not be recorded (the database's disk full, say) is withdrawn: nothing else would ever remove it."""
    target = blob_file(blobs, spooled.sha256)
    existing = find_by_sha256(database, spooled.sha256)
    if existing is not None:
        _store_blob(spooled.path, target)
        return Upload(existing, created=False)
    verified = _verify(spooled.path, anchors)
    placed = _store_blob(spooled.path, target)
    try:
        upload = _record(database, name, spooled, verified, clock())
    except BaseException:
        if placed:
            withdraw_blob(database, target, spooled.sha256)
        raise
    # a failed upload of these bytes may have withdrawn the blob since: recorded, it must be there
    _store_blob(spooled.path, target)
    return upload


async def spool(body: AsyncIterable[bytes], directory: Path, max_size: int) -> Spooled:
    """Write `body` to a new temporary file in `directory` while hashing it; at most `max_size` bytes.
    On any failure (too large, client gone, disk full) the temporary file is removed; a full disk is a
    507, which the uploader can retry once space is freed."""
    try:
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=directory)
    except OSError as exc:
        raise _storage_error(exc) from exc
    path = Path(name)
    hasher = hashlib.sha256()
    size = 0
    pending = bytearray()
    try:
        with os.fdopen(fd, "wb") as output:
            async for chunk in body:
                size += len(chunk)
                if size > max_size:
                    raise PayloadTooLargeError(f"the release exceeds {max_size} bytes")
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    await anyio.to_thread.run_sync(_write_and_hash, output, hasher, pending)
                    pending.clear()
            await anyio.to_thread.run_sync(_write_and_hash, output, hasher, pending)
            await anyio.to_thread.run_sync(_sync, output)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _storage_error(exc) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Spooled(path, hasher.hexdigest(), size)


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorageError("the hub's storage is full: the release was not stored")
    return exc


def check_hard_links(directory: Path) -> None:
    """`HubSetupError` unless `directory` (the blob directory) takes hard links: blobs are linked into
    place (`_store_blob`), and on a filesystem without them (vfat, exFAT, some network shares) every upload
    would be a 500. Said once when the hub starts, with the remedy, rather than at each upload."""
    probe = directory / f"{UPLOAD_PREFIX}link-probe-{new_id()}"
    linked = probe.with_name(f"{probe.name}-linked")
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise HubSetupError(f"cannot write in the blob directory {directory}: {exc.strerror}") from None
    try:
        os.link(probe, linked)
    except OSError as exc:
        raise HubSetupError(
            f"the blob directory {directory} does not take hard links ({exc.strerror}), which storing "
            "releases needs: put the hub directory on a filesystem that does (ext4, XFS, btrfs, tmpfs)"
        ) from None
    finally:
        linked.unlink(missing_ok=True)
        probe.unlink(missing_ok=True)


def sweep_upload_leftovers(directory: Path, now: float, min_age: float = LEFTOVER_AGE_S) -> int:
    """Remove the temporary files of uploads that a crash or a kill cut short (an upload that fails
    cleanly removes its own); how many were removed. Only files untouched for `min_age` seconds: an
    upload in progress writes its file continuously, so a second server sharing the directory, or one
    restarted in a hurry, never loses a live upload."""
    removed = 0
    for path in directory.glob(f"{UPLOAD_PREFIX}*"):
        try:
            if now - path.stat().st_mtime >= min_age:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # finished (renamed into place) or removed meanwhile
    return removed


def _write_and_hash(output: BinaryIO, hasher: hashlib._Hash, data: bytearray) -> None:
    # in a worker thread (hashlib and file writes release the GIL): the event loop serves others meanwhile
    hasher.update(data)
    output.write(data)


def _sync(output: BinaryIO) -> None:
    output.flush()
    os.fsync(output.fileno())


def _verify(path: Path, anchors: tuple[PublicKey, ...]) -> VerifiedImage:
    try:
        return verify_image(path, Trust(keys=anchors))
    except SigningError as exc:
        raise ReleaseRejectedError(str(exc)) from exc


def _store_blob(spooled: Path, target: Path) -> bool:
    """Link the verified file into place, durably; whether this call put it there. Content-addressed: a
    file already at `target` holds these very bytes (a concurrent upload of the same image), so it is kept
    as is. A link, not a rename: only one upload puts the blob in place, and each keeps its spooled copy
    to the end, to put the blob back if a failed upload withdrew it meanwhile (`withdraw_blob`)."""
    try:
        os.link(spooled, target)
    except FileExistsError:
        return False
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def withdraw_blob(database: Database, target: Path, sha256: str) -> None:
    """Remove the blob an upload put in place but could not record a release for, unless a release holds
    these bytes by now (a concurrent upload of the same image recorded its own). Otherwise nothing would
    ever remove it, and it would hold its space on a disk that was perhaps full already.

    The blob is moved aside before the releases are read: an upload that records these bytes after the
    read finds the blob gone and puts it back from its own copy (`_admit`); one that recorded them before
    is seen by the read, and the blob goes back. If the read fails, the blob stays."""
    aside = target.with_name(f"{UPLOAD_PREFIX}withdrawn-{new_id()}")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return  # removed meanwhile: nothing to withdraw
    referenced = True
    try:
        referenced = find_by_sha256(database, sha256) is not None
    finally:
        if referenced:
            _store_blob(aside, target)
        aside.unlink(missing_ok=True)


def _record(database: Database, name: str, spooled: Spooled, verified: VerifiedImage, now: float) -> Upload:
    row = Release(
        id=new_id(),
        sha256=spooled.sha256,
        name=name,
        version=str(verified.version),
        security_counter=verified.security_counter,
        vendor_uuid=str(verified.vendor_uuid) if verified.vendor_uuid else None,
        class_uuid=str(verified.class_uuid) if verified.class_uuid else None,
        size=spooled.size,
        image_digest=verified.digest.hex(),
        signed_by=json.dumps([key_hash.hex() for key_hash in verified.signed_by]),
        uploaded_at=now,
    )
    try:
        with database.transaction() as session:
            session.add(row)
    except IntegrityError:
        # the same bytes, recorded by a concurrent upload after our look-up
        existing = find_by_sha256(database, spooled.sha256)
        if existing is None:
            raise
        return Upload(existing, created=False)
    return Upload(ReleaseView.of(row), created=True)


def find_by_sha256(database: Database, sha256: str) -> ReleaseView | None:
    with database.transaction() as session:
        row = session.scalars(select(Release).where(Release.sha256 == sha256)).first()
        return ReleaseView.of(row) if row is not None else None


def get_release(database: Database, release_id: str) -> ReleaseView:
    if not is_well_formed_id(release_id):
        raise NotFoundError(f"no release {release_id!r}")
    with database.transaction() as session:
        row = session.get(Release, release_id)
        if row is None:
            raise NotFoundError(f"no release {release_id}")
        return ReleaseView.of(row)


def list_releases(database: Database) -> list[ReleaseView]:
    with database.transaction() as session:
        rows = session.scalars(select(Release).order_by(Release.uploaded_at, Release.id))
        return [ReleaseView.of(row) for row in rows]

"""Making images: sign in one pass, or prepare a digest for a key that lives elsewhere and attach its
signature later. The input is streamed once into a temporary output while it is hashed, so signing a
multi-gigabyte filesystem image costs a few MiB of memory, and a failure leaves no partial output."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Self

from .errors import BadSignatureError, HashMismatchError, InputFileError, InvalidArgumentError
from .files import file_size, open_input
from .image_format import (
    CUSTOM_TLV_MAX,
    CUSTOM_TLV_MIN,
    HEADER_SIZE,
    IMAGE_MAGIC,
    MAX_TLV_AREA,
    PROTECTED_TLV_INFO_MAGIC,
    TLV_HEADER_SIZE,
    TLV_INFO_MAGIC,
    TLV_INFO_SIZE,
    ImageHeader,
    ImageVersion,
    SecurityCounterValue,
    Tlv,
    TlvInfo,
    TlvType,
    class_uuid,
    vendor_uuid,
)
from .output import SequentialWriter, atomic_output, fsync_directory, kept_aside

# keys (and so cryptography) are not needed to stream an image: not importing them here lets the CLI load
# them while the payload is already being hashed. Nor is reading an image's layout and manifest, which
# only `attach_signature` does: imported there, they are not on `sign`'s path before hashing starts.
if TYPE_CHECKING:
    from .keys import PublicKey, Signer

_MAX_IMG_SIZE = 0xFFFFFFFF
_MAX_HEADER_SIZE = 0xFFFF
_MAX_TLV_VALUE = 0xFFFF  # a TLV's length is a u16


@dataclass(frozen=True)
class ImageOptions:
    """Everything about a new image except its keys."""

    version: ImageVersion
    security_counter: int | None = None
    vendor: str | None = None
    image_class: str | None = None
    header_size: int = HEADER_SIZE
    custom_tlvs: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not HEADER_SIZE <= self.header_size <= _MAX_HEADER_SIZE:
            raise InvalidArgumentError(
                f"header size {self.header_size} must be between {HEADER_SIZE} and {_MAX_HEADER_SIZE}",
                field="header_size",
            )
        if self.security_counter is not None and not 0 <= self.security_counter <= 0xFFFFFFFF:
            raise InvalidArgumentError("security counter must fit in 32 bits", field="security_counter")
        if self.image_class is not None and self.vendor is None:
            raise InvalidArgumentError(
                "a class is named within its vendor: give the vendor too", field="vendor"
            )
        tags = [tag for tag, _ in self.custom_tlvs]
        for tag in tags:
            if not CUSTOM_TLV_MIN <= tag <= CUSTOM_TLV_MAX:
                raise InvalidArgumentError(
                    f"custom TLV tag 0x{tag:x} is outside 0x{CUSTOM_TLV_MIN:04x}-0x{CUSTOM_TLV_MAX:04x}",
                    field="custom_tlv",
                )
        if len(set(tags)) != len(tags):
            raise InvalidArgumentError("a custom TLV tag is given twice", field="custom_tlv")
        self._check_protected_area()

    def _check_protected_area(self) -> None:
        """Refuse here what the format cannot hold, before any output exists: a TLV length and an area
        total are u16s, and construct would otherwise fail with its own exception half-way through."""
        for tag, value in self.custom_tlvs:
            if len(value) > _MAX_TLV_VALUE:
                raise InvalidArgumentError(
                    f"custom TLV 0x{tag:04x} holds {len(value)} bytes; a TLV holds at most {_MAX_TLV_VALUE}",
                    field="custom_tlv",
                )
        # also derives the UUIDs, so an empty or unprintable vendor or class name is refused now
        tlvs = self.protected_tlvs()
        total = TLV_INFO_SIZE + sum(TLV_HEADER_SIZE + len(value) for _, value in tlvs)
        if total > MAX_TLV_AREA:
            raise InvalidArgumentError(
                f"the protected TLVs need {total} bytes; an area holds at most {MAX_TLV_AREA}",
                field="custom_tlv",
            )

    def protected_tlvs(self) -> list[tuple[int, bytes]]:
        """In imgtool's order: SEC_CNT, UUID_VID, UUID_CID, then the custom TLVs."""
        tlvs: list[tuple[int, bytes]] = []
        if self.security_counter is not None:
            tlvs.append((TlvType.SEC_CNT, SecurityCounterValue.build(self.security_counter)))
        if self.vendor is not None:
            tlvs.append((TlvType.UUID_VID, vendor_uuid(self.vendor).bytes))
            if self.image_class is not None:
                tlvs.append((TlvType.UUID_CID, class_uuid(self.vendor, self.image_class).bytes))
        tlvs.extend(self.custom_tlvs)
        return tlvs


@dataclass(frozen=True)
class SignedImage:
    path: Path
    digest: bytes
    img_size: int
    key_hashes: tuple[bytes, ...]


class ImageBuilder:
    """Streams the payload into a new image in a background thread from the moment it is created, so the
    caller can load its keys (or wait for an HSM) meanwhile; `finish` adds the signatures and commits.

    Leaving the `with` block without `finish` (a wrong passphrase, an unknown token) stops the stream and
    removes the temporary output: nothing partial is left behind."""

    def __init__(self, input_path: Path, output_path: Path, options: ImageOptions) -> None:
        self.output_path = output_path
        self._finished = False
        self._stack = ExitStack()
        try:
            self._source = self._stack.enter_context(open_input(input_path))
            self._target = self._stack.enter_context(atomic_output(output_path))
        except BaseException:
            self._stack.close()
            raise
        self.img_size = file_size(self._source)
        self._options = options
        self._stop = threading.Event()
        self._digest: bytes | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._stream, name="mers-sign", daemon=True)
        self._thread.start()

    def _stream(self) -> None:
        try:
            self._digest = _write_signed_range(
                self._source, self._target, self.img_size, self._options, self._stop
            )
        except BaseException as error:  # handed to the caller's thread by `digest`
            self._error = error

    def digest(self) -> bytes:
        """Wait for the stream; the SHA-256 to sign."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def finish(self, signatures: Sequence[tuple[PublicKey, bytes]]) -> bytes:
        """Write the unprotected TLVs (hash, then KEYHASH + signature for each) and commit the file."""
        digest = self.digest()
        self._target.write(_unprotected_area(digest, signatures))
        self._stack.close()  # leaves atomic_output normally: fsync, rename
        self._finished = True
        return digest

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._finished:
            return
        self._stop.set()
        self._thread.join()
        # hand the failure (or the abandonment) to atomic_output, which then removes the temporary file
        failure = value if value is not None else _Abandoned("the image was not finished")
        self._stack.__exit__(type(failure), failure, trace)


class _Abandoned(Exception):
    """Raised into the output's context when a builder is left unfinished, so it is discarded."""


def sign_image(
    input_path: Path, output_path: Path, signers: Sequence[Signer], options: ImageOptions
) -> SignedImage:
    """Wrap the raw payload at `input_path` into an image signed by every signer (one signature each)."""
    if not signers:
        raise InvalidArgumentError("at least one key is needed to sign", field="key")
    with ImageBuilder(input_path, output_path, options) as builder:
        return finish_signed(builder, signers)


def finish_signed(builder: ImageBuilder, signers: Sequence[Signer]) -> SignedImage:
    """Sign the builder's digest with every signer and commit the image."""
    keys = [signer.public_key for signer in signers]
    if len({key.key_hash for key in keys}) != len(keys):
        raise InvalidArgumentError("the same key is given twice", field="key")
    digest = builder.digest()
    builder.finish([(signer.public_key, signer.sign_digest(digest)) for signer in signers])
    return SignedImage(builder.output_path, digest, builder.img_size, tuple(key.key_hash for key in keys))


def prepare_unsigned(input_path: Path, output_path: Path, options: ImageOptions) -> bytes:
    """Write the image with its hash but no signature, and return the exact digest an offline or HSM
    signer must sign (PSS/ECDSA over the prehashed SHA-256, or Ed25519 over the 32 bytes)."""
    with ImageBuilder(input_path, output_path, options) as builder:
        return builder.finish([])


def prepare_detached(
    input_path: Path, unsigned_path: Path, digest_path: Path, options: ImageOptions
) -> bytes:
    """`prepare_unsigned`, plus the digest written to `digest_path`: both new files or neither, so a
    failed `mers-sign digest` leaves no unsigned image for a pipeline to pick up without its digest.

    The digest's temporary file is made first, so a missing or unwritable directory fails before
    anything is streamed; the image is published next and the digest last. Whatever fails, at whatever
    point, both names are then given back what they held before (an earlier image and digest are kept
    aside under second names meanwhile), or freed where they held nothing."""
    with kept_aside(unsigned_path) as earlier_image, kept_aside(digest_path) as earlier_digest:
        try:
            with atomic_output(digest_path) as digest_output:
                digest = prepare_unsigned(input_path, unsigned_path, options)
                digest_output.write(digest)
        except BaseException:
            _take_back(unsigned_path, earlier_image)
            _take_back(digest_path, earlier_digest)
            with contextlib.suppress(OSError):
                fsync_directory(unsigned_path.parent)
                fsync_directory(digest_path.parent)
            raise
    return digest


def _take_back(path: Path, earlier: Path | None) -> None:
    """`path` as it was before: the earlier file put back where one was kept aside, else no file. Never
    raises: the caller is already handing on the error that made it give back."""
    with contextlib.suppress(OSError):
        if earlier is not None:
            os.replace(earlier, path)
        elif path.is_file() and not path.is_symlink():
            path.unlink()


def attach_signature(image_path: Path, output_path: Path, signature: bytes, public_key: PublicKey) -> bytes:
    """Add one KEYHASH + signature to an image, after checking that the image's hash is intact and that
    the signature is `public_key`'s over it: a wrong or corrupted signature never reaches a release."""
    from .layout import FileSource, read_layout  # noqa: PLC0415 - off the path of `sign`, see the top
    from .manifest import read_manifest  # noqa: PLC0415 - likewise

    with open_input(image_path, "image") as source:
        layout = read_layout(FileSource(source.fileno(), file_size(source)))
        manifest = read_manifest(layout)
        if any(entry.key_hash == public_key.key_hash for entry in manifest.signatures):
            raise InvalidArgumentError("the image already carries a signature by this key", field="KEYHASH")
        if not public_key.verifies(signature, manifest.digest):
            raise BadSignatureError(
                f"the signature is not {public_key.algorithm.value} key {public_key.key_hash.hex()[:16]}'s "
                "signature of this image's digest"
            )
        existing = [(entry.type, entry.value) for entry in layout.unprotected.entries]
        added: list[tuple[int, bytes]] = [
            (TlvType.KEYHASH, public_key.key_hash),
            (public_key.algorithm.signature_tlv, signature),
        ]
        with atomic_output(output_path) as target:
            # hash what is copied, so a file changed since `digest` (or since the check above) is caught
            computed = hashlib.sha256()
            target.copy_from(source.fileno(), 0, layout.signed_length, computed)
            if not hmac.compare_digest(computed.digest(), manifest.digest):
                raise HashMismatchError(
                    "the image's content does not match its SHA256 TLV: it was changed after `digest`"
                )
            target.write(_tlv_area(TLV_INFO_MAGIC, existing + added))
    return manifest.digest


def _write_signed_range(
    source: BinaryIO, target: SequentialWriter, img_size: int, options: ImageOptions, stop: threading.Event
) -> bytes:
    """Header, padding, payload and protected TLVs, hashed as they are written; returns the digest."""
    if img_size > _MAX_IMG_SIZE:
        raise InputFileError(f"input of {img_size} bytes exceeds the format's 4 GiB limit")
    protected = options.protected_tlvs()
    protected_area = _tlv_area(PROTECTED_TLV_INFO_MAGIC, protected) if protected else b""
    header = ImageHeader.build(
        {
            "magic": IMAGE_MAGIC,
            "load_addr": 0,
            "hdr_size": options.header_size,
            "protect_tlv_size": len(protected_area),
            "img_size": img_size,
            "flags": 0,
            "version": vars(options.version),
            "pad": 0,
        }
    )
    digest = hashlib.sha256()
    head = header + bytes(options.header_size - HEADER_SIZE)
    digest.update(head)
    target.write(head)
    target.copy_from(source.fileno(), 0, img_size, digest, stop)
    digest.update(protected_area)
    target.write(protected_area)
    return digest.digest()


def _unprotected_area(digest: bytes, signatures: Sequence[tuple[PublicKey, bytes]]) -> bytes:
    tlvs: list[tuple[int, bytes]] = [(TlvType.SHA256, digest)]
    for key, signature in signatures:
        tlvs += [(TlvType.KEYHASH, key.key_hash), (key.algorithm.signature_tlv, signature)]
    return _tlv_area(TLV_INFO_MAGIC, tlvs)


def _tlv_area(magic: int, tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    body = b"".join(Tlv.build({"type": tag, "length": len(value), "value": value}) for tag, value in tlvs)
    total = TLV_INFO_SIZE + len(body)
    if total > MAX_TLV_AREA:
        raise InvalidArgumentError(f"the TLVs need {total} bytes; an area holds at most {MAX_TLV_AREA}")
    info: bytes = TlvInfo.build({"magic": magic, "total": total})
    return info + body

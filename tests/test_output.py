"""The pipelined output writer and atomic outputs: exact bytes, and nothing left behind on failure."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing import ImageOptions, ImageVersion, Trust, sign_image, verify_image
from signing.build import ImageBuilder, finish_signed
from signing.errors import InputFileError, OutputFileError
from signing.keys import KeyAlgorithm
from signing.output import CHUNK_SIZE, atomic_output
from tests.signing_helpers import signer_for

pieces = st.lists(
    st.one_of(
        st.binary(max_size=300).map(lambda data: ("write", data)),
        st.integers(0, 3 * CHUNK_SIZE).map(lambda length: ("copy", length)),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=pieces)
def test_the_output_is_exactly_what_was_written_and_copied_in_order(tmp_path, plan):
    source = tmp_path / "source"
    if not source.exists():
        source.write_bytes(os.urandom(3 * CHUNK_SIZE + 17))
    content = source.read_bytes()
    expected = bytearray()
    digests = []
    target = tmp_path / "out"
    with source.open("rb") as handle, atomic_output(target) as writer:
        for kind, value in plan:
            if kind == "write":
                assert isinstance(value, bytes)
                writer.write(value)
                expected += value
            else:
                assert isinstance(value, int)
                digest = hashlib.sha256()
                writer.copy_from(handle.fileno(), 5, value, digest)
                expected += content[5 : 5 + value]
                digests.append((digest.digest(), hashlib.sha256(content[5 : 5 + value]).digest()))
    assert target.read_bytes() == bytes(expected)
    assert all(got == want for got, want in digests)


def test_a_large_image_signed_onto_tmpfs_without_o_direct_verifies(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this system")
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(2 * CHUNK_SIZE + 123))
    signer = signer_for(KeyAlgorithm.ED25519)
    out = shm / f"mers-test-{os.getpid()}.img"
    try:
        sign_image(raw, out, [signer], ImageOptions(version=ImageVersion(1), header_size=0x200))
        assert verify_image(out, Trust(keys=(signer.public_key,))).img_size == 2 * CHUNK_SIZE + 123
    finally:
        out.unlink(missing_ok=True)


def test_a_full_disk_during_signing_leaves_no_output_and_no_temporary_file(tmp_path, monkeypatch):
    """Fault injection at the system-call boundary: the third chunk write fails with ENOSPC."""
    real_pwrite = os.pwrite
    calls = {"count": 0}

    def failing_pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(6 * CHUNK_SIZE))
    (tmp_path / "out.img").write_bytes(b"previous release")
    with pytest.raises(OutputFileError, match="No space left"):
        sign_image(
            raw, tmp_path / "out.img", [signer_for(KeyAlgorithm.ED25519)], ImageOptions(ImageVersion(1))
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw", "out.img"]
    assert (tmp_path / "out.img").read_bytes() == b"previous release"


def test_an_input_that_shrinks_while_it_is_signed_is_an_error_not_a_short_image(tmp_path, monkeypatch):
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(3 * CHUNK_SIZE))
    real_preadv = os.preadv

    def shrinking_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset >= 2 * CHUNK_SIZE:
            return 0
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", shrinking_preadv)
    with pytest.raises(InputFileError, match="shrank"):
        sign_image(
            raw, tmp_path / "out.img", [signer_for(KeyAlgorithm.ED25519)], ImageOptions(ImageVersion(1))
        )
    assert not (tmp_path / "out.img").exists()


def test_an_output_in_a_missing_directory_is_a_typed_error(tmp_path):
    raw = tmp_path / "in.raw"
    raw.write_bytes(b"payload")
    with pytest.raises(OutputFileError):
        sign_image(
            raw,
            tmp_path / "nope" / "out.img",
            [signer_for(KeyAlgorithm.ED25519)],
            ImageOptions(ImageVersion(1)),
        )


def test_an_image_builder_left_unfinished_leaves_no_output(tmp_path):

    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(3 * CHUNK_SIZE))
    with ImageBuilder(raw, tmp_path / "out.img", ImageOptions(ImageVersion(1))):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]


def test_a_key_that_fails_to_load_while_the_payload_streams_leaves_no_output(tmp_path):

    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(3 * CHUNK_SIZE))
    with (
        pytest.raises(InputFileError),
        ImageBuilder(raw, tmp_path / "out.img", ImageOptions(ImageVersion(1))),
    ):
        raise InputFileError("the key file vanished")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]


def test_a_finished_image_builder_commits_an_image_with_the_streamed_digest(tmp_path):

    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(CHUNK_SIZE + 5))
    signer = signer_for(KeyAlgorithm.ED25519)
    with ImageBuilder(raw, tmp_path / "out.img", ImageOptions(ImageVersion(2))) as builder:
        signed = finish_signed(builder, [signer])
    assert verify_image(tmp_path / "out.img", Trust(keys=(signer.public_key,))).digest == signed.digest

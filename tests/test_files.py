"""Reading inputs ahead of the hash: the pieces are the file's bytes in order, failures are typed, a reader
stopped half-way never hangs, and what is hashed is what is written even when the file changes."""

from __future__ import annotations

import errno
import os
import queue
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing import ImageOptions, ImageVersion, Trust, sign_image, verify_image
from signing.errors import InputFileError
from signing.files import Buffer, ReadAhead
from signing.keys import KeyAlgorithm
from signing.output import CHUNK_SIZE
from tests.signing_helpers import signer_for

CONTENT = os.urandom(5000)


def pool_of(count: int, size: int) -> queue.Queue[Buffer]:
    pool: queue.Queue[Buffer] = queue.Queue()
    for _ in range(count):
        pool.put(bytearray(size))
    return pool


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, 300),
    length=st.integers(0, 4000),
    size=st.integers(1, 700),
    filled=st.integers(0, 700),
    buffers=st.integers(1, 4),
)
def test_the_pieces_are_the_region_in_order_and_every_full_buffer_comes_back(
    tmp_path, offset, length, size, filled, buffers
):
    source = tmp_path / "source"
    if not source.exists():
        source.write_bytes(CONTENT)
    filled = min(filled, size - 1)  # a caller hands over a buffer with room left in it
    pool = pool_of(buffers, size)
    first = pool.get()
    got = bytearray()
    fd = os.open(source, os.O_RDONLY)
    try:
        reader = ReadAhead(fd, offset, length, first, filled, pool)
        try:
            for piece in reader.pieces():
                assert 0 <= piece.start < piece.end <= len(piece.buffer)
                got += piece.view
                if piece.end == len(piece.buffer):
                    pool.put(piece.buffer)  # as a writer does once the chunk is written
        finally:
            reader.close()
    finally:
        os.close(fd)
    assert bytes(got) == CONTENT[offset : offset + length]


def test_closing_a_reader_that_waits_for_a_buffer_ends_it(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(CONTENT)
    pool = pool_of(2, 100)
    fd = os.open(source, os.O_RDONLY)
    try:
        reader = ReadAhead(fd, 0, len(CONTENT), pool.get(), 0, pool)
        pieces = reader.pieces()
        kept = next(pieces)  # held, never given back: the reader fills the other buffer, then waits
        assert kept.end == 100
        closing = threading.Thread(target=reader.close)
        closing.start()
        closing.join(timeout=30)
        assert not closing.is_alive(), "close() hung on a reader waiting for a free buffer"
    finally:
        os.close(fd)


def test_a_read_error_is_a_typed_error_naming_it(tmp_path, monkeypatch):
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(3 * CHUNK_SIZE))
    image = tmp_path / "out.img"
    sign_image(raw, image, [signer_for(KeyAlgorithm.ED25519)], ImageOptions(ImageVersion(1)))

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(InputFileError, match="Input/output error"):
        verify_image(image, Trust(keys=(signer_for(KeyAlgorithm.ED25519).public_key,)))
    with pytest.raises(InputFileError, match="Input/output error"):
        sign_image(
            raw, tmp_path / "again.img", [signer_for(KeyAlgorithm.ED25519)], ImageOptions(ImageVersion(2))
        )
    assert not (tmp_path / "again.img").exists()


def test_an_input_rewritten_while_it_is_signed_still_gives_an_image_whose_hash_is_its_content(
    tmp_path, monkeypatch
):
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(3 * CHUNK_SIZE + 99))
    real_preadv = os.preadv

    def preadv_then_rewrite(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        with raw.open("r+b") as rewrite:  # a build still writing its output
            rewrite.write(os.urandom(raw.stat().st_size))
        return got

    monkeypatch.setattr(os, "preadv", preadv_then_rewrite)
    image = tmp_path / "out.img"
    sign_image(raw, image, [signer_for(KeyAlgorithm.ED25519)], ImageOptions(ImageVersion(1)))
    monkeypatch.undo()
    verified = verify_image(image, Trust(keys=(signer_for(KeyAlgorithm.ED25519).public_key,)))
    assert verified.img_size == 3 * CHUNK_SIZE + 99


def test_pieces_of_a_stopped_reader_end_early_without_error(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(CONTENT)
    pool = pool_of(3, 100)
    stop = threading.Event()
    fd = os.open(source, os.O_RDONLY)
    try:
        reader = ReadAhead(fd, 0, len(CONTENT), pool.get(), 0, pool, stop)
        seen = 0
        for piece in reader.pieces():
            seen += piece.end - piece.start
            stop.set()
            if piece.end == len(piece.buffer):
                pool.put(piece.buffer)
        reader.close()
    finally:
        os.close(fd)
    assert 0 < seen < len(CONTENT)

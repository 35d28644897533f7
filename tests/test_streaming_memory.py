"""Stream, don't slurp: signing and verifying a large image must not use more memory than a small one.

Measured on real `mers-sign` subprocesses, through a small launcher that reports their peak RSS. Sizes are
compared with each other (not with a wall clock), so the test is not timing-sensitive.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
SMALL = 4 * MIB
LARGE = 256 * MIB
#: what may differ between two runs for reasons other than image size (allocator, page cache noise)
TOLERANCE_KIB = 16 * 1024


#: run the command from a small, fresh interpreter: a child's ru_maxrss starts at its parent's RSS at fork
#: time, so measuring straight from a large pytest process would report pytest's memory, not ours
_LAUNCHER = """
import resource, subprocess, sys
completed = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(completed.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(completed.returncode)
"""


def peak_rss_kib(*args: str | Path) -> int:
    """Peak resident memory of one `mers-sign` run, in KiB."""
    program = Path(sys.executable).parent / "mers-sign"
    completed = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(program), *map(str, args)], capture_output=True, check=False
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return int(completed.stdout)


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` bytes that costs no disk until written (its content is zeros)."""
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("key")
    subprocess.run(
        [str(Path(sys.executable).parent / "mers-sign"), "keygen", "-o", str(directory / "k.pem")],
        check=True,
        capture_output=True,
    )
    return directory / "k.pem"


def test_signing_and_verifying_a_large_image_needs_no_more_memory_than_a_small_one(tmp_path, key):
    peaks = {}
    for size in (SMALL, LARGE):
        raw = sparse_file(tmp_path / f"{size}.raw", size)
        signed = tmp_path / f"{size}.img"
        peaks[size, "sign"] = peak_rss_kib("sign", "--key", key, "--version", "1.0.0", raw, signed)
        peaks[size, "verify"] = peak_rss_kib("verify", "--key", key.with_name("k.pub.pem"), signed)
        raw.unlink()
        signed.unlink()
    for step in ("sign", "verify"):
        growth = peaks[LARGE, step] - peaks[SMALL, step]
        assert growth < TOLERANCE_KIB, f"{step}: peak RSS grew by {growth} KiB for 64x the image size"
        assert peaks[LARGE, step] < 64 * 1024, f"{step}: peak RSS {peaks[LARGE, step]} KiB exceeds 64 MiB"

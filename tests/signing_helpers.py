"""Helpers shared by the signing tests: in-memory signers and small images made through the library."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signing import ImageOptions, ImageVersion, Signer, sign_image
from signing.keys import KeyAlgorithm, SoftwareSigner, generate_private_key
from tests.conftest import CliResult, run_cli


@functools.cache
def signer_for(algorithm: KeyAlgorithm, index: int = 0) -> SoftwareSigner:
    """One cached signer per (algorithm, index): RSA-3072 generation costs about half a second."""
    del index  # part of the cache key only
    return SoftwareSigner(generate_private_key(algorithm))


def make_image(
    directory: Path,
    signers: list[Signer] | None = None,
    *,
    payload: bytes = b"firmware payload " * 64,
    name: str = "image.signed",
    **options: object,
) -> Path:
    """Sign `payload` into `directory/name` with the given signers (default: one RSA-3072 key)."""
    raw = directory / f"{name}.raw"
    raw.write_bytes(payload)
    output = directory / name
    version = options.pop("version", ImageVersion(1, 2, 3, 4))
    sign_image(
        raw,
        output,
        signers if signers is not None else [signer_for(KeyAlgorithm.RSA3072)],
        ImageOptions(version=version, **options),  # type: ignore[arg-type]
    )
    return output


#: the `mers_sign` fixture's type: call `mers-sign ARGS...` as a subprocess
MersSign = Callable[..., CliResult]


@dataclass(frozen=True)
class KeyPair:
    """A key made by a tool under test: the private file and its public half."""

    private: Path
    public: Path


def succeeded(result: CliResult) -> CliResult:
    """`result`, after asserting the command exited 0 (its output in the message otherwise)."""
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr or result.stdout}"
    return result


def imgtool(*args: str | Path) -> CliResult:
    """`imgtool ARGS...` from this environment (the pinned 2.5.0), as a subprocess."""
    return run_cli("imgtool", *args)


def image_info(path: Path) -> dict[str, Any]:
    """`mers-sign info --json` of the image at `path`."""
    description: dict[str, Any] = json.loads(succeeded(run_cli("mers-sign", "info", "--json", path)).stdout)
    return description


def key_hash(key: Path) -> str:
    """The KEYHASH of a key file, as `mers-sign getpub --format hash` prints it (hex)."""
    return succeeded(run_cli("mers-sign", "getpub", "--format", "hash", key)).stdout.strip()

"""Signed blob URLs, pure: what the hub issues verifies until it expires, and any change to the path, the
expiry or the signature makes it worthless."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.errors import ForbiddenError
from hub.signed_urls import EXPIRED, INCOMPLETE, INVALID, BlobUrlSigner, signature

SECRET = b"0123456789abcdef0123456789abcdef"
SHA = hashlib.sha256(b"an image").hexdigest()
OTHER_SHA = hashlib.sha256(b"another image").hexdigest()
NOW = 1_750_000_000.25
SIGNER = BlobUrlSigner(SECRET, "https://hub.example:8443", lifetime=7 * 24 * 3600)


def query_of(uri: str) -> tuple[str, str, str]:
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    return parts.path.removeprefix("/blobs/"), query["expires"][0], query["sig"][0]


def refusal(sha: str, expires: str | None, sig: str | None, now: float = NOW) -> str:
    with pytest.raises(ForbiddenError) as caught:
        SIGNER.check(sha, expires, sig, now)
    assert caught.value.status == 403
    return caught.value.message


def test_a_url_is_the_blob_path_with_its_expiry_and_signature_under_the_base_url() -> None:
    signed = SIGNER.sign(SHA, NOW)
    assert signed.expires == 1_750_000_000 + 7 * 24 * 3600
    assert signed.uri.startswith(f"https://hub.example:8443/blobs/{SHA}?expires={signed.expires}&sig=")
    sha, expires, sig = query_of(signed.uri)
    assert (sha, int(expires)) == (SHA, signed.expires)
    assert sig == signature(SECRET, "GET", f"/blobs/{SHA}", signed.expires)
    assert len(sig) == 64


def test_a_url_the_hub_signed_is_accepted_until_the_second_it_expires() -> None:
    sha, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    SIGNER.check(sha, expires, sig, NOW)
    SIGNER.check(sha, expires, sig, int(expires) - 0.001)
    assert refusal(sha, expires, sig, now=int(expires)) == EXPIRED


def test_a_url_pointed_at_another_blob_is_not_valid() -> None:
    _, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    assert refusal(OTHER_SHA, expires, sig) == INVALID


def test_a_prolonged_expiry_is_not_valid_even_once_the_real_one_passed() -> None:
    sha, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    later = str(int(expires) + 3600)
    assert refusal(sha, later, sig) == INVALID
    assert refusal(sha, later, sig, now=int(expires) + 1) == INVALID  # never "expired": it is forged


@pytest.mark.parametrize(
    "forged",
    [
        lambda sig: sig[:-1] + ("0" if sig[-1] != "0" else "1"),
        lambda sig: sig.upper(),
        lambda sig: sig[:-2],
        lambda sig: sig + "00",
        lambda sig: "0" * 64,
        lambda sig: "zz" + sig[2:],
        lambda sig: sig[:32] + " " + sig[33:],
        lambda sig: "é" * 64,
    ],
)
def test_a_changed_signature_is_not_valid(forged: Callable[[str], str]) -> None:
    sha, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    assert refusal(sha, expires, forged(sig)) == INVALID


@pytest.mark.parametrize("expires", ["-1", "1e9", " 1", "0x10", "١٢٣", "9" * 13, "+5"])
def test_an_expiry_that_is_not_plain_epoch_seconds_is_not_valid(expires: str) -> None:
    sig = signature(SECRET, "GET", f"/blobs/{SHA}", 5)
    assert refusal(SHA, expires, sig) == INVALID


@pytest.mark.parametrize("path", ["../hub.toml", SHA.upper(), SHA[:-1], SHA + "0", "", "."])
def test_a_path_that_names_no_possible_blob_is_not_valid(path: str) -> None:
    expires = int(NOW) + 60
    sig = signature(SECRET, "GET", f"/blobs/{path}", expires)  # even correctly signed
    assert refusal(path, str(expires), sig) == INVALID


def test_a_url_without_its_expiry_or_signature_is_refused() -> None:
    sha, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    assert refusal(sha, None, sig) == INCOMPLETE
    assert refusal(sha, expires, None) == INCOMPLETE
    assert refusal(sha, "", "") == INCOMPLETE


def test_a_url_signed_with_another_secret_is_not_valid() -> None:
    other = BlobUrlSigner(b"another secret", SIGNER.base_url, SIGNER.lifetime)
    sha, expires, sig = query_of(other.sign(SHA, NOW).uri)
    assert refusal(sha, expires, sig) == INVALID


def test_the_signature_covers_the_method() -> None:
    assert signature(SECRET, "GET", "/blobs/x", 1) != signature(SECRET, "PUT", "/blobs/x", 1)


@given(sha=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), expires=st.integers(1, 10**12 - 1))
def test_only_the_exact_signed_triple_verifies(sha: str, expires: int) -> None:
    sig = signature(SECRET, "GET", f"/blobs/{sha}", expires)
    SIGNER.check(sha, str(expires), sig, now=0)
    for other in (expires - 1, expires + 1):
        with pytest.raises(ForbiddenError):
            SIGNER.check(sha, str(other), sig, now=0)


@given(position=st.integers(0, 63), digit=st.sampled_from("0123456789abcdef"))
def test_every_single_character_change_of_a_signature_is_refused(position: int, digit: str) -> None:
    sha, expires, sig = query_of(SIGNER.sign(SHA, NOW).uri)
    forged = sig[:position] + digit + sig[position + 1 :]
    if forged == sig:
        SIGNER.check(sha, expires, forged, NOW)
    else:
        assert refusal(sha, expires, forged) == INVALID

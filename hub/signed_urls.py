"""Signed blob URLs: `GET /blobs/<sha256>?expires=<epoch>&sig=<hex>`, the only credential a download needs.

The signature is HMAC-SHA256, keyed with the hub's URL secret, over the method, the path and the expiry,
so a link cannot be pointed at another blob (changed path), kept alive (changed expiry) or forged (changed
signature) without the secret. It is compared in constant time, so an attacker cannot learn a valid
signature byte by byte from response times. A URL is a bearer credential: nothing here logs one.

Pure: no clock, no files; the caller gives the time and the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass

from .errors import ForbiddenError

#: where blobs are served, outside the API prefix (docs/design.md §7)
BLOB_PATH_PREFIX = "/blobs/"
#: the method a URL is signed for; HEAD, a GET without its body, is checked as GET
SIGNED_METHOD = "GET"

#: separates these MACs from any other use the URL secret might be put to
_DOMAIN = b"mers-hub signed blob URL v1"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_EPOCH = re.compile(r"[0-9]{1,12}")

INVALID = "the signed URL is not valid"
EXPIRED = "the signed URL has expired; fetch the installation task again for a new one"
INCOMPLETE = "the signed URL lacks its expires or sig parameter"


@dataclass(frozen=True)
class SignedUrl:
    uri: str
    #: epoch seconds; the URL is refused from this second on
    expires: int


def blob_path(sha256: str) -> str:
    return BLOB_PATH_PREFIX + sha256


def signature(secret: bytes, method: str, path: str, expires: int) -> str:
    """The hex HMAC-SHA256 of one (method, path, expiry). Fields are newline-separated and the method and
    expiry cannot contain a newline, so no two different triples share a message."""
    message = b"\n".join(
        (_DOMAIN, method.encode("ascii"), path.encode("utf-8"), str(expires).encode("ascii"))
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class BlobUrlSigner:
    """Issues and checks the signed URLs of one hub: its secret, its public base URL, the URLs' lifetime."""

    secret: bytes
    base_url: str
    lifetime: float

    def sign(self, sha256: str, now: float) -> SignedUrl:
        expires = math.floor(now + self.lifetime)
        path = blob_path(sha256)
        sig = signature(self.secret, SIGNED_METHOD, path, expires)
        return SignedUrl(f"{self.base_url}{path}?expires={expires}&sig={sig}", expires)

    def check(self, sha256: str, expires: str | None, sig: str | None, now: float) -> None:
        """Accept a request for blob `sha256` carrying these query values at time `now`, or raise
        `ForbiddenError` saying why. The signature is checked before the expiry, so only a genuine URL is
        ever told it merely expired (the client then fetches a new one); anything else is "not valid",
        the same answer whatever the path names."""
        if not expires or not sig:
            raise ForbiddenError(INCOMPLETE)
        if not (_SHA256_HEX.fullmatch(sha256) and _EPOCH.fullmatch(expires) and _SHA256_HEX.fullmatch(sig)):
            raise ForbiddenError(INVALID)
        expected = signature(self.secret, SIGNED_METHOD, blob_path(sha256), int(expires))
        if not hmac.compare_digest(bytes.fromhex(expected), bytes.fromhex(sig)):
            raise ForbiddenError(INVALID)
        if now >= int(expires):
            raise ForbiddenError(EXPIRED)

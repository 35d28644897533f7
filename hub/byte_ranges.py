"""Which bytes of a blob a download asks for: `Range` and `If-Range` as RFC 9110 section 14 defines them,
for a single range (what a resuming downloader sends).

The rules that matter for an installer resuming into a slot:
- `If-Range` naming another entity tag (the blob changed, or a weak tag) means "send it all": a client
  never splices bytes of two different images.
- A `Range` we do not understand (another unit, bad syntax, several ranges) is ignored and the whole blob
  is sent, as the RFC allows; only a well-formed range that starts past the end is unsatisfiable (416).

Pure: the caller gives the headers, the entity tag and the size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
#: longer numbers are beyond any file; capping them keeps `int` from parsing thousands of digits
_MAX_DIGITS = 18
_HUGE: int = 10**_MAX_DIGITS


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` to `stop - 1` of a blob of `size` bytes."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


@dataclass(frozen=True)
class Unsatisfiable:
    """A well-formed range that selects no byte of a blob of `size` bytes."""

    size: int

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def requested_range(
    range_header: str | None, if_range: str | None, etag: str, size: int
) -> ByteRange | Unsatisfiable | None:
    """The part of the blob to send: a `ByteRange` (206), `Unsatisfiable` (416), or None for all (200)."""
    if range_header is None:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None  # strong comparison: a weak tag or a date never matches, so the client gets it all
    match = _SPEC.fullmatch(range_header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        return _from_first(_number(first), _number(last) if last else None, size)
    if last:
        return _suffix(_number(last), size)
    return None  # "bytes=-" is not a range


def _from_first(first: int, last: int | None, size: int) -> ByteRange | Unsatisfiable | None:
    if last is not None and last < first:
        return None  # invalid syntax per RFC 9110: ignore the header
    if first >= size:
        return Unsatisfiable(size)
    stop = size if last is None else min(last + 1, size)
    return ByteRange(first, stop, size)


def _suffix(length: int, size: int) -> ByteRange | Unsatisfiable:
    if length == 0 or size == 0:
        return Unsatisfiable(size)
    return ByteRange(max(size - length, 0), size, size)


def _number(digits: str) -> int:
    """The value of `digits`; leading zeros go before the cap, since `0...02` is 2, not beyond the file."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return _HUGE
    return int(significant or "0")

"""Entity tags of agents and data source configurations: `If-Match` in, `ETag` out; and the conditions a
blob download is judged by (`condition_names`).

An update or delete must name the version it was based on: without `If-Match` the hub answers 428, and
with a stale one 412, so two operators editing the same agent cannot silently overwrite each other (the
lost update). The platform writes eTags as integers; clients send them quoted or not. A weak tag
(`W/"3"`) never matches: `If-Match` uses the strong comparison (RFC 9110 section 13.1.1), since a weak tag
only claims an equivalent version, and replacing a resource on that claim is the lost update again.
"""

from __future__ import annotations

import re

from .errors import HubError, PreconditionFailedError

_MAX_DIGITS = 18
#: one element of a `#entity-tag` list (RFC 9110 sections 5.6.1 and 8.8.3), or an empty one; a tag may
#: hold a comma, so the list is read tag by tag rather than split at commas
_LISTED_TAG = re.compile(r'[ \t]*(?:(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(?:,|\Z)')


class PreconditionRequiredError(HubError):
    """An update or delete came without `If-Match`."""

    status = 428
    code = "precondition_required"


def etag_header(etag: int) -> dict[str, str]:
    return {"ETag": f'"{etag}"'}


def expected_etag(if_match: str | None) -> int:
    """The version an `If-Match` header names; 428 when absent, 412 when it names no possible version
    or a weak one (which no version matches strongly)."""
    if if_match is None or not if_match.strip():
        raise PreconditionRequiredError("this update needs an If-Match header with the current eTag")
    if if_match.strip().startswith("W/"):
        raise PreconditionFailedError(
            f"If-Match {if_match[:40]!r} is a weak eTag, which never matches (RFC 9110 section 13.1.1)"
        )
    value = if_match.strip().strip('"')
    if not value.isascii() or not value.isdigit() or len(value) > _MAX_DIGITS:
        raise PreconditionFailedError(f"If-Match {if_match[:40]!r} names no version of this resource")
    return int(value)


def check_etag(expected: int, current: int) -> None:
    if expected != current:
        raise PreconditionFailedError(f"the eTag is {current}, not {expected}: read the resource again")


def condition_names(field: str, etag: str, *, weak: bool) -> bool:
    """Whether an `If-Match` or `If-None-Match` field (`*`, or a list of entity tags) names `etag`, a
    strong tag with its quotes: by the strong comparison (`If-Match`), where a weak tag never matches, or
    by the weak one (`If-None-Match`, `weak`). A malformed field names nothing."""
    if field.strip(" \t") == "*":
        return True
    position, named = 0, False
    while position < len(field):
        element = _LISTED_TAG.match(field, position)
        if element is None or element.end() == position:
            return False
        is_weak, tag = element.group(1) is not None, element.group(2)
        named = named or (tag == etag and (weak or not is_weak))
        position = element.end()
    return named

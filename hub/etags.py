"""Entity tags of agents and data source configurations: `If-Match` in, `ETag` out.

An update or delete must name the version it was based on: without `If-Match` the hub answers 428, and
with a stale one 412, so two operators editing the same agent cannot silently overwrite each other (the
lost update). The platform writes eTags as integers; clients send them quoted or not. A weak tag
(`W/"3"`) never matches: `If-Match` uses the strong comparison (RFC 9110 section 13.1.1), since a weak tag
only claims an equivalent version, and replacing a resource on that claim is the lost update again.
"""

from __future__ import annotations

from .errors import HubError, PreconditionFailedError

_MAX_DIGITS = 18


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

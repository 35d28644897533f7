"""Entity tags of agents and data source configurations: `If-Match` in, `ETag` out; and the conditions a
blob download is judged by (`condition_names`).

An update or delete must name the version it was based on: without `If-Match` the hub answers 428, and
when the field (`*`, or a list of tags) names no current version 412, so two operators editing the same
agent cannot silently overwrite each other (the lost update). The platform writes eTags as integers;
clients send them quoted or not. A weak tag (`W/"3"`) never matches: `If-Match` uses the strong
comparison (RFC 9110 section 13.1.1), since a weak tag only claims an equivalent version, and replacing
a resource on that claim is the lost update again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import HubError, PreconditionFailedError

#: one element of a `#entity-tag` list (RFC 9110 sections 5.6.1 and 8.8.3), or an empty one; a tag may
#: hold a comma, so the list is read tag by tag rather than split at commas
_LISTED_TAG = re.compile(r'[ \t]*(?:(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(?:,|\Z)')


class PreconditionRequiredError(HubError):
    """An update or delete came without `If-Match`."""

    status = 428
    code = "precondition_required"


def etag_header(etag: int) -> dict[str, str]:
    return {"ETag": f'"{etag}"'}


@dataclass(frozen=True)
class EtagCondition:
    """An `If-Match` field, well formed: `*`, or a list of entity tags (RFC 9110 section 13.1.1)."""

    field: str

    def check(self, current: int) -> int:
        """`current`, if the field names it by the strong comparison (or is `*`), for the caller's
        conditional write; 412 otherwise, so an edit based on another version is never applied."""
        if not condition_names(self.field, f'"{current}"', weak=False):
            raise PreconditionFailedError(
                f"the eTag is {current}, which If-Match {self.field[:40]!r} does not name strongly:"
                " read the resource again"
            )
        return current


def if_match_condition(if_match: str | None) -> EtagCondition:
    """The condition an `If-Match` header sets; 428 when absent, 412 when malformed (it names nothing).
    A bare number is read as the quoted tag, as clients of the platform send it."""
    if if_match is None or not if_match.strip():
        raise PreconditionRequiredError("this update needs an If-Match header with the current eTag")
    field = if_match.strip(" \t")
    if field.isascii() and field.isdigit():
        field = f'"{field}"'
    if field != "*" and not _listed_tags(field):
        raise PreconditionFailedError(f"If-Match {if_match[:40]!r} is not `*` or a list of eTags")
    return EtagCondition(field)


def check_etag(expected: int, current: int) -> None:
    if expected != current:
        raise PreconditionFailedError(f"the eTag is {current}, not {expected}: read the resource again")


def condition_names(field: str, etag: str, *, weak: bool) -> bool:
    """Whether an `If-Match` or `If-None-Match` field (`*`, or a list of entity tags) names `etag`, a
    strong tag with its quotes: by the strong comparison (`If-Match`), where a weak tag never matches, or
    by the weak one (`If-None-Match`, `weak`). A malformed field names nothing."""
    if field.strip(" \t") == "*":
        return True
    tags = _listed_tags(field)
    return tags is not None and any(tag == etag and (weak or not is_weak) for is_weak, tag in tags)


def _listed_tags(field: str) -> list[tuple[bool, str]] | None:
    """The (weak, tag) elements of an entity-tag list, tags with their quotes; None when malformed."""
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(field):
        element = _LISTED_TAG.match(field, position)
        if element is None or element.end() == position:
            return None
        if element.group(2) is not None:
            tags.append((element.group(1) is not None, element.group(2)))
        position = element.end()
    return tags

"""Free text and names from clients, checked before they reach the database or a listing.

PostgreSQL's text cannot hold a NUL (it answers with an error, a 5xx, where SQLite stores it), and a lone
surrogate cannot be encoded as UTF-8; both are refused with a 4xx on every database. A name or an id also
has no control characters, so it cannot forge a line in a log or a listing; free text may have them, and
is `escaped` wherever it is printed for people (a log line, a terminal).
"""

from __future__ import annotations

import unicodedata


def storable_text(value: str) -> str:
    """`value` if every database can store it: no NUL, no lone surrogate; a pydantic validator."""
    if any(unicodedata.category(char) == "Cs" for char in value) or "\x00" in value:
        raise ValueError("must be valid text without NUL characters")
    return value


def is_name(value: str) -> bool:
    """A display name or an id: not blank, no control characters (no forged lines in logs or listings)."""
    return bool(value.strip()) and not any(unicodedata.category(char) in ("Cc", "Cs") for char in value)


def checked_name(value: str) -> str:
    """`value` if it `is_name`; a pydantic validator."""
    if not is_name(value):
        raise ValueError("must be a non-blank name without control characters")
    return value


def escaped(value: str) -> str:
    """`value` with every character that is not printable (newlines, ANSI escape sequences' ESC, other
    controls, lone surrogates) and every backslash written as a Python escape, so what a client sent can
    neither forge a log line nor drive the terminal of the person reading it, and stays unambiguous."""
    if value.isprintable() and "\\" not in value:
        return value
    return "".join(
        char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode("ascii")
        for char in value
    )

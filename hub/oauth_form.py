"""The token endpoint's form body (`application/x-www-form-urlencoded`), parsed by us with bounds.

The body is parsed here rather than by a framework so that its limits are explicit: a bounded size and
number of fields (a flood of tiny fields is a CPU and memory attack on the parser), strict syntax, UTF-8
only, and every parameter at most once (RFC 6749 section 3.2: a repeated parameter could be read
differently by two layers, the classic parameter-pollution bypass). Values may arrive raw or
percent-encoded; real clients do both, and a JWT's characters need no encoding.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from .errors import InvalidRequestError

MAX_FORM_BYTES = 16 << 10
MAX_FIELDS = 16
MAX_ASSERTION_LENGTH = 8 << 10

CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: for the OpenAPI description of the token endpoint
TOKEN_FORM_SCHEMA = {
    "type": "object",
    "required": ["grant_type", "client_assertion_type", "client_assertion"],
    "properties": {
        "grant_type": {"type": "string", "enum": [CLIENT_CREDENTIALS]},
        "client_assertion_type": {"type": "string", "enum": [JWT_BEARER]},
        "client_assertion": {
            "type": "string",
            "maxLength": MAX_ASSERTION_LENGTH,
            "description": "a JWT signed HS256 with the client secret, or RS256/RS384 with the agent's key",
        },
    },
}


def parse_form(body: bytes) -> dict[str, str]:
    """The fields of a urlencoded body, or `InvalidRequestError`: oversized, not UTF-8, malformed, too
    many fields, or a field given twice."""
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequestError(f"the form body exceeds {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        pairs = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("the form body is not UTF-8") from exc
    except ValueError as exc:
        # the parser's message would quote the field, which may hold the caller's assertion
        raise InvalidRequestError("the body is not a valid urlencoded form (or has too many fields)") from exc
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise InvalidRequestError(f"the form field {name!r} is given more than once")
        fields[name] = value
    return fields


@dataclass(frozen=True)
class TokenRequest:
    """A client-credentials grant authenticated by a JWT client assertion (RFC 7523 section 2.2)."""

    client_assertion: str

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> TokenRequest:
        """Unknown fields are ignored (RFC 6749 section 3.2); the three that matter are required."""
        grant_type = fields.get("grant_type")
        if grant_type != CLIENT_CREDENTIALS:
            raise InvalidRequestError(f"grant_type must be {CLIENT_CREDENTIALS!r}")
        if fields.get("client_assertion_type") != JWT_BEARER:
            raise InvalidRequestError(f"client_assertion_type must be {JWT_BEARER!r}")
        assertion = fields.get("client_assertion", "")
        if not assertion:
            raise InvalidRequestError("client_assertion is required")
        if len(assertion) > MAX_ASSERTION_LENGTH:
            raise InvalidRequestError(f"client_assertion exceeds {MAX_ASSERTION_LENGTH} characters")
        return cls(assertion)


def parse_token_request(body: bytes) -> TokenRequest:
    return TokenRequest.from_form(parse_form(body))

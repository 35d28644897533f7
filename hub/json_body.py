"""A JSON request body that a route reads itself, once it has authenticated the caller.

FastAPI parses and validates a declared body before the route or its dependencies run, so a caller with
no credential would learn from a 400 what a body must be. The onboarding routes therefore take their body
through here, after the token check: the same JSON rules and the same 400 (`RequestValidationError`, with
its `body...` locations), only later. `openapi_body` documents such a body, which no parameter declares.
"""

from __future__ import annotations

import email.message
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


async def json_body(request: Request, model: type[Model], *, default: Model | None = None) -> Model:
    """The body as `model`; `default` for an empty body (or `null`), where the body is optional. A
    malformed, mistyped or non-JSON body, or a missing required one, is a `RequestValidationError`."""
    raw = await request.body()
    if not raw:
        if default is None:
            raise _refused("missing", "Field required")
        return default
    if not _is_json(request.headers.get("content-type", "")):
        raise _refused("model_attributes_type", "the body must be JSON (Content-Type: application/json)")
    try:
        # the standard library's reader, as FastAPI's own body parsing: it takes a UTF-8 BOM, UTF-16 and
        # UTF-32, and lone surrogate escapes, which pydantic's JSON parser refuses
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refused("json_invalid", f"the body is not JSON: {exc}") from exc
    if default is not None and document is None:
        return default
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from exc


def _is_json(content_type: str) -> bool:
    """`application/json` or `application/<anything>+json`, as FastAPI itself accepts a JSON body."""
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _refused(kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body",), "msg": message, "input": None}])


def openapi_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    """The `openapi_extra` that describes `model` as the JSON body, its nested models written in place
    (the document's `components` hold only what declared parameters use)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inlined(schema, definitions)}},
        }
    }


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inlined(definitions[node["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inlined(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(item, definitions) for item in node]
    return node

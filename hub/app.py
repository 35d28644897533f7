"""The FastAPI application: routers, the uniform error shape, and what every response carries.

- Every error is `{"error": code, "error_description": message}` with a 4xx status; malformed JSON,
  wrong types and unknown paths included (never a 5xx for bad input).
- Every response has `Server-Time` (epoch seconds): gateways often boot with a wrong clock and correct
  it from there.
- Request bodies are bounded (`RequestLimits`); only a release upload may be large.
- Access logs are ours: method, path without the query (a signed URL's signature is a credential) and
  with its control characters escaped (no forged log lines), status.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import agents_api, blobs_api, firmware_api, onboarding_api
from .errors import HubError, PayloadTooLargeError
from .state import HubState
from .texts import escaped

access_log = logging.getLogger("mers.hub.access")

#: paths whose bodies may be as large as `max_release_size`
LARGE_BODY_PATHS = ("/api/firmwaredeployment/v3/releases",)


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "error_description": message}


def create_app(state: HubState) -> FastAPI:
    app = FastAPI(
        title="mers hub",
        version="3",
        summary="Agent Management API v3 (onboarding, OAuth), firmware deployment and signed blob URLs",
    )
    app.state.hub = state
    for module in (agents_api, onboarding_api, firmware_api, blobs_api):
        app.include_router(module.router)
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestLimits, state=state)
    return app


async def _hub_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse(error_body("invalid_request", "; ".join(problems) or "invalid request"), 400)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    status = exc.status_code
    return JSONResponse(
        error_body(codes.get(status, "invalid_request"), str(exc.detail)),
        status_code=status,
        headers=exc.headers,
    )


class RequestLimits:
    """ASGI middleware: bounded bodies, `Server-Time`, and redacted access logs."""

    def __init__(self, app: ASGIApp, state: HubState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        settings = self.state.settings
        limit = settings.max_release_size if path in LARGE_BODY_PATHS else settings.max_request_size
        status_seen: list[int] = []

        async def send_with_time(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"server-time", str(math.floor(self.state.clock())).encode()))
                message = {**message, "headers": headers}
            await send(message)

        declared = _content_length(scope)
        outcome = ""
        try:
            if declared is not None and declared > limit:
                await _send_error(send_with_time, PayloadTooLargeError(f"the body exceeds {limit} bytes"))
            else:
                await self.app(scope, _bounded(receive, limit), send_with_time)
        except ClientDisconnect:
            # the client went away mid-body (an upload cut short): nobody to answer, nothing to report
            # but this line; the endpoint has removed what it had spooled
            outcome = " (client disconnected)"
        except Exception:  # Starlette's outermost layer answers it with a 500
            outcome = " (failed)"
            raise
        except BaseException:  # cancelled (a shutdown past its grace): nothing is answered
            outcome = " (cancelled)"
            raise
        finally:
            # every request gets its line, a failed one too; the path is percent-decoded: escaped,
            # `/x%0A<a line>` would forge a line of the log
            # an exception before the response started becomes Starlette's 500, sent outside this layer
            status = status_seen[0] if status_seen else "500" if outcome == " (failed)" else "-"
            access_log.info("%s %s %s%s", scope["method"], escaped(path), status, outcome)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bounded(receive: Receive, limit: int) -> Receive:
    received = 0

    async def bounded_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLargeError(f"the body exceeds {limit} bytes")
        return message

    return bounded_receive


async def _send_error(send: Send, error: HubError) -> None:
    body = JSONResponse(error_body(error.code, error.message), status_code=error.status)
    await send({"type": "http.response.start", "status": body.status_code, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})

"""The agent's side of the Agent Management API v3: register, renew, the OAuth token endpoint and the
key that verifies access tokens (docs/design.md §6).

Answers that carry credentials are marked `Cache-Control: no-store` (RFC 6749 section 5.1), so no proxy
or client cache keeps a secret. The token endpoint reads its form body itself (`oauth_form`); register
and renew read their JSON body themselves too (`json_body`), once the token is found valid, so a caller
without one gets the 401 whatever it sent, never a 400 telling it what a body must be.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from . import oauth, onboarding
from .auth import State, bearer_token
from .json_body import json_body, openapi_body
from .oauth_form import TOKEN_FORM_SCHEMA, parse_token_request
from .onboarding import RegistrationRequest, RenewalRequest

PREFIX = "/api/agentmanagement/v3"
router = APIRouter(prefix=PREFIX, tags=["onboarding"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=openapi_body(RegistrationRequest, required=False),
)
async def register(request: Request, state: State) -> JSONResponse:
    """Onboard with the IAT of the boarding configuration (`Authorization: Bearer <IAT>`): 201 with the
    credentials, 401 `token_validation_failed` for an expired, used or unknown IAT (whatever the body),
    400 for a bad body, 429 while another registration of the same agent is in progress."""
    iat = bearer_token(request)
    # database and signatures off the event loop, as FastAPI does for the synchronous routes
    registrant = await run_in_threadpool(onboarding.authenticate_iat, state, iat)
    body = await json_body(request, RegistrationRequest, default=RegistrationRequest())
    registration = await run_in_threadpool(onboarding.register, state, registrant, body)
    return JSONResponse(registration.to_json(), status.HTTP_201_CREATED, headers=NO_STORE)


@router.put("/register/{client_id}", openapi_extra=openapi_body(RenewalRequest, required=True))
async def renew(client_id: str, request: Request, state: State) -> JSONResponse:
    """Renew the credentials with the RAT (`Authorization: Bearer <RAT>`): 200 with a full new set, 401
    for a RAT that is not this client's current or previous one (whatever the body), 400 for a bad body,
    409 when a concurrent renewal with the same RAT won (the RAT is then the previous one, still valid).
    The client id in the path has no checks of its own: the RAT must name it, so anything else is the 401
    too, not a 400 telling an unauthenticated caller what a client id looks like."""
    rat = bearer_token(request)
    renewer = await run_in_threadpool(onboarding.authenticate_rat, state, client_id, rat)
    body = await json_body(request, RenewalRequest)
    registration = await run_in_threadpool(onboarding.renew, state, renewer, body)
    return JSONResponse(registration.to_json(), headers=NO_STORE)


_TOKEN_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": TOKEN_FORM_SCHEMA}},
    }
}


@router.post("/oauth/token", openapi_extra=_TOKEN_REQUEST_BODY)
async def token(request: Request, state: State) -> JSONResponse:
    """An access token for a client assertion (RFC 7523): 400 `invalid_request` / `invalid_grant`,
    401 `invalid_client`."""
    token_request = parse_token_request(await request.body())
    # database and signatures off the event loop, as FastAPI does for the synchronous routes
    grant = await run_in_threadpool(oauth.grant_access_token, state, token_request)
    return JSONResponse(grant.to_json(), headers=NO_STORE)


@router.get("/oauth/token_key")
def token_key(state: State) -> JSONResponse:
    """The public key that verifies the hub's access tokens."""
    return JSONResponse(oauth.token_key(state.issuer.key))


@router.get("/oauth/token_keys")
def token_keys(state: State) -> JSONResponse:
    return JSONResponse({"keys": [oauth.token_key(state.issuer.key)]})

"""Agent management routes (the operator's side of the Agent Management API v3).

Thin: each route checks the caller, opens one transaction and calls `agents` or `boarding`. Every route
takes the admin token, except reading a data source configuration, which the agent itself may do with
its access token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from . import agents, boarding
from .auth import AdminCaller, AnyCaller, State
from .datasources import DataSourceDocument, stored_form
from .etags import etag_header, if_match_condition
from .models import SecurityProfile
from .texts import storable_text

PREFIX = "/api/agentmanagement/v3"
router = APIRouter(prefix=PREFIX, tags=["agent management"])

#: printable, no control characters, no surrounding blanks (a name is matched exactly)
NAME_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"

#: no control characters: PostgreSQL's text cannot even hold a NUL to compare with
AgentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
IfMatch = Annotated[str | None, Header(alias="If-Match")]


class AgentDraft(BaseModel):
    """The body of `POST /agents` and `PUT /agents/{id}`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=NAME_PATTERN)]
    securityProfile: SecurityProfile
    description: Annotated[str, Field(max_length=2048), AfterValidator(storable_text)] = ""


def _agent_response(agent_json: dict[str, str], status_code: int = 200) -> JSONResponse:
    return JSONResponse(agent_json, status_code, headers=etag_header(int(agent_json["eTag"])))


@router.post("/agents", status_code=status.HTTP_201_CREATED)
def create_agent(draft: AgentDraft, _caller: AdminCaller, state: State) -> JSONResponse:
    """Create an agent (409 `conflict` on a taken name, 409 `limit_reached` beyond `max_agents`)."""
    with state.database.transaction() as session:
        agent = agents.create_agent(
            session,
            name=draft.name,
            profile=draft.securityProfile,
            description=draft.description,
            now=state.clock(),
            max_agents=state.settings.max_agents,
        )
        body = agents.agent_json(agent)
    return _agent_response(body, status.HTTP_201_CREATED)


@router.get("/agents")
def list_agents(
    _caller: AdminCaller,
    state: State,
    page: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    size: Annotated[int, Query(ge=1, le=agents.MAX_PAGE_SIZE)] = 100,
    name: Annotated[str | None, Query(max_length=128, pattern=NAME_PATTERN)] = None,
) -> JSONResponse:
    """Agents, a page at a time; `name` filters by exact name."""
    with state.database.transaction() as session:
        body = agents.list_agents(session, page=page, size=size, name=name).to_json()
    return JSONResponse(body)


@router.get("/agents/{agent_id}")
def get_agent(agent_id: AgentId, _caller: AdminCaller, state: State) -> JSONResponse:
    with state.database.transaction() as session:
        body = agents.agent_json(agents.get_agent(session, agent_id))
    return _agent_response(body)


@router.put("/agents/{agent_id}")
def update_agent(
    agent_id: AgentId, draft: AgentDraft, _caller: AdminCaller, state: State, if_match: IfMatch = None
) -> JSONResponse:
    """Update an agent; `If-Match` with its eTag is required (428 without, 412 when stale)."""
    condition = if_match_condition(if_match)
    with state.database.transaction() as session:
        agent = agents.update_agent(
            session,
            agent_id,
            if_match=condition,
            name=draft.name,
            profile=draft.securityProfile,
            description=draft.description,
            now=state.clock(),
        )
        body = agents.agent_json(agent)
    return _agent_response(body)


@router.delete("/agents/{agent_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_agent(agent_id: AgentId, _caller: AdminCaller, state: State, if_match: IfMatch = None) -> Response:
    """Delete an agent with its configuration and credentials; `If-Match` is required."""
    condition = if_match_condition(if_match)
    with state.database.transaction() as session:
        agents.delete_agent(session, agent_id, if_match=condition)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/agents/{agent_id}/dataSourceConfiguration")
def get_data_source_configuration(agent_id: AgentId, caller: AnyCaller, state: State) -> JSONResponse:
    """Readable by the admin, and by the agent itself with its access token."""
    caller.check_may_act_for(agent_id)
    with state.database.transaction() as session:
        stored = agents.data_source_configuration(session, agent_id)
    return JSONResponse(stored.to_json(), headers=etag_header(stored.etag))


@router.put("/agents/{agent_id}/dataSourceConfiguration")
def put_data_source_configuration(
    agent_id: AgentId,
    document: DataSourceDocument,
    _caller: AdminCaller,
    state: State,
    if_match: IfMatch = None,
) -> JSONResponse:
    """Replace the configuration (validated: see `datasources`); `If-Match` is required."""
    condition = if_match_condition(if_match)
    with state.database.transaction() as session:
        stored = agents.replace_data_source_configuration(
            session, agent_id, stored_form(document), if_match=condition
        )
    return JSONResponse(stored.to_json(), headers=etag_header(stored.etag))


@router.get("/agents/{agent_id}/boarding/configuration")
def get_boarding_configuration(agent_id: AgentId, _caller: AdminCaller, state: State) -> JSONResponse:
    """The boarding configuration, with the agent's IAT (minted on the first request)."""
    with state.database.transaction() as session:
        body = boarding.boarding_configuration(session, state, agent_id).to_json()
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/agents/{agent_id}/boarding/status")
def get_boarding_status(agent_id: AgentId, _caller: AdminCaller, state: State) -> JSONResponse:
    with state.database.transaction() as session:
        body = boarding.boarding_state(session, state, agent_id).to_json()
    return JSONResponse(body)


@router.post("/agents/{agent_id}/boarding/offboard")
def offboard_agent(agent_id: AgentId, _caller: AdminCaller, state: State) -> JSONResponse:
    """Revoke the agent's credentials, RATs and access tokens; a new IAT replaces the old one."""
    with state.database.transaction() as session:
        body = boarding.offboard(session, state, agent_id).to_json()
    return JSONResponse(body)

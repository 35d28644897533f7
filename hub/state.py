"""Everything a request handler needs, loaded once from the hub directory when the server starts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from .database import Database, create_schema, open_engine
from .home import HubHome, HubSettings
from .tokens import Clock, HubKey, TokenIssuer


@dataclass
class HubState:
    home: HubHome
    settings: HubSettings
    database: Database
    issuer: TokenIssuer
    url_secret: bytes
    admin_token_hash: str
    #: the URL devices use to reach this hub, without a trailing slash
    base_url: str
    clock: Clock

    @property
    def blobs(self) -> Path:
        return self.home.blobs

    def close(self) -> None:
        self.database.dispose()


def load_state(home: HubHome, base_url: str, clock: Clock = time.time) -> HubState:
    settings = home.settings()
    base_url = (settings.public_url or base_url).rstrip("/")
    key = HubKey.from_pem(home.read_secret(home.signing_key), source=str(home.signing_key))
    url_secret = home.read_secret(home.url_secret).strip()
    admin_token_hash = home.read_secret(home.admin_token_hash).decode("ascii", "replace").strip()
    engine = open_engine(home.database_url(), create=False)  # the last step: nothing can fail after it
    try:
        create_schema(engine, existing=True)
    except BaseException:
        engine.dispose()
        raise
    return HubState(
        home=home,
        settings=settings,
        database=Database(engine),
        issuer=TokenIssuer(key, base_url, clock),
        url_secret=url_secret,
        admin_token_hash=admin_token_hash,
        base_url=base_url,
        clock=clock,
    )


def hub_state(request: Request) -> HubState:
    """FastAPI dependency: the state of the hub serving this request."""
    state: HubState = request.app.state.hub
    return state

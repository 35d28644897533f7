"""What `mers status` shows: boarding state, profile, credential and token expiry, the last error.

Read from the state files only (no network: status must work while the hub is unreachable), and never a
secret: no IAT, RAT, client secret, access token, key or proxy password.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from typing import Any

from board.interface import Board

from .boarding import current_boarding, refused_iat
from .client import LAST_ERROR_FILE
from .credentials import load_credentials
from .errors import MersError
from .tokens import load_token


@dataclass(frozen=True)
class DeviceStatus:
    # no-boarding-data | not-onboarded | onboarded | onboarded-new-boarding-pending
    # | onboarded-new-boarding-refused | credentials-unreadable
    state: str
    boarding_source: str | None
    boarding_problem: str | None
    credentials_problem: str | None
    client_id: str | None
    profile: str | None
    tenant: str | None
    hub: str | None
    proxy: str | None
    iat_expires_at: str | None
    credentials_expire_at: str | None
    previous_set_kept: bool
    token_expires_at: str | None
    last_error: str | None
    last_error_at: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"{name.replace('_', ' ')}: {value}" for name, value in asdict(self).items() if value is not None
        ]


def device_status(board: Board) -> DeviceStatus:
    boarding, problem = None, None
    try:
        boarding = current_boarding(board)
    except MersError as exc:
        problem = str(exc)
    stored, credentials_problem = None, None
    try:
        stored = load_credentials(board.state)
    except MersError as exc:  # damaged: shown, with everything else, rather than ending the status
        credentials_problem = str(exc)
    token = load_token(board.state)
    if credentials_problem is not None:
        state = "credentials-unreadable"
    elif stored is None:
        state = "not-onboarded" if boarding is not None or problem else "no-boarding-data"
    elif boarding is not None and boarding.iat_id != stored.iat_id:
        # refused: the hub refused its IAT for good and `mers run` set it aside (see `mers.daemon`)
        refused = boarding.iat_id == refused_iat(board)
        state = "onboarded-new-boarding-refused" if refused else "onboarded-new-boarding-pending"
    else:
        state = "onboarded"
    error = _last_error(board)
    network = boarding.network if boarding is not None else None
    return DeviceStatus(
        state=state,
        boarding_source=boarding.source.value if boarding is not None else None,
        boarding_problem=problem,
        credentials_problem=credentials_problem,
        client_id=stored.client_id if stored else boarding.client_id if boarding else None,
        profile=(stored.profile if stored else boarding.profile if boarding else None),
        tenant=stored.tenant if stored else boarding.tenant if boarding else None,
        hub=stored.base_url if stored else boarding.base_url if boarding else None,
        proxy=network.display if network is not None else None,
        iat_expires_at=_iso(boarding.iat_expires_at) if boarding is not None else None,
        credentials_expire_at=_stored_time(stored.current.expires_at) if stored else None,
        previous_set_kept=stored is not None and stored.previous is not None,
        token_expires_at=_stored_time(token.expires_at)
        if token and stored and token.set_id == stored.current.id
        else None,
        last_error=error[1] if error else None,
        last_error_at=error[0] if error else None,
    )


def _last_error(board: Board) -> tuple[str, str] | None:
    raw = board.state.read(LAST_ERROR_FILE)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        return _iso(float(record["at"])) or "", f"{record['kind']}: {record['message']}"
    except (ValueError, KeyError, TypeError, OverflowError, OSError):  # a time past what datetime holds
        return None


def _stored_time(epoch: float) -> str:
    """A stored expiry as a date, or, when it is none (NaN, Infinity, milliseconds taken as seconds by a
    client that did not check them: years past 9999), the stored value marked unusable, in its place:
    status shows damage, and never ends on it."""
    try:
        return _iso(epoch) or ""
    except (ValueError, OverflowError, OSError):
        return f"unusable: {epoch!r} is not a time in epoch seconds"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")

"""The hub's time, as the device best knows it.

Many gateways boot with a wrong clock (no battery-backed RTC, NTP not yet synchronised). Every decision
that compares against a time the hub set (the credentials' 7-day expiry, the 25-hour renewal margin, an
access token's expiry, a client assertion's `iat`/`exp` that the hub checks within a minute) is therefore
made in hub time: the local clock plus the offset learned from the hub's `Server-Time` header (epoch
seconds, on every answer). Until an answer has been seen the offset is unknown, and the client asks the
hub first rather than trust the local clock alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

LocalClock = Callable[[], float]

SERVER_TIME_HEADER = "server-time"  # header names as `HubAnswer` keeps them: lower case


class HubClock:
    """Local time corrected by the offset of the hub's last `Server-Time`."""

    def __init__(self, local: LocalClock = time.time) -> None:
        self._local = local
        self._offset: float | None = None

    @property
    def synchronised(self) -> bool:
        return self._offset is not None

    @property
    def offset(self) -> float | None:
        """Hub time minus local time, in seconds; None until the hub has told its time."""
        return self._offset

    def local(self) -> float:
        return self._local()

    def now(self) -> float:
        """Hub time; before synchronisation the local clock (callers that decide on it synchronise first,
        see `DeviceClient`)."""
        return self._local() + (self._offset or 0.0)

    def observe(self, headers: Mapping[str, str], *, round_trip: float = 0.0) -> None:
        """Learn the offset from an answer's `Server-Time`. The header has whole seconds (floored);
        dating it at the middle of the request's round trip keeps the error within about a second, far
        inside the hub's one-minute assertion leeway. A missing or malformed header (a proxy that strips
        it, a hostile server) changes nothing."""
        value = headers.get(SERVER_TIME_HEADER)
        if value is None:
            return
        try:
            server_time = float(value)
        except ValueError:
            return
        if not math.isfinite(server_time) or server_time <= 0:
            return
        local_then = self._local() - max(round_trip, 0.0) / 2
        self._offset = server_time + 0.5 - local_then

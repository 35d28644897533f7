"""The hub's time, as the device best knows it.

Many gateways boot with a wrong clock (no battery-backed RTC, NTP not yet synchronised). Every decision
that compares against a time the hub set (the credentials' 7-day expiry, the 25-hour renewal margin, an
access token's expiry, a client assertion's `iat`/`exp` that the hub checks within a minute) is therefore
made in hub time, learned from the hub's `Server-Time` header (epoch seconds, on every answer). Until an
answer has been seen hub time is unknown, and the client asks the hub first rather than trust the local
clock alone.

Hub time is the last `Server-Time` plus the time elapsed since, on the monotonic clock, not the wall
clock plus an offset: mers.service does not wait for time synchronisation, so NTP may step the wall clock
(by years on a gateway without an RTC) after the hub's time was learned, and an offset measured against
the old wall clock would move hub time by the same step (a needless renewal, or a missed one). The wall
clock is used only before the first `Server-Time`. Nothing of this is persisted: the monotonic clock
restarts at boot, and every process learns the hub's time afresh before its first decision
(`DeviceClient`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

LocalClock = Callable[[], float]

SERVER_TIME_HEADER = "server-time"  # header names as `HubAnswer` keeps them: lower case


class HubClock:
    """The hub's last `Server-Time` carried forward by the monotonic clock; `local` is the wall clock
    (read only before the first `Server-Time`), `elapsed` a clock no one steps (only its differences
    count)."""

    def __init__(self, local: LocalClock = time.time, elapsed: LocalClock = time.monotonic) -> None:
        self._local = local
        self._elapsed = elapsed
        #: the hub's time at the last `Server-Time`, and the `elapsed` reading at that moment
        self._anchor: tuple[float, float] | None = None

    @property
    def synchronised(self) -> bool:
        return self._anchor is not None

    @property
    def offset(self) -> float | None:
        """Hub time minus local (wall) time now, in seconds; None until the hub has told its time."""
        return None if self._anchor is None else self.now() - self._local()

    def local(self) -> float:
        return self._local()

    def now(self) -> float:
        """Hub time; before synchronisation the local clock (callers that decide on it synchronise first,
        see `DeviceClient`)."""
        if self._anchor is None:
            return self._local()
        hub_then, elapsed_then = self._anchor
        return hub_then + (self._elapsed() - elapsed_then)

    def observe(self, headers: Mapping[str, str], *, round_trip: float = 0.0) -> None:
        """Learn the hub's time from an answer's `Server-Time`. The header has whole seconds (floored);
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
        elapsed_then = self._elapsed() - max(round_trip, 0.0) / 2
        self._anchor = (server_time + 0.5, elapsed_then)

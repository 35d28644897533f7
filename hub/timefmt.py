"""Times on the wire: ISO 8601 in UTC with milliseconds and a `Z`, as the platform's APIs write them."""

from __future__ import annotations

import datetime


def iso(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

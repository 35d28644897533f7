"""Naming serial ports by where they are plugged in, not by the order the kernel found them.

``/dev/ttyUSB3`` today may be ``/dev/ttyUSB0`` after a reboot or a replugged hub, so records that named it
would point at the wrong fixture of the line. udev keeps a link per physical position under
``/dev/serial/by-path``; the station records that link when one resolves to the device it opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

BY_PATH: Final = Path("/dev/serial/by-path")


def stable_path(device: str, by_path: Path = BY_PATH) -> str:
    """The by-path link naming `device`, or `device` itself when there is none (a pseudo-terminal)."""
    real = os.path.realpath(device)
    try:
        links = sorted(by_path.iterdir())
    except OSError:
        return device
    for link in links:
        if os.path.realpath(link) == real:
            return str(link)
    return device

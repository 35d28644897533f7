"""Opening a board by its path: a simulated board's directory or a real gateway's TOML file.

Kept apart from the console (which pulls in the serial and SMP stacks) so that the device's commands,
which open the board on every run, do not pay for importing what only the factory console needs.
"""

from __future__ import annotations

from pathlib import Path

from .gateway import GatewayBoard
from .interface import Board
from .simboard import SimBoard


def open_board(path: Path) -> Board:
    """A simulated board (a directory) or a gateway described by its TOML file."""
    if path.is_dir():
        return SimBoard.open(path)
    return GatewayBoard.from_toml(path)

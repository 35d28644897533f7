"""The serial line between a station and a board, and the optional damage a real one does.

A pseudo-terminal is a perfect line: it ignores the baud rate (200 KB at "9600" arrive in
milliseconds), never flips a bit and is never unplugged. Timeouts, retries and the benchmark's wire-time
figures mean nothing on such a line, so tests and benchmarks put an `ImpairedPort` in front of the
console's port: it paces both directions at a baud rate (8N1: 10 bit times a byte), corrupts or drops
bytes at a given rate from a seeded generator (the same seed gives the same damage), and cuts the line
for good after a number of bytes, as a pulled cable would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from .errors import BoardError

BITS_PER_BYTE: Final = 10  # 8N1: a start bit, eight data bits, a stop bit
_PACING_CHUNK_SECONDS: Final = 0.01  # written in slices of 10 ms of line time, as a UART drains


class Port(Protocol):
    """A byte line: what the console reads requests from and writes answers to."""

    def read(self, timeout: float) -> bytes:
        """Whatever has arrived, waiting at most `timeout` seconds; b"" when nothing came."""
        ...

    def write(self, data: bytes) -> None:
        """Send all of `data` (bytes no one listens to may be discarded, as on a real UART)."""
        ...

    def close(self) -> None: ...


class LineConditionsError(BoardError):
    """A line realism setting out of range."""

    field = "line"


@dataclass(frozen=True)
class LineConditions:
    """How bad the simulated line is. The defaults are a perfect line."""

    baud: int | None = None
    """Pace both directions at ``baud / 10`` bytes a second; None: as fast as the pty goes."""
    corrupt_rate: float = 0.0
    """Probability that a byte arrives changed (to any other value)."""
    drop_rate: float = 0.0
    """Probability that a byte is lost."""
    cut_after: int | None = None
    """After this many bytes have crossed (both directions together) the line is dead for good."""
    seed: int = 0
    """Seeds the damage; the same seed and traffic give the same corrupted and dropped bytes."""

    def __post_init__(self) -> None:
        if self.baud is not None and self.baud <= 0:
            raise LineConditionsError(f"baud rate {self.baud} must be positive", field="baud")
        for name, rate in (("corrupt_rate", self.corrupt_rate), ("drop_rate", self.drop_rate)):
            if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
                raise LineConditionsError(f"{name} {rate} must be at least 0 and below 1", field=name)
        if self.cut_after is not None and self.cut_after < 0:
            raise LineConditionsError(f"cut_after {self.cut_after} must not be negative", field="cut_after")

    @property
    def is_perfect(self) -> bool:
        return self == LineConditions(seed=self.seed)

    def seconds_for(self, size: int) -> float:
        """How long `size` bytes take on this line (0 when it is not paced)."""
        return 0.0 if self.baud is None else size * BITS_PER_BYTE / self.baud


class ByteDamage:
    """Seeded corruption and loss of bytes, one direction's worth (pure: no clock, no I/O)."""

    def __init__(self, corrupt_rate: float, drop_rate: float, rng: random.Random) -> None:
        self._corrupt_rate = corrupt_rate
        self._drop_rate = drop_rate
        self._rng = rng
        self.corrupted = 0
        self.dropped = 0

    def apply(self, data: bytes) -> bytes:
        if not data or (self._corrupt_rate == 0.0 and self._drop_rate == 0.0):
            return data
        out = bytearray()
        for byte in data:
            roll = self._rng.random()
            if roll < self._drop_rate:
                self.dropped += 1
            elif roll < self._drop_rate + self._corrupt_rate:
                self.corrupted += 1
                out.append(byte ^ self._rng.randrange(1, 256))  # a non-zero flip: the byte always changes
            else:
                out.append(byte)
        return bytes(out)


class Pacer:
    """When the bytes of one direction have crossed a line that carries `bytes_per_second`."""

    def __init__(
        self,
        bytes_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._free_at = 0.0

    def carry(self, size: int) -> None:
        """Return once `size` more bytes, started when the line was next free, have fully crossed."""
        start = max(self._free_at, self._clock())
        self._free_at = start + size / self._rate
        delay = self._free_at - self._clock()
        if delay > 0:
            self._sleep(delay)


class Cable:
    """Counts the bytes crossing in both directions and goes dead after the limit (a pulled cable)."""

    def __init__(self, cut_after: int | None) -> None:
        self._remaining = cut_after

    @property
    def is_cut(self) -> bool:
        return self._remaining is not None and self._remaining <= 0

    def carry(self, data: bytes) -> bytes:
        """The part of `data` that crosses before the cut."""
        if self._remaining is None:
            return data
        passed = data[: max(self._remaining, 0)]
        self._remaining -= len(passed)
        return passed


class ImpairedPort:
    """A `Port` that behaves like a real line with the given conditions in front of another port."""

    def __init__(
        self,
        inner: Port,
        conditions: LineConditions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner = inner
        self.conditions = conditions
        self._cable = Cable(conditions.cut_after)
        self.incoming = ByteDamage(conditions.corrupt_rate, conditions.drop_rate, _rng(conditions.seed, "in"))
        self.outgoing = ByteDamage(
            conditions.corrupt_rate, conditions.drop_rate, _rng(conditions.seed, "out")
        )
        self._in_pacer: Pacer | None = None
        self._out_pacer: Pacer | None = None
        self._slice = 1
        if conditions.baud is not None:
            rate = conditions.baud / BITS_PER_BYTE
            self._in_pacer = Pacer(rate, clock, sleep)
            self._out_pacer = Pacer(rate, clock, sleep)
            self._slice = max(1, int(rate * _PACING_CHUNK_SECONDS))

    @property
    def is_cut(self) -> bool:
        return self._cable.is_cut

    def read(self, timeout: float) -> bytes:
        """Bytes as the line delivers them: a pty hands over the station's whole request at once, so
        the read is held until the line would have carried it."""
        data = self._inner.read(timeout)  # read even when cut, so the pty never fills up
        data = self._cable.carry(data)
        if data and self._in_pacer is not None:
            self._in_pacer.carry(len(data))
        return self.incoming.apply(data)

    def write(self, data: bytes) -> None:
        data = self._cable.carry(data)
        if self._out_pacer is None:
            if data:
                self._inner.write(self.outgoing.apply(data))
            return
        for start in range(0, len(data), self._slice):
            piece = data[start : start + self._slice]
            self._out_pacer.carry(len(piece))  # a byte reaches the far end once its bits are sent
            self._inner.write(self.outgoing.apply(piece))

    def close(self) -> None:
        self._inner.close()


def _rng(seed: int, direction: str) -> random.Random:
    # reproducible damage for tests, not secrets: a seeded, non-cryptographic generator is the point
    return random.Random(f"{seed}/{direction}")  # noqa: S311

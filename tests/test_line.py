"""Line realism: pacing at a baud rate, seeded corruption and loss, and a cable that is cut."""

from __future__ import annotations

import math
import os
import random
import select
import threading
import time

import pytest

from board.console import PtyPort
from board.line import (
    ByteDamage,
    Cable,
    ImpairedPort,
    LineConditions,
    LineConditionsError,
    Pacer,
)


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingPort:
    """A port whose far end is a list: what was written, and what is waiting to be read."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.written: list[tuple[float, bytes]] = []
        self.incoming: list[bytes] = []
        self._clock = clock
        self.closed = False

    def read(self, timeout: float) -> bytes:
        return self.incoming.pop(0) if self.incoming else b""

    def write(self, data: bytes) -> None:
        self.written.append((self._clock.now if self._clock else 0.0, data))

    def close(self) -> None:
        self.closed = True


# --- conditions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"baud": 0}, "baud"),
        ({"corrupt_rate": -0.1}, "corrupt_rate"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"corrupt_rate": float("nan")}, "corrupt_rate"),
        ({"cut_after": -1}, "cut_after"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_setting(settings, field):
    with pytest.raises(LineConditionsError) as caught:
        LineConditions(**settings)
    assert caught.value.field == field


def test_a_line_is_perfect_only_without_pacing_damage_or_cut():
    assert LineConditions(seed=7).is_perfect
    assert not LineConditions(baud=9600).is_perfect
    assert not LineConditions(cut_after=0).is_perfect


def test_line_time_is_ten_bits_a_byte():
    assert LineConditions(baud=115200).seconds_for(11520) == pytest.approx(1.0)
    assert LineConditions().seconds_for(11520) == 0.0


# --- damage ---------------------------------------------------------------------------------------------


def test_no_damage_leaves_the_bytes_alone():
    data = bytes(range(256)) * 10
    assert ByteDamage(0.0, 0.0, random.Random(1)).apply(data) == data


def test_the_same_seed_gives_the_same_damage():
    data = os.urandom(5000)
    first = ByteDamage(0.01, 0.01, random.Random("3/in")).apply(data)
    second = ByteDamage(0.01, 0.01, random.Random("3/in")).apply(data)
    assert first == second != data


def test_corruption_changes_bytes_at_about_the_given_rate_and_never_leaves_a_hit_byte_alone():
    data = bytes(200_000)
    damage = ByteDamage(0.001, 0.0, random.Random(5))
    out = damage.apply(data)
    assert len(out) == len(data)
    changed = sum(1 for byte in out if byte != 0)
    assert changed == damage.corrupted
    assert 120 < changed < 280  # 200 expected; about 5 standard deviations either way


def test_loss_removes_bytes_at_about_the_given_rate():
    damage = ByteDamage(0.0, 0.01, random.Random(6))
    out = damage.apply(bytes(100_000))
    assert len(out) == 100_000 - damage.dropped
    assert 800 < damage.dropped < 1200


# --- pacing and the cable -------------------------------------------------------------------------------


def test_the_pacer_releases_bytes_once_the_line_has_carried_them():
    fake = FakeClock()
    pacer = Pacer(1000.0, fake.clock, fake.sleep)
    pacer.carry(500)
    assert fake.now == pytest.approx(100.5)
    pacer.carry(250)  # back to back: the line was busy until now
    assert fake.now == pytest.approx(100.75)


def test_the_pacer_does_not_charge_for_time_the_line_was_idle():
    fake = FakeClock()
    pacer = Pacer(1000.0, fake.clock, fake.sleep)
    pacer.carry(100)
    fake.now += 10.0
    pacer.carry(100)
    assert fake.sleeps == [pytest.approx(0.1), pytest.approx(0.1)]


def test_the_cable_passes_exactly_the_given_number_of_bytes_then_nothing():
    cable = Cable(10)
    assert cable.carry(b"123456") == b"123456"
    assert cable.carry(b"7890abc") == b"7890"
    assert cable.is_cut
    assert cable.carry(b"more") == b""


def test_an_uncut_cable_passes_everything():
    cable = Cable(None)
    assert cable.carry(b"x" * 1000) == b"x" * 1000
    assert not cable.is_cut


def test_an_impaired_port_paces_what_it_writes_in_small_slices_of_line_time():
    fake = FakeClock()
    inner = RecordingPort(fake)
    port = ImpairedPort(inner, LineConditions(baud=9600), clock=fake.clock, sleep=fake.sleep)
    port.write(b"x" * 960)
    assert fake.now == pytest.approx(101.0)  # 960 bytes at 960 bytes a second
    assert b"".join(data for _, data in inner.written) == b"x" * 960
    assert len(inner.written) == math.ceil(960 / 9)  # 10 ms of line time: 9 bytes at 9600 baud
    first_arrival = inner.written[0][0]
    assert first_arrival == pytest.approx(100.0 + 9 / 960)  # a byte arrives once its bits are sent


def test_an_impaired_port_holds_what_it_reads_until_the_line_would_have_carried_it():
    fake = FakeClock()
    inner = RecordingPort(fake)
    inner.incoming.append(b"r" * 480)
    port = ImpairedPort(inner, LineConditions(baud=9600), clock=fake.clock, sleep=fake.sleep)
    assert port.read(0.1) == b"r" * 480
    assert fake.now == pytest.approx(100.5)


def test_a_cut_counts_both_directions_and_then_the_line_is_silent_both_ways():
    inner = RecordingPort()
    port = ImpairedPort(inner, LineConditions(cut_after=10))
    inner.incoming.append(b"request")
    assert port.read(0.1) == b"request"
    port.write(b"answer")
    assert inner.written[-1][1] == b"ans"
    assert port.is_cut
    inner.incoming.append(b"more")
    assert port.read(0.1) == b""
    assert inner.incoming == []  # drained, so a real pty never fills up behind a dead line
    port.write(b"ignored")
    assert [data for _, data in inner.written] == [b"ans"]


def test_an_impaired_port_damages_each_direction_with_its_own_seeded_stream():
    inner = RecordingPort()
    port = ImpairedPort(inner, LineConditions(corrupt_rate=0.05, seed=11))
    data = bytes(2000)
    inner.incoming.append(data)
    read = port.read(0.1)
    port.write(data)
    written = inner.written[0][1]
    assert data not in (read, written)
    assert read != written  # two streams, not one replayed
    assert port.incoming.corrupted == sum(1 for byte in read if byte)


def test_closing_an_impaired_port_closes_the_port_behind_it():
    inner = RecordingPort()
    ImpairedPort(inner, LineConditions(baud=300)).close()
    assert inner.closed


def test_a_paced_pty_really_takes_the_line_time():
    """The point of pacing: a pty alone delivers 2400 bytes at "19200 baud" in microseconds."""
    pty = PtyPort.open()
    station = os.open(pty.path, os.O_RDWR | os.O_NOCTTY)
    try:
        port = ImpairedPort(pty, LineConditions(baud=19200))
        received = bytearray()
        deadline = time.monotonic() + 10

        def drain() -> None:
            while len(received) < 2400 and time.monotonic() < deadline:
                ready, _, _ = select.select([station], [], [], 0.1)
                if ready:
                    received.extend(os.read(station, 4096))

        reader = threading.Thread(target=drain)
        reader.start()
        started = time.monotonic()
        port.write(b"p" * 2400)  # 1.25 s at 19200 baud
        reader.join()
        elapsed = time.monotonic() - started
        assert bytes(received) == b"p" * 2400
        assert elapsed > 1.2  # never faster than the line; no upper bound: a loaded machine is slower
    finally:
        os.close(station)
        pty.close()

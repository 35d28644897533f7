"""The station's parsers under arbitrary input: durations, batch files, SMP frames off a noisy line, and
by-path port names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from board import protocol as wire
from factory.boarding_source import parse_batch
from factory.cli import parse_duration
from factory.errors import BatchFileError
from factory.ports import stable_path
from factory.smp_link import FrameReader
from tests.factory_helpers import boarding_document


@given(st.integers(0, 10**6), st.integers(0, 999), st.sampled_from("smhd"))
def test_a_duration_with_a_unit_is_seconds(whole: int, thousandths: int, unit: str) -> None:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    expected = (whole + thousandths / 1000) * seconds
    assert abs(parse_duration(f"{whole}.{thousandths:03d}{unit}") - expected) <= 1e-9 * max(1.0, expected)
    assert parse_duration(f"{whole}{unit}") == whole * seconds


@given(st.text(max_size=20))
def test_anything_else_is_not_a_duration(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert value >= 0 and text.strip()[-1] in "smhd"


@given(st.lists(st.text(max_size=200), max_size=5))
def test_a_batch_of_arbitrary_lines_is_parsed_or_refused_with_a_batch_error(lines: list[str]) -> None:
    try:
        entries = parse_batch(lines)
    except BatchFileError as error:
        assert "line" in str(error)
        return
    assert entries == {}  # only blank lines parse without a boarding configuration


def test_a_valid_batch_line_round_trips() -> None:
    line = json.dumps({"serial": "GW-1", "agentId": "a1", "boarding": boarding_document("GW-1")})
    [(serial, entry)] = parse_batch([line, ""]).items()
    assert (serial, entry.agent_id, entry.client_id) == ("GW-1", "a1", "agent-GW-1")


def batch_line(claims: dict[str, object], serial: str = "GW-1", agent_id: str = "a1", **content: str) -> str:
    """A batch line whose IAT carries `claims` (over valid ones) and whose content carries `content`."""
    document = boarding_document("GW-1")
    valid = jwt.decode(document["content"]["iat"], options={"verify_signature": False})
    token = jwt.encode(valid | claims, "a hub secret that is long enough to sign", algorithm="HS256")
    document["content"] |= {"iat": token, **content}
    return json.dumps({"serial": serial, "agentId": agent_id, "boarding": document})


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (batch_line({"exp": 10**19}), "exp"),  # an int64 overflow in the records, after the lock
        (batch_line({"exp": float("inf")}), "exp"),
        (batch_line({"exp": float("nan")}), "exp"),
        (batch_line({"exp": -1}), "exp"),
        (batch_line({"jti": "j\nk"}), "jti"),
        (batch_line({"jti": "j" * 257}), "jti"),
        (batch_line({}, agent_id="\ud800"), "agentId"),  # no UTF-8 for the records' hash
        (batch_line({}, agent_id="a" * 129), "agentId"),
        (batch_line({}, serial="GW\x00"), "serial"),
        (batch_line({}, baseUrl="https://hub\udc80.example"), "UTF-8"),
    ],
)
def test_a_value_the_records_could_not_keep_is_refused_with_the_batch(line: str, reason: str) -> None:
    with pytest.raises(BatchFileError, match=f"line 1: .*{reason}"):
        parse_batch([line])


@given(st.lists(st.binary(max_size=600), min_size=1, max_size=4), st.data())
def test_frames_split_anywhere_reassemble_in_order(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(b"".join(wire.frame_lines(message)) for message in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, got, start = FrameReader(), [], 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[start:cut])
        start = cut
    assert got == messages and reader.broken == 0


@given(st.binary(max_size=2000))
def test_line_noise_never_raises_and_never_invents_a_message_after_a_valid_one(noise: bytes) -> None:
    reader = FrameReader()
    reader.feed(noise)
    reader.feed(b"\n")  # whatever the noise left half-done ends here
    message = wire.encode_request(wire.INFO, 7, wire.EmptyRequest().to_cbor())
    assert reader.feed(b"".join(wire.frame_lines(message))) == [message]


def test_a_port_is_recorded_by_its_by_path_link(tmp_path: Path) -> None:
    by_path = tmp_path / "by-path"
    by_path.mkdir()
    device = tmp_path / "ttyUSB3"
    device.write_text("")
    os.symlink(device, by_path / "pci-0000:00:14.0-usb-0:2:1.0-port0")
    assert stable_path(str(device), by_path) == str(by_path / "pci-0000:00:14.0-usb-0:2:1.0-port0")
    assert stable_path("/dev/pts/7", by_path) == "/dev/pts/7"
    assert stable_path("/dev/pts/7", tmp_path / "absent") == "/dev/pts/7"

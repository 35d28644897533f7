"""Frame reassembly from a noisy byte stream, and the dispatch of requests to handlers."""

from __future__ import annotations

import base64
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smp import header as smp_header
from smp import packet as smp_packet

from board import protocol as wire
from board.smp_server import (
    BadCrcError,
    BadFrameError,
    BrokenLineError,
    Dropped,
    FrameError,
    FrameEvent,
    FrameReassembler,
    InterruptedFrameError,
    OversizedFrameError,
    Received,
    RequestRefusedError,
    Route,
    SmpServer,
)


def framed(message: bytes) -> bytes:
    return b"".join(wire.frame_lines(message))


def echo_message(text: str, sequence: int = 1) -> bytes:
    return wire.encode_request(wire.ECHO, sequence, wire.EchoRequest(text).to_cbor())


def received(events: list[FrameEvent]) -> list[bytes]:
    return [event.message for event in events if isinstance(event, Received)]


def dropped(events: list[FrameEvent]) -> list[FrameError]:
    return [event.error for event in events if isinstance(event, Dropped)]


# --- reassembly ------------------------------------------------------------------------------------------


def test_a_frame_of_many_lines_is_reassembled_into_its_message():
    message = echo_message("x" * 1000)
    assert len(list(wire.frame_lines(message))) > 5
    assert received(FrameReassembler().feed(framed(message))) == [message]


def test_a_frame_fed_one_byte_at_a_time_is_reassembled_once_complete():
    message = echo_message("byte by byte")
    reassembler = FrameReassembler()
    events = [event for byte in framed(message) for event in reassembler.feed(bytes([byte]))]
    assert received(events) == [message]


def test_garbage_between_frames_is_skipped_and_counted():
    first, second = echo_message("one", 1), echo_message("two", 2)
    reassembler = FrameReassembler()
    events = reassembler.feed(b"boot log\r\n" + framed(first) + b"\x00\xff noise\n\x04\x14" + framed(second))
    assert received(events) == [first, second]
    assert dropped(events) == []
    assert reassembler.garbage_bytes == len(b"boot log\r\n") + len(b"\x00\xff noise\n\x04\x14")


def test_a_frame_with_a_bad_crc_is_dropped_and_the_next_one_is_received():
    bad = bytearray(framed(echo_message("corrupt me")))
    crc_line_start = bad.rindex(b"\x06\x09") + 2
    bad[crc_line_start + 4] = ord("A") if bad[crc_line_start + 4] != ord("A") else ord("B")
    good = echo_message("fine")
    events = FrameReassembler().feed(bytes(bad) + framed(good))
    assert received(events) == [good]
    assert [type(error) for error in dropped(events)] == [BadCrcError]


def test_a_byte_outside_base64_breaks_the_line_and_its_frame():
    lines = list(wire.frame_lines(echo_message("y" * 300)))
    lines[1] = lines[1][:10] + b"\x01" + lines[1][11:]
    good = echo_message("after")
    events = FrameReassembler().feed(b"".join(lines) + framed(good))
    assert received(events) == [good]
    assert [type(error) for error in dropped(events)] == [BrokenLineError]


def test_a_lost_newline_does_not_cost_the_frame_that_follows():
    first = framed(echo_message("lost newline"))[:-1]
    good = echo_message("next")
    events = FrameReassembler().feed(first + framed(good))
    assert received(events) == [good]


def test_a_line_longer_than_the_limit_is_dropped_before_it_is_stored():
    reassembler = FrameReassembler()
    events = reassembler.feed(b"\x06\x09" + b"A" * 500)
    assert [type(error) for error in dropped(events)] == [BrokenLineError]
    assert len(reassembler._pending) < wire.MAX_LINE_LENGTH


def test_a_frame_cut_short_by_the_next_start_is_dropped_and_the_next_one_received():
    cut = list(wire.frame_lines(echo_message("z" * 400)))[:2]
    good = echo_message("whole")
    events = FrameReassembler().feed(b"".join(cut) + framed(good))
    assert received(events) == [good]
    assert [type(error) for error in dropped(events)] == [InterruptedFrameError]


def test_garbage_between_the_lines_of_a_frame_drops_that_frame():
    lines = list(wire.frame_lines(echo_message("w" * 300)))
    events = FrameReassembler().feed(lines[0] + b"garbage" + b"".join(lines[1:]))
    assert received(events) == []
    assert [type(error) for error in dropped(events)] == [BrokenLineError]


def first_line_announcing(length: int, header: bytes = b"") -> bytes:
    return b"\x06\x09" + base64.b64encode(struct.pack("!H", length) + header) + b"\n"


def test_a_frame_larger_than_the_buffer_is_refused_from_its_first_line():
    header = smp_header.Header(smp_header.OP.WRITE, smp_header.Version.V2, smp_header.Flag(0), 9000, 64, 7, 2)
    reassembler = FrameReassembler(buffer_size=wire.BUFFER_SIZE)
    events = reassembler.feed(first_line_announcing(8 + 9000 + 2, bytes(header) + b"\xa0"))
    (error,) = dropped(events)
    assert isinstance(error, OversizedFrameError)
    assert error.header is not None and error.header.sequence == 7
    # its continuation lines are skipped as garbage, and the next frame is received
    good = echo_message("small")
    assert received(reassembler.feed(b"\x04\x14AAAA\n" * 3 + framed(good))) == [good]


def test_an_oversized_frame_whose_header_disagrees_with_its_length_gets_no_header():
    header = smp_header.Header(smp_header.OP.WRITE, smp_header.Version.V2, smp_header.Flag(0), 5, 64, 7, 2)
    (error,) = dropped(FrameReassembler().feed(first_line_announcing(60000, bytes(header))))
    assert isinstance(error, OversizedFrameError)
    assert error.header is None


@pytest.mark.parametrize("line", [first_line_announcing(3), b"\x06\x09AAA\n", b"\x06\x09\n"])
def test_a_first_line_that_cannot_start_a_frame_is_dropped(line):
    assert [type(error) for error in dropped(FrameReassembler().feed(line))] == [BadFrameError]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_byte_streams_never_raise(chunks):
    reassembler = FrameReassembler()
    for chunk in chunks:
        for event in reassembler.feed(chunk):
            assert isinstance(event, Received | Dropped)
    assert len(reassembler._pending) <= wire.MAX_LINE_LENGTH


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from([b"\x06\x09", b"\x04\x14", b"\n", b"AAAA", b"/w==", b"=", b"\x00", b"Zm9v"]),
        max_size=60,
    )
)
def test_streams_made_of_delimiters_and_base64_never_raise(pieces):
    FrameReassembler().feed(b"".join(pieces))


texts = st.text(max_size=400)
# garbage that looks like framing: delimiters, base64 runs, newlines and noise in any order
line_like_pieces = st.sampled_from(
    [b"\x06\x09", b"\x04\x14", b"\n", b"AAAA", b"QUJD", b"=", b"\x06", b"\xff"]
)
garbage = st.lists(line_like_pieces | st.binary(max_size=8), max_size=12).map(b"".join)
garbage_without_newlines = garbage.map(lambda data: data.replace(b"\n", b""))


@settings(max_examples=200)
@given(
    bodies=st.lists(texts, min_size=1, max_size=5),
    noise=st.lists(garbage_without_newlines, min_size=6, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
)
def test_frames_split_anywhere_and_interleaved_with_garbage_are_all_recovered(bodies, noise, cuts):
    messages = [echo_message(body, index) for index, body in enumerate(bodies)]
    stream = noise[0] + b"".join(framed(message) + noise[i + 1] for i, message in enumerate(messages))
    reassembler = FrameReassembler()
    events: list[FrameEvent] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += reassembler.feed(stream[start : max(start, cut)])
        start = max(start, cut)
    assert received(events) == messages


@settings(max_examples=200)
@given(
    bodies=st.lists(texts, min_size=1, max_size=4),
    noise=st.lists(garbage, min_size=5, max_size=5),
)
def test_garbage_with_newlines_and_delimiters_never_costs_a_frame_that_follows_it(bodies, noise):
    messages = [echo_message(body, index) for index, body in enumerate(bodies)]
    stream = noise[0] + b"".join(framed(message) + noise[i + 1] for i, message in enumerate(messages))
    got = iter(received(FrameReassembler().feed(stream)))
    assert all(message in got for message in messages)  # in order; garbage adds nothing valid


# --- dispatch -------------------------------------------------------------------------------------------


def decode_reply(wire_bytes: bytes) -> tuple[smp_header.Header, dict[str, Any]]:
    decoder = smp_packet.decode()
    next(decoder)
    for line in wire_bytes.splitlines(keepends=True):
        try:
            decoder.send(line)
        except StopIteration as done:
            header, body = wire.decode_message(done.value)
            return header, cbor2.loads(body)
    raise AssertionError("incomplete reply")


def refuse(body: bytes) -> bytes:
    raise RequestRefusedError(wire.ErrorReply(wire.ProvisioningRc.LOCKED, wire.PROVISIONING_GROUP, "locked"))


def crash(body: bytes) -> bytes:
    raise RuntimeError("handler bug")


@pytest.fixture
def server() -> SmpServer:
    def echo(body: bytes) -> bytes:
        return wire.EchoResponse(wire.EchoRequest.from_cbor(body).text).to_cbor()

    return SmpServer(
        {
            (0, 0): Route(wire.Op.WRITE, echo),
            (64, 1): Route(wire.Op.WRITE, refuse),
            (64, 2): Route(wire.Op.WRITE, crash),
        }
    )


def ask(server: SmpServer, message: bytes) -> tuple[smp_header.Header, dict[str, Any]]:
    (reply,) = server.feed(framed(message))
    return decode_reply(reply.wire)


def raw_request(
    op, group, command, body: bytes, sequence=3, version=smp_header.Version.V2, length=None
) -> bytes:
    header = smp_header.Header(
        op, version, smp_header.Flag(0), len(body) if length is None else length, group, sequence, command
    )
    return bytes(header) + body


def test_a_request_is_answered_with_the_response_op_and_the_same_sequence(server):
    header, body = ask(server, echo_message("ping", 42))
    assert body == {"r": "ping"}
    assert (header.op, header.sequence, header.group_id, header.command_id) == (wire.Op.WRITE_RSP, 42, 0, 0)


@pytest.mark.parametrize(
    ("op", "group", "command"),
    [(wire.Op.WRITE, 99, 0), (wire.Op.WRITE, 64, 9), (wire.Op.READ, 0, 0), (wire.Op.WRITE, 0, 7)],
    ids=["unknown group", "unknown command", "wrong op", "os command we do not serve"],
)
def test_an_unsupported_request_is_answered_enotsup(server, op, group, command):
    header, body = ask(server, raw_request(op, group, command, b"\xa0"))
    assert body["rc"] == wire.GenericRc.ENOTSUP
    assert header.sequence == 3


@pytest.mark.parametrize(("group", "command"), [(0, 20), (1, 9), (8, 9), (9, 1), (11, 9)])
def test_a_command_the_smp_library_does_not_know_in_a_group_it_knows_is_answered_enotsup(
    server, group, command
):
    """The library will not build such a header: the request and the answer are read by hand here."""
    layout = struct.Struct("!BBHHBB")
    body = b"\xa0"
    first = (smp_header.Version.V2 << 3) | wire.Op.WRITE
    (reply,) = server.feed(framed(layout.pack(first, 0, len(body), group, 7, command) + body))
    [message] = received(FrameReassembler().feed(reply.wire))
    answer_first, flags, length, answer_group, sequence, answer_command = layout.unpack(message[:8])
    assert (answer_first & 0b111, answer_first >> 3, flags) == (wire.Op.WRITE_RSP, smp_header.Version.V2, 0)
    assert (answer_group, sequence, answer_command, length) == (group, 7, command, len(message) - 8)
    assert cbor2.loads(message[8:])["rc"] == wire.GenericRc.ENOTSUP


def test_a_body_that_does_not_follow_the_schema_is_answered_einval(server):
    _, body = ask(server, raw_request(wire.Op.WRITE, 0, 0, cbor2.dumps({"d": 5})))
    assert body["rc"] == wire.GenericRc.EINVAL
    assert "d must be str" in body["rsn"]


@pytest.mark.parametrize("length", [20, 1])
def test_a_truncated_or_overlong_body_is_answered_einval(server, length):
    _, body = ask(server, raw_request(wire.Op.WRITE, 0, 0, cbor2.dumps({"d": "xyz"}), length=length))
    assert body["rc"] == wire.GenericRc.EINVAL


def test_a_refusal_is_a_group_error_in_version_2_and_a_user_rc_in_version_1(server):
    _, v2 = ask(server, raw_request(wire.Op.WRITE, 64, 1, b"\xa0"))
    assert v2 == {"err": {"group": 64, "rc": wire.ProvisioningRc.LOCKED}, "rsn": "locked"}
    header, v1 = ask(server, raw_request(wire.Op.WRITE, 64, 1, b"\xa0", version=smp_header.Version.V1))
    assert v1 == {"rc": 256 + wire.ProvisioningRc.LOCKED, "rsn": "locked"}
    assert header.version is smp_header.Version.V1


def test_a_handler_that_crashes_costs_one_request_not_the_server(server):
    _, body = ask(server, raw_request(wire.Op.WRITE, 64, 2, b"\xa0"))
    assert body["rc"] == wire.GenericRc.EUNKNOWN
    assert ask(server, echo_message("still here"))[1] == {"r": "still here"}


def test_responses_and_unreadable_headers_are_not_answered(server):
    assert server.feed(framed(raw_request(wire.Op.WRITE_RSP, 0, 0, b"\xa0"))) == []
    unknown_op = bytearray(raw_request(wire.Op.WRITE, 0, 0, b"\xa0"))
    unknown_op[0] = (unknown_op[0] & ~0b111) | 6  # ops are 0 to 3
    assert server.feed(framed(bytes(unknown_op))) == []
    unknown_os_answer = bytearray(raw_request(wire.Op.WRITE_RSP, 0, 0, b"\xa0"))
    unknown_os_answer[7] = 200  # an answer is never answered, whatever its command
    assert server.feed(framed(bytes(unknown_os_answer))) == []
    truncated_answer = raw_request(wire.Op.WRITE_RSP, 0, 0, b"\xa0", length=5)
    assert server.feed(framed(truncated_answer)) == []
    assert server.stats.dropped_frames == 4
    assert ask(server, echo_message("after"))[1] == {"r": "after"}


def test_an_oversized_frame_is_answered_emsgsize_without_being_stored(server):
    body = cbor2.dumps({"d": "x" * wire.BUFFER_SIZE})
    (reply,) = server.feed(framed(raw_request(wire.Op.WRITE, 0, 0, body, sequence=77)))
    header, answer = decode_reply(reply.wire)
    assert answer["rc"] == wire.GenericRc.EMSGSIZE
    assert header.sequence == 77
    assert server.stats.drops_by_kind == {"OversizedFrameError": 1}


def test_the_largest_message_that_fits_the_buffer_is_served(server):
    overhead = len(echo_message(""))
    text = "x" * (wire.MAX_MESSAGE_SIZE - overhead - 2)  # the text's CBOR length grows by two bytes
    message = echo_message(text)
    assert len(message) == wire.MAX_MESSAGE_SIZE
    # the echo answer is as large as the request, so it too just fits
    assert ask(server, message)[1] == {"r": text}

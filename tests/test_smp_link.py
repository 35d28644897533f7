"""The station's serial session on a real pseudo-terminal: which of the messages that arrive while it waits
for an answer it skips, and which it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from board import protocol as wire
from board.console import PtyPort
from factory.errors import BoardProtocolError
from factory.smp_link import SmpLink

ECHO_BODY = wire.EchoRequest("ping").to_cbor()


@pytest.fixture
def line() -> Iterator[tuple[PtyPort, SmpLink]]:
    """The board's end of a pty, written by the test, and a station's session on the other end."""
    pty = PtyPort.open()
    try:
        with SmpLink.open(pty.path, 115200, retries=0) as link:
            yield pty, link
    finally:
        pty.close()


def framed(message: bytes) -> bytes:
    return b"".join(wire.frame_lines(message))


def echoed_request(sequence: int) -> bytes:
    """The station's echo request as a line in echo mode hands it back."""
    return framed(wire.encode_request(wire.ECHO, sequence, ECHO_BODY))


def answer(command: wire.Command, sequence: int, body: bytes) -> bytes:
    request, _ = wire.decode_message(wire.encode_request(command, sequence, b""))
    return framed(wire.encode_response(request, body))


def test_the_echo_of_a_request_is_skipped_and_the_answer_after_it_taken(
    line: tuple[PtyPort, SmpLink],
) -> None:
    pty, link = line
    reply = wire.EchoResponse("ping").to_cbor()
    pty.write(echoed_request(1) + answer(wire.ECHO, 1, reply))
    assert link.call(wire.ECHO, ECHO_BODY) == reply


def test_an_answer_to_another_command_with_the_same_sequence_is_refused(
    line: tuple[PtyPort, SmpLink],
) -> None:
    pty, link = line
    pty.write(echoed_request(1) + answer(wire.RESET, 1, wire.encode_body({})))
    with pytest.raises(BoardProtocolError, match="does not answer echo sequence 1"):
        link.call(wire.ECHO, ECHO_BODY)

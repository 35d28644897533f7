"""The wire format the factory and the board share: schemas, errors, messages, lines, the lock digest."""

from __future__ import annotations

import contextlib
import hashlib
import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from board import protocol as wire
from board.protocol import (
    BoardingHashes,
    BoardingInfo,
    ErrorReply,
    InfoResponse,
    LockRequest,
    LockResponse,
    ProtocolError,
    ProvisioningRc,
    SlotInfo,
    SlotState,
    WriteBoardingChunk,
    WriteBoardingRequest,
    WriteBoardingResponse,
    WriteKeyRequest,
    WriteKeyResponse,
)

digests = st.binary(min_size=32, max_size=32)
uints = st.integers(min_value=0, max_value=2**32)


def hashes_strategy() -> st.SearchStrategy[BoardingHashes]:
    return st.builds(BoardingHashes, digests, digests, st.none() | digests)


def info_strategy() -> st.SearchStrategy[InfoResponse]:
    slot = st.builds(SlotInfo, st.sampled_from(list(SlotState)), st.none() | digests)
    boarding = st.builds(BoardingInfo, hashes_strategy(), st.none() | st.text(), st.none() | uints)
    return st.builds(
        InfoResponse,
        serial_number=st.from_regex(r"[ -~]{1,128}", fullmatch=True),
        vendor=st.text(),
        image_class=st.text(),
        hardware_revision=st.text(),
        locked=st.booleans(),
        slots=st.lists(slot, min_size=3, max_size=3).map(tuple),
        boarding=st.none() | boarding,
        digest=st.none() | digests,
        protocol=uints,
    )


SCHEMAS = {
    wire.EchoRequest: st.builds(wire.EchoRequest, st.text()),
    wire.EchoResponse: st.builds(wire.EchoResponse, st.text()),
    wire.ResetRequest: st.builds(wire.ResetRequest, st.none() | st.sampled_from([0, 1]), st.none() | uints),
    wire.McumgrParameters: st.builds(wire.McumgrParameters, uints, uints),
    wire.EmptyRequest: st.just(wire.EmptyRequest()),
    InfoResponse: info_strategy(),
    WriteKeyRequest: st.builds(WriteKeyRequest, uints, st.binary(), st.none() | digests),
    WriteKeyResponse: st.builds(WriteKeyResponse, uints, digests),
    WriteBoardingRequest: st.builds(WriteBoardingRequest, st.binary(), st.binary(), st.none() | st.binary()),
    WriteBoardingChunk: st.builds(WriteBoardingChunk, st.just(0), st.binary(), uints, st.none() | digests)
    | st.builds(
        WriteBoardingChunk,
        uints.map(lambda off: off + 1),
        st.binary(),
        st.none() | uints,
        st.none() | digests,
    ),
    WriteBoardingResponse: st.builds(WriteBoardingResponse, hashes_strategy(), st.none() | uints)
    | st.builds(WriteBoardingResponse, st.none(), uints),
    LockRequest: st.builds(LockRequest, digests),
    LockResponse: st.builds(LockResponse, digests, st.booleans()),
}


# --- schemas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", list(SCHEMAS), ids=lambda schema: schema.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_every_schema_reads_back_what_it_writes(schema, data):
    value = data.draw(SCHEMAS[schema])
    assert schema.from_cbor(value.to_cbor()) == value


@pytest.mark.parametrize("schema", list(SCHEMAS), ids=lambda schema: schema.__name__)
@settings(max_examples=150)
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes_are_a_schema_or_a_protocol_error_never_anything_else(schema, blob):
    with contextlib.suppress(ProtocolError):
        schema.from_cbor(blob)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**4400, max_value=10**4500)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("schema", list(SCHEMAS), ids=lambda schema: schema.__name__)
@settings(max_examples=150)
@given(
    body=st.dictionaries(
        st.sampled_from(["slot", "key", "d", "off", "data", "len", "digest", "x"]), cbor_values
    )
)
def test_well_formed_cbor_with_wrong_fields_is_a_protocol_error_or_a_message_that_can_be_logged(schema, body):
    """Never anything else; and a message is logged as it is read, so one that decodes must also print
    (an integer too long to print raised far from the decoder, as a traceback in the console's log)."""
    with contextlib.suppress(ProtocolError):
        repr(schema.from_cbor(cbor2.dumps(body)))


@pytest.mark.parametrize("huge", [2**64, -(2**64) - 1, 10**16000], ids=["2^64", "-2^64-1", "16000 digits"])
def test_an_integer_beyond_64_bits_is_refused_in_any_field_at_any_depth(huge):
    with pytest.raises(ProtocolError) as caught:
        WriteKeyRequest.from_cbor(cbor2.dumps({"slot": huge, "key": b"k"}))
    assert caught.value.field == "slot"
    with pytest.raises(ProtocolError) as caught:
        wire.decode_body(cbor2.dumps({"x": [1, {"y": huge}]}))
    assert caught.value.field == "x" and "64 bits" in str(caught.value)
    assert wire.decode_body(cbor2.dumps({"slot": 2**64 - 1, "x": -(2**64)})) == {
        "slot": 2**64 - 1,
        "x": -(2**64),
    }


def test_a_boolean_is_not_accepted_where_the_schema_wants_an_integer():
    with pytest.raises(ProtocolError) as caught:
        WriteKeyRequest.from_cbor(cbor2.dumps({"slot": True, "key": b"k"}))
    assert caught.value.field == "slot"


def test_text_is_not_accepted_where_the_schema_wants_bytes():
    with pytest.raises(ProtocolError) as caught:
        WriteBoardingRequest.from_cbor(cbor2.dumps({"config": "{}", "ca": b"pem"}))
    assert caught.value.field == "config"


def test_a_negative_slot_is_refused():
    with pytest.raises(ProtocolError, match="negative"):
        WriteKeyRequest.from_cbor(cbor2.dumps({"slot": -1, "key": b"k"}))


def test_a_digest_of_the_wrong_length_is_refused():
    with pytest.raises(ProtocolError, match="32 bytes"):
        LockRequest.from_cbor(cbor2.dumps({"digest": b"short"}))


def test_requests_refuse_unknown_fields_so_a_safety_field_is_never_silently_ignored():
    with pytest.raises(ProtocolError, match="unknown fields: key_sha"):
        WriteKeyRequest.from_cbor(cbor2.dumps({"slot": 0, "key": b"k", "key_sha": b"x" * 32}))


def test_responses_ignore_unknown_fields_so_a_newer_board_can_tell_more():
    body = cbor2.loads(WriteKeyResponse(1, b"h" * 32).to_cbor())
    body["firmware"] = "2.0"
    assert WriteKeyResponse.from_cbor(cbor2.dumps(body)) == WriteKeyResponse(1, b"h" * 32)


def test_a_body_with_a_second_cbor_item_after_the_map_is_refused():
    with pytest.raises(ProtocolError, match="after its CBOR map"):
        wire.decode_body(cbor2.dumps({}) + cbor2.dumps({}))


@pytest.mark.parametrize("body", [cbor2.dumps([1, 2]), cbor2.dumps({1: 2}), b"", b"\xff"])
def test_a_body_that_is_not_a_map_with_text_keys_is_refused(body):
    with pytest.raises(ProtocolError):
        wire.decode_body(body)


def test_deeply_nested_cbor_is_a_protocol_error_not_a_crash():
    with pytest.raises(ProtocolError):
        wire.decode_body(b"\x81" * 100_000)


def test_the_first_chunk_must_announce_the_total_length():
    with pytest.raises(ProtocolError) as caught:
        WriteBoardingChunk.from_cbor(cbor2.dumps({"off": 0, "data": b"x"}))
    assert caught.value.field == "len"


def test_write_boarding_bodies_are_told_apart_by_the_offset_field():
    whole = WriteBoardingRequest(b"{}", b"pem", b'{"proxy": 1}')
    assert wire.decode_write_boarding(whole.to_cbor()) == whole
    chunk = whole.chunks(4)[1]
    assert wire.decode_write_boarding(chunk.to_cbor()) == chunk


@settings(max_examples=50)
@given(
    request=st.builds(WriteBoardingRequest, st.binary(), st.binary(), st.none() | st.binary()),
    size=st.integers(min_value=1, max_value=300),
)
def test_chunks_of_a_boarding_request_join_to_its_whole_form_and_carry_its_hash(request, size):
    chunks = request.chunks(size)
    blob = b"".join(chunk.data for chunk in chunks)
    assert blob == request.to_cbor()
    assert [chunk.off for chunk in chunks] == list(range(0, len(blob), size))
    assert chunks[0].total == len(blob)
    assert chunks[0].sha256 == hashlib.sha256(blob).digest()
    assert all(chunk.total is None and chunk.sha256 is None for chunk in chunks[1:])
    assert WriteBoardingRequest.from_cbor(blob) == request


def test_boarding_hashes_are_the_sha256_of_each_part():
    hashes = WriteBoardingRequest(b"config", b"ca", None).hashes()
    assert hashes.config_sha256 == hashlib.sha256(b"config").digest()
    assert hashes.ca_sha256 == hashlib.sha256(b"ca").digest()
    assert hashes.network_sha256 is None


def test_a_write_key_request_built_for_a_key_carries_the_key_hash():
    assert WriteKeyRequest.for_key(2, b"der").key_hash == hashlib.sha256(b"der").digest()


# --- errors ------------------------------------------------------------------------------------------------


def test_a_group_error_is_an_err_map_in_smp_version_2():
    reply = ErrorReply(ProvisioningRc.LOCKED, wire.PROVISIONING_GROUP, "locked")
    body = reply.to_map(wire.SmpVersion.V2)
    assert body == {"err": {"group": 64, "rc": 2}, "rsn": "locked"}
    assert ErrorReply.from_map(body, wire.PROVISIONING_GROUP) == reply


def test_a_group_error_is_a_user_rc_from_256_in_smp_version_1():
    reply = ErrorReply(ProvisioningRc.DIGEST_MISMATCH, wire.PROVISIONING_GROUP)
    body = reply.to_map(wire.SmpVersion.V1)
    assert body == {"rc": 256 + 11}
    assert ErrorReply.from_map(body, wire.PROVISIONING_GROUP) == reply


@pytest.mark.parametrize("version", list(wire.SmpVersion))
def test_a_generic_error_is_an_rc_in_both_versions(version):
    reply = ErrorReply(wire.GenericRc.ENOTSUP, reason="no such command")
    assert reply.to_map(version) == {"rc": 8, "rsn": "no such command"}
    assert ErrorReply.from_map(reply.to_map(version), wire.OS_GROUP) == reply


@pytest.mark.parametrize("body", [{}, {"rc": 0}, {"err": {"group": 64, "rc": 0}}, {"r": "echo"}])
def test_a_success_body_has_no_error(body):
    assert ErrorReply.from_map(body, wire.PROVISIONING_GROUP) is None


def test_an_error_describes_itself_by_name_and_reason():
    assert ErrorReply(7, 64, "not DER").describe() == "INVALID_KEY: not DER"
    assert ErrorReply(8).describe() == "ENOTSUP"
    assert ErrorReply(99, 70).describe() == "group 70 rc 99"


def test_every_provisioning_code_is_distinct_and_ok_is_zero():
    values = [int(code) for code in ProvisioningRc]
    assert len(set(values)) == len(values)
    assert int(ProvisioningRc.OK) == 0


# --- messages and lines ----------------------------------------------------------------------------------


def test_a_request_message_carries_the_command_sequence_and_body_length():
    body = wire.EchoRequest("hi").to_cbor()
    header, decoded = wire.decode_message(wire.encode_request(wire.ECHO, 300, body))
    assert (header.op, header.group_id, header.command_id) == (wire.Op.WRITE, 0, 0)
    assert header.sequence == 300 & 0xFF
    assert header.version is wire.SmpVersion.V2
    assert decoded == body


def test_a_response_echoes_the_request_header_with_the_response_op():
    request, _ = wire.decode_message(wire.encode_request(wire.INFO, 9, b"\xa0", wire.SmpVersion.V1))
    response, body = wire.decode_message(wire.encode_response(request, b"\xa1"))
    assert response.op is wire.Op.READ_RSP
    assert (response.version, response.group_id, response.command_id, response.sequence) == (
        wire.SmpVersion.V1,
        64,
        0,
        9,
    )
    assert body == b"\xa1"


@pytest.mark.parametrize(("cut", "word"), [(-1, "truncated"), (+1, "extra")])
def test_a_body_shorter_or_longer_than_its_header_says_is_refused_with_the_header_kept(cut, word):
    message = wire.encode_request(wire.LOCK, 5, LockRequest(b"d" * 32).to_cbor())
    message = message[:-1] if cut < 0 else message + b"\x00"
    with pytest.raises(wire.BodyLengthError, match=word) as caught:
        wire.decode_message(message)
    assert caught.value.header.sequence == 5


def test_a_station_gets_the_body_of_a_success_and_the_error_of_a_refusal():
    request, _ = wire.decode_message(wire.encode_request(wire.WRITE_KEY, 12, b"\xa0"))
    success = wire.encode_response(request, WriteKeyResponse(0, KEY_A).to_cbor())
    body = wire.decode_answer(wire.WRITE_KEY, 12, success)
    assert isinstance(body, bytes) and WriteKeyResponse.from_cbor(body) == WriteKeyResponse(0, KEY_A)
    refusal = ErrorReply(ProvisioningRc.SLOT_OCCUPIED, 64, "write-once")
    failure = wire.encode_response(request, wire.encode_body(refusal.to_map(wire.SmpVersion.V2)))
    assert wire.decode_answer(wire.WRITE_KEY, 12, failure) == refusal


def test_an_answer_to_another_sequence_or_command_is_not_taken_for_this_one():
    request, _ = wire.decode_message(wire.encode_request(wire.WRITE_KEY, 12, b"\xa0"))
    answer = wire.encode_response(request, b"\xa0")
    with pytest.raises(ProtocolError, match="does not answer"):
        wire.decode_answer(wire.WRITE_KEY, 13, answer)
    with pytest.raises(ProtocolError, match="does not answer"):
        wire.decode_answer(wire.LOCK, 12, answer)
    with pytest.raises(ProtocolError, match="does not answer"):
        wire.decode_answer(wire.WRITE_KEY, 12, wire.encode_request(wire.WRITE_KEY, 12, b"\xa0"))


def test_a_message_shorter_than_a_header_is_refused():
    with pytest.raises(ProtocolError, match="shorter than an SMP header"):
        wire.decode_message(b"\x00\x01")


@settings(max_examples=100)
@given(size=st.integers(min_value=0, max_value=wire.MAX_MESSAGE_SIZE))
def test_no_line_is_longer_than_the_limit_and_wire_size_counts_every_byte(size):
    lines = list(wire.frame_lines(bytes(size)))
    assert all(len(line) <= wire.MAX_LINE_LENGTH for line in lines)
    assert sum(map(len, lines)) == wire.wire_size(size)


def test_wire_size_gives_the_line_time_a_station_must_allow():
    seconds = wire.wire_size(4000) * 10 / 115200
    assert math.isclose(seconds, 0.48, abs_tol=0.02)


def test_the_mcumgr_buffer_size_counts_the_length_and_crc_fields_as_smpclient_does():
    assert wire.MAX_MESSAGE_SIZE == wire.BUFFER_SIZE - 4


def test_each_command_is_listed_once_with_its_request_op():
    pairs = {(command.group, command.command) for command in wire.COMMANDS}
    assert len(pairs) == len(wire.COMMANDS)
    assert wire.INFO.op is wire.Op.READ
    assert wire.MCUMGR_PARAMETERS.op is wire.Op.READ
    assert {command.op for command in (wire.WRITE_KEY, wire.WRITE_BOARDING, wire.LOCK)} == {wire.Op.WRITE}


# --- the lock digest -------------------------------------------------------------------------------------

KEY_A, KEY_B = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
HASHES = BoardingHashes(hashlib.sha256(b"config").digest(), hashlib.sha256(b"ca").digest(), None)


def test_the_lock_digest_is_the_documented_concatenation():
    serial = "GW-0001"
    expected = hashlib.sha256(
        b"mers/board/lock-digest/v1\x00"
        + len(serial).to_bytes(2, "big")
        + serial.encode()
        + b"\x01"
        + KEY_A
        + b"\x00"
        + bytes(32)
        + b"\x01"
        + KEY_B
        + HASHES.config_sha256
        + HASHES.ca_sha256
        + b"\x00"
        + bytes(32)
    ).digest()
    assert wire.lock_digest(serial, [KEY_A, None, KEY_B], HASHES) == expected


def test_the_lock_digest_changes_with_every_input():
    base = wire.lock_digest("GW-1", [KEY_A, None, None], HASHES)
    variants = [
        wire.lock_digest("GW-2", [KEY_A, None, None], HASHES),
        wire.lock_digest("GW-1", [None, KEY_A, None], HASHES),
        wire.lock_digest("GW-1", [KEY_A, KEY_B, None], HASHES),
        wire.lock_digest("GW-1", [KEY_A, None, None], BoardingHashes(KEY_B, HASHES.ca_sha256)),
        wire.lock_digest("GW-1", [KEY_A, None, None], BoardingHashes(HASHES.config_sha256, KEY_B)),
        wire.lock_digest(
            "GW-1", [KEY_A, None, None], BoardingHashes(HASHES.config_sha256, HASHES.ca_sha256, KEY_B)
        ),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_an_absent_network_configuration_differs_from_one_hashing_to_zeros():
    absent = wire.lock_digest("GW-1", [KEY_A, None, None], HASHES)
    zeros = BoardingHashes(HASHES.config_sha256, HASHES.ca_sha256, bytes(32))
    assert wire.lock_digest("GW-1", [KEY_A, None, None], zeros) != absent


def test_the_lock_digest_needs_one_hash_per_key_slot():
    with pytest.raises(ProtocolError, match="3 slots"):
        wire.lock_digest("GW-1", [KEY_A], HASHES)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"slots": []}, "slots"),  # a station would index slots it was not told about
        ({"slots": [{"state": "empty"}] * (wire.KEY_SLOTS + 1)}, "slots"),
        ({"serial": ""}, "serial"),
        ({"serial": "GW-1\nGW-2"}, "serial"),
        ({"serial": "G" * (wire.MAX_SERIAL_NUMBER + 1)}, "serial"),
    ],
)
def test_an_info_answer_with_other_slots_or_an_unusable_serial_is_a_protocol_error(change, field):
    info = InfoResponse("GW-1", "Acme", "gw-100", "r1", False, (SlotInfo(SlotState.EMPTY),) * 3, None)
    body = cbor2.loads(info.to_cbor()) | change
    with pytest.raises(ProtocolError) as caught:
        InfoResponse.from_cbor(cbor2.dumps(body))
    assert caught.value.field == field


def test_a_station_computes_the_lock_digest_from_an_info_answer():
    info = InfoResponse(
        "GW-1",
        "Acme",
        "gw-100",
        "r1",
        False,
        (SlotInfo(SlotState.WRITTEN, KEY_A), SlotInfo(SlotState.EMPTY), SlotInfo(SlotState.EMPTY)),
        BoardingInfo(HASHES, "agent-1", 2_000_000_000),
    )
    assert wire.lock_digest_of(info) == wire.lock_digest("GW-1", [KEY_A, None, None], HASHES)
    assert wire.lock_digest_of(InfoResponse(**{**info.__dict__, "boarding": None})) is None

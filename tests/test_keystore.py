"""The emulated OTP: write-once key slots, revocation, the lock, the counter floor, boarding data, and a file
that is always the old state or the new one."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from board.errors import (
    BoardError,
    BoardingDataError,
    BoardLockedError,
    CorruptStoreError,
    DuplicateKeyError,
    InvalidKeyError,
    KeyRevokedError,
    KeySlotEmptyError,
    KeySlotIndexError,
    LastKeyError,
    NotReadyToLockError,
    SecurityCounterRegressionError,
    WriteOnceError,
)
from board.interface import KEY_SLOT_COUNT, BoardingData, Identity, KeySlotState
from board.keystore import (
    KeyStore,
    KeyStoreState,
    decode_state,
    encode_state,
    trust_for,
    validate_boarding_data,
    with_boarding,
    with_floor,
    with_key,
    with_lock,
    with_revoked,
)
from board.simboard import SimBoard
from signing import verify_image
from signing.errors import ClassMismatchError, RevokedKeyError, SecurityCounterError
from signing.keys import KeyAlgorithm
from tests.board_helpers import boarding, ca_bundle, config, der, iat
from tests.signing_helpers import make_image, signer_for


class PowerCut(BaseException):
    pass


def provisioned() -> KeyStoreState:
    return with_boarding(with_key(KeyStoreState.empty(), 0, der()), boarding())


def new_store(path: Path) -> KeyStore:
    """A key store as a new board gets it: initialised once."""
    store = KeyStore(path)
    store.initialise()
    return store


# --- key slots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_a_key_of_each_supported_algorithm_is_stored_in_mcuboot_form_with_its_hash(algorithm):
    public = signer_for(algorithm).public_key
    state = with_key(KeyStoreState.empty(), 1, public.der)
    slot = state.key_slots[1]
    assert slot.state is KeySlotState.WRITTEN
    assert slot.public_key_der == public.der
    assert slot.key_hash == public.key_hash


def test_writing_the_same_key_again_is_a_success_that_changes_nothing():
    state = with_key(KeyStoreState.empty(), 0, der())
    assert with_key(state, 0, der()) is state


def test_another_key_in_a_written_slot_is_refused_as_write_once():
    state = with_key(KeyStoreState.empty(), 0, der())
    with pytest.raises(WriteOnceError) as caught:
        with_key(state, 0, der(index=1))
    assert caught.value.field == "key_slot"


def test_the_same_key_in_a_second_slot_is_refused_so_revoking_one_copy_cannot_be_bypassed():
    state = with_key(KeyStoreState.empty(), 0, der())
    with pytest.raises(DuplicateKeyError):
        with_key(state, 1, der())


def test_a_revoked_slot_refuses_every_key_even_its_own():
    state = with_revoked(with_key(KeyStoreState.empty(), 0, der()), 0)
    for key in (der(), der(index=1)):
        with pytest.raises(KeyRevokedError):
            with_key(state, 0, key)


def _rsa_spki() -> bytes:
    return signer_for(KeyAlgorithm.RSA3072).public_key.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_der() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    "make_bytes",
    [
        lambda: b"",
        lambda: b"\x30\x82garbage",
        signer_for(KeyAlgorithm.ED25519).public_key.pem,  # right key, PEM form
        _rsa_spki,  # right key, but not the PKCS#1 form MCUboot hashes
        _private_der,
        lambda: (
            rsa.generate_private_key(65537, 2048)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        ),
        lambda: (
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
    ],
    ids=["empty", "garbage", "pem", "rsa-as-spki", "private-key", "rsa-2048", "p-384"],
)
def test_bytes_that_are_not_a_supported_public_key_in_mcuboot_form_are_refused(make_bytes):
    with pytest.raises(InvalidKeyError) as caught:
        with_key(KeyStoreState.empty(), 0, make_bytes())
    assert caught.value.field == "key"


@pytest.mark.parametrize("index", [-1, KEY_SLOT_COUNT, 99])
def test_a_key_slot_index_out_of_range_is_refused(index):
    with pytest.raises(KeySlotIndexError):
        with_key(KeyStoreState.empty(), index, der())
    with pytest.raises(KeySlotIndexError):
        with_revoked(KeyStoreState.empty(), index)


def test_revoking_is_once_and_for_all_and_again_changes_nothing():
    state = with_revoked(with_key(KeyStoreState.empty(), 2, der()), 2)
    assert state.key_slots[2].state is KeySlotState.REVOKED
    assert state.key_slots[2].public_key_der == der()  # kept, so verifiers say "revoked", not "unknown"
    assert with_revoked(state, 2) is state


def test_revoking_an_empty_slot_is_refused():
    with pytest.raises(KeySlotEmptyError):
        with_revoked(KeyStoreState.empty(), 0)


# --- the lock --------------------------------------------------------------------------------------


def test_locking_needs_a_usable_key_and_the_boarding_data():
    with pytest.raises(NotReadyToLockError, match="no usable key"):
        with_lock(with_boarding(KeyStoreState.empty(), boarding()))
    with pytest.raises(NotReadyToLockError, match="no boarding data"):
        with_lock(with_key(KeyStoreState.empty(), 0, der()))
    revoked_only = with_revoked(provisioned(), 0)
    with pytest.raises(NotReadyToLockError, match="no usable key"):
        with_lock(revoked_only)
    assert with_lock(provisioned()).locked


def test_locking_twice_is_a_success_that_changes_nothing():
    locked = with_lock(provisioned())
    assert with_lock(locked) is locked


def test_after_the_lock_keys_and_boarding_data_are_refused_even_when_unchanged():
    locked = with_lock(provisioned())
    with pytest.raises(BoardLockedError) as caught:
        with_key(locked, 0, der())
    assert caught.value.field == "lock"
    with pytest.raises(BoardLockedError):
        with_key(locked, 1, der(index=1))
    with pytest.raises(BoardLockedError):
        with_boarding(locked, boarding())


def test_a_locked_board_may_revoke_a_key_but_never_its_last_usable_one():
    state = with_lock(with_key(provisioned(), 1, der(index=1)))
    state = with_revoked(state, 0)
    assert state.key_slots[0].state is KeySlotState.REVOKED
    with pytest.raises(LastKeyError):
        with_revoked(state, 1)


# --- security counter floor ------------------------------------------------------------------------


def test_the_security_counter_floor_only_rises():
    state = with_floor(KeyStoreState.empty(), 5)
    assert state.security_counter_floor == 5
    assert with_floor(state, 5) is state
    with pytest.raises(SecurityCounterRegressionError) as caught:
        with_floor(state, 4)
    assert caught.value.field == "security_counter"
    for value in (-1, 1 << 32):
        with pytest.raises(SecurityCounterRegressionError):
            with_floor(state, value)


def test_the_security_counter_floor_still_rises_after_the_lock():
    assert with_floor(with_lock(provisioned()), 7).security_counter_floor == 7


# --- boarding data ---------------------------------------------------------------------------------


def test_valid_boarding_data_is_summarised_with_its_client_expiry_and_hashes():
    data = boarding()
    summary = validate_boarding_data(data)
    assert (summary.client_id, summary.tenant, summary.profiles) == ("agent-1", "factory", ("SHARED_SECRET",))
    assert summary.iat_expires_at == 2_000_000_000
    assert summary.iat_id == "iat-1"
    assert len(summary.config_sha256) == len(summary.ca_sha256) == 32
    assert summary.network_sha256 is not None


def test_boarding_data_without_network_and_with_the_rsa_profile_is_valid():
    data = BoardingData(config(clientCredentialProfile=["RSA_3072"]), ca_bundle())
    assert validate_boarding_data(data).network_sha256 is None


def _with_config(raw: bytes) -> BoardingData:
    return BoardingData(raw, ca_bundle())


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_with_config(b"not json"), "config"),
        (_with_config(b"\xff\xfe"), "config"),
        (_with_config(b"[]"), "config"),
        (_with_config(b'{"expiration": 1}'), "config.content"),
        (_with_config(b"[" * 100_000), "config"),
        (_with_config(b" " * 70_000 + b"{}"), "config"),
        (boarding(baseUrl=None), "config.content.baseUrl"),
        (boarding(baseUrl="ftp://hub"), "config.content.baseUrl"),
        (boarding(baseUrl="https://"), "config.content.baseUrl"),
        (boarding(baseUrl="https://[hub.example"), "config.content.baseUrl"),
        (boarding(clientId=None), "config.content.clientId"),
        (boarding(clientId=""), "config.content.clientId"),
        (boarding(tenant=7), "config.content.tenant"),
        (boarding(clientCredentialProfile=None), "config.content.clientCredentialProfile"),
        (boarding(clientCredentialProfile=[]), "config.content.clientCredentialProfile"),
        (boarding(clientCredentialProfile="SHARED_SECRET"), "config.content.clientCredentialProfile"),
        (boarding(clientCredentialProfile=["RSA_2048"]), "config.content.clientCredentialProfile"),
        (boarding(iat=None), "config.content.iat"),
        (boarding(iat="only.two"), "config.content.iat"),
        (boarding(iat="!!!.@@@.###"), "config.content.iat"),
        (boarding(iat=iat("agent-2")), "config.content.iat"),
        (boarding(iat=iat(exp="tomorrow")), "config.content.iat"),
        (BoardingData(config(), b""), "ca_bundle"),
        (
            BoardingData(config(), b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"),
            "ca_bundle",
        ),
        (BoardingData(config(), b"just text"), "ca_bundle"),
        (BoardingData(config(), ca_bundle(), b"{not json"), "network"),
        (BoardingData(config(), ca_bundle(), b'"a string"'), "network"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_invalid_boarding_data_is_refused_naming_the_field(data, field):
    with pytest.raises(BoardingDataError) as caught:
        with_boarding(KeyStoreState.empty(), data)
    assert caught.value.field == field


def test_boarding_data_may_be_replaced_until_the_lock():
    first = with_boarding(KeyStoreState.empty(), boarding())
    second = boarding(iat=iat(jti="iat-2"))
    assert with_boarding(first, second).boarding == second
    assert with_boarding(first, boarding()) is first


# --- transitions as a whole (property) -------------------------------------------------------------

KEYS = [lambda i=i: der(KeyAlgorithm.ED25519, i) for i in range(4)] + [lambda: b"not a key"]

slot_indexes = st.integers(0, KEY_SLOT_COUNT - 1) | st.sampled_from([-1, KEY_SLOT_COUNT])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("key"), slot_indexes, st.integers(0, len(KEYS) - 1)),
        st.tuples(st.just("revoke"), slot_indexes),
        st.tuples(st.just("lock")),
        st.tuples(st.just("floor"), st.integers(-2, 12)),
        st.tuples(st.just("boarding"), st.booleans()),
    ),
    max_size=30,
)

_ORDER = {KeySlotState.EMPTY: 0, KeySlotState.WRITTEN: 1, KeySlotState.REVOKED: 2}


def _apply(state: KeyStoreState, operation: tuple[Any, ...]) -> KeyStoreState:
    kind, *arguments = operation
    if kind == "key":
        return with_key(state, arguments[0], KEYS[arguments[1]]())
    if kind == "revoke":
        return with_revoked(state, arguments[0])
    if kind == "lock":
        return with_lock(state)
    if kind == "floor":
        return with_floor(state, arguments[0])
    return with_boarding(state, boarding() if arguments[0] else boarding(clientId="other"))


def _check_step(before: KeyStoreState, after: KeyStoreState) -> None:
    for old, new in zip(before.key_slots, after.key_slots, strict=True):
        assert _ORDER[new.state] >= _ORDER[old.state], "a key slot went back"
        if old.public_key_der is not None:
            assert new.public_key_der == old.public_key_der, "a written key changed"
    assert after.locked >= before.locked, "the lock was undone"
    assert after.security_counter_floor >= before.security_counter_floor
    if before.locked:
        assert after.boarding == before.boarding
        assert [s.public_key_der for s in after.key_slots] == [s.public_key_der for s in before.key_slots]
    if after.locked:
        assert after.usable_keys and after.boarding is not None
    written = [s.public_key_der for s in after.key_slots if s.public_key_der is not None]
    assert len(written) == len(set(written)), "a key sits in two slots"


@settings(max_examples=300, deadline=None)
@given(plan=operations)
def test_no_sequence_of_operations_undoes_a_write_a_revocation_the_lock_or_the_floor(plan):
    state = KeyStoreState.empty()
    for operation in plan:
        try:
            after = _apply(state, operation)
        except BoardError:
            continue  # a refused operation has no result: the state is the one before
        _check_step(state, after)
        assert _apply(after, operation) == after, "a successful operation is not idempotent"
        state = after
        assert decode_state(encode_state(state), source="test") == state


# --- the file --------------------------------------------------------------------------------------


def test_a_missing_key_store_file_is_an_error_not_a_factory_fresh_board(tmp_path):
    """Deleting the file must not unlock the board or forget a revocation."""
    with pytest.raises(CorruptStoreError, match="missing"):
        KeyStore(tmp_path / "otp.json").read()
    with pytest.raises(CorruptStoreError, match="missing"):
        KeyStore(tmp_path / "otp.json").update(lambda state: with_key(state, 0, der()))
    assert not (tmp_path / "otp.json").exists()


def test_an_initialised_key_store_starts_empty_and_a_second_initialise_changes_nothing(tmp_path):
    store = KeyStore(tmp_path / "otp.json")
    store.initialise()
    assert store.read() == KeyStoreState.empty()
    store.update(lambda state: with_key(state, 0, der()))
    store.initialise()
    assert store.read().key_slots[0].state is KeySlotState.WRITTEN


def test_the_key_store_file_holds_every_change_and_is_0600(tmp_path):
    store = new_store(tmp_path / "otp.json")
    store.update(lambda s: with_key(s, 0, der()))
    store.update(lambda s: with_boarding(s, boarding()))
    store.update(with_lock)
    store.update(lambda s: with_floor(s, 3))
    reopened = KeyStore(tmp_path / "otp.json").read()
    assert reopened.locked and reopened.security_counter_floor == 3
    assert reopened.key_slots[0].public_key_der == der()
    assert reopened.boarding == boarding()
    assert os.stat(tmp_path / "otp.json").st_mode & 0o777 == 0o600


def test_a_refused_or_unchanged_operation_does_not_touch_the_file(tmp_path):
    store = new_store(tmp_path / "otp.json")
    store.update(lambda s: with_key(s, 0, der()))
    before = os.stat(tmp_path / "otp.json")
    store.update(lambda s: with_key(s, 0, der()))
    with pytest.raises(WriteOnceError):
        store.update(lambda s: with_key(s, 0, der(index=1)))
    after = os.stat(tmp_path / "otp.json")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_a_crash_before_the_rename_leaves_the_previous_key_store_whole(tmp_path, monkeypatch):
    store = new_store(tmp_path / "otp.json")
    store.update(lambda s: with_key(s, 0, der()))
    previous = (tmp_path / "otp.json").read_bytes()

    def crash(source, destination):
        raise PowerCut

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PowerCut):
        store.update(lambda s: with_boarding(s, boarding()))
    monkeypatch.undo()
    assert (tmp_path / "otp.json").read_bytes() == previous
    assert store.read().boarding is None
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.replace('"locked": true', '"locked": false'),
        lambda text: text[: len(text) // 2],
        lambda text: "",
        lambda text: "[]",
        lambda text: text.replace('"state": "revoked"', '"state": "written"'),
    ],
    ids=["unlocked-by-hand", "truncated", "empty", "not-an-object", "unrevoked-by-hand"],
)
def test_a_damaged_key_store_is_an_error_never_a_reset(tmp_path, damage):
    store = new_store(tmp_path / "otp.json")
    store.update(lambda s: with_key(s, 1, der(index=1)))
    store.update(lambda s: with_lock(with_boarding(with_key(s, 0, der()), boarding())))
    store.update(lambda s: with_revoked(s, 1))
    path = tmp_path / "otp.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(CorruptStoreError):
        store.read()
    with pytest.raises(CorruptStoreError):
        store.update(lambda s: with_floor(s, 1))


def test_concurrent_writers_never_lose_each_others_keys(tmp_path):
    path = new_store(tmp_path / "otp.json").path
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            for _ in range(5):
                KeyStore(path).update(lambda s: with_key(s, index, der(index=index)))
                KeyStore(path).update(lambda s: with_floor(s, max(s.security_counter_floor, index)))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(KEY_SLOT_COUNT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    state = KeyStore(path).read()
    assert all(slot.state is KeySlotState.WRITTEN for slot in state.key_slots)
    assert state.security_counter_floor == KEY_SLOT_COUNT - 1


# --- what a verifier trusts ------------------------------------------------------------------------


def test_the_trust_of_a_board_names_its_revoked_keys_floor_and_hardware(tmp_path):
    board = SimBoard.create(tmp_path / "gw", Identity("SN-1", "Acme", "gw-100", "B"), slot_size=1 << 16)
    signer = signer_for(KeyAlgorithm.ED25519, 0)
    image = make_image(tmp_path, [signer], vendor="Acme", image_class="gw-100", security_counter=4)
    board.write_key(0, signer.public_key.der)
    board.write_key(1, der(index=1))
    board.raise_security_counter_floor(4)
    trust = trust_for(board, slot_size=1 << 16)
    assert (trust.min_security_counter, trust.slot_size) == (4, 1 << 16)
    assert verify_image(image, trust).signed_by == (signer.public_key.key_hash,)
    board.raise_security_counter_floor(5)
    with pytest.raises(SecurityCounterError):
        verify_image(image, trust_for(board))
    board.revoke_key(0)
    with pytest.raises(RevokedKeyError):
        verify_image(image, dataclasses.replace(trust_for(board), min_security_counter=0))
    other = SimBoard.create(tmp_path / "gw2", Identity("SN-2", "Acme", "gw-200", ""), slot_size=1 << 16)
    other.write_key(0, signer.public_key.der)
    with pytest.raises(ClassMismatchError):
        verify_image(image, trust_for(other))


def test_key_store_files_of_other_formats_are_refused(tmp_path):
    path = Path(tmp_path / "otp.json")
    body = {"format": "something-else", "version": 1}
    path.write_text(json.dumps(body))
    with pytest.raises(CorruptStoreError):
        KeyStore(path).read()


def test_the_temporary_file_of_a_writer_killed_before_its_rename_is_swept_by_the_next_update(tmp_path):
    store = new_store(tmp_path / "otp.json")
    debris = tmp_path / ".otp.json.abc123.tmp"
    debris.write_bytes(b"half a key store")
    unrelated = tmp_path / ".other.json.abc123.tmp"
    unrelated.write_bytes(b"not ours")
    store.update(lambda state: with_key(state, 0, der()))
    assert not debris.exists()
    assert unrelated.exists()
    assert store.read().key_slots[0].state is KeySlotState.WRITTEN


@pytest.mark.parametrize("expires", [float("nan"), float("inf"), float("-inf")])
def test_an_iat_whose_expiry_is_not_a_finite_number_is_invalid_boarding_data(expires):
    with pytest.raises(BoardingDataError, match="finite"):
        validate_boarding_data(boarding(iat=iat(exp=expires)))


def test_a_lock_check_sees_exactly_what_is_sealed_and_can_refuse_it(tmp_path):
    store = new_store(tmp_path / "otp.json")
    store.update(lambda state: with_boarding(with_key(state, 0, der()), boarding()))
    seen: list[tuple[object, object]] = []

    def refuse(slots: object, sealed: object) -> None:
        seen.append((slots, sealed))
        raise NotReadyToLockError("the station wrote something else")

    with pytest.raises(NotReadyToLockError):
        store.update(lambda state: with_lock(state, refuse))
    assert not store.read().locked
    assert seen == [(store.read().key_slots, store.read().boarding)]
    store.update(lambda state: with_lock(state, lambda slots, sealed: None))
    assert store.read().locked

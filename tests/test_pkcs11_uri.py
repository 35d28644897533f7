"""RFC 7512 PKCS#11 URIs: strict parsing, percent-decoding, and a PIN that never leaks into messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing.errors import Pkcs11Error
from signing.pkcs11_uri import ObjectType, Pkcs11Uri, parse_pkcs11_uri


def test_every_supported_attribute_is_parsed_and_decoded() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=Release%20HSM;manufacturer=Snake%20Oil,%20Inc.;serial=4a25;model=v2;"
        "object=fw%2Fkey;id=%01%a0%FF;type=private?pin-value=12%2634&module-path=/usr/lib/p11.so"
    )
    assert uri == Pkcs11Uri(
        token="Release HSM",
        manufacturer="Snake Oil, Inc.",
        serial="4a25",
        model="v2",
        object="fw/key",
        id=b"\x01\xa0\xff",
        type=ObjectType.PRIVATE,
        pin_value="12&34",
        module_path="/usr/lib/p11.so",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkcs11:", Pkcs11Uri()),
        ("PKCS11:object=k", Pkcs11Uri(object="k")),
        ("pkcs11:object=my-pubkey;type=public", Pkcs11Uri(object="my-pubkey", type=ObjectType.PUBLIC)),
        ("pkcs11:object=k?pin-source=file:/etc/token", Pkcs11Uri(object="k", pin_source="file:/etc/token")),
        ("pkcs11:token=a&b;object=x=y", Pkcs11Uri(token="a&b", object="x=y")),
        ("pkcs11:object=k?", Pkcs11Uri(object="k")),
        ("pkcs11:token=;serial=", Pkcs11Uri(token="", serial="")),
        ("pkcs11:object=%C3%A9t%C3%A9", Pkcs11Uri(object="été")),
        ("pkcs11:id=", Pkcs11Uri(id=b"")),
        ("pkcs11:?module-path=/a/b?c|d", Pkcs11Uri(module_path="/a/b?c|d")),
    ],
)
def test_valid_uris_parse_as_rfc_7512_says(text: str, expected: Pkcs11Uri) -> None:
    assert parse_pkcs11_uri(text) == expected


def test_rfc_7512_example_with_a_binary_id_parses() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
        "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
        "?pin-source=file:/etc/token_pin"
    )
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.id == bytes.fromhex("69953e5cf4bdec91")
    assert uri.type is ObjectType.CERT
    assert uri.serial == ""
    assert uri.pin_source == "file:/etc/token_pin"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("object=k", "must start with 'pkcs11:'"),
        ("https://example.com/", "must start with 'pkcs11:'"),
        ("pkcs11:object", "has no value"),
        ("pkcs11:=k", "has no value"),
        ("pkcs11:object=k;", "has no value"),
        ("pkcs11:object=a;object=b", "'object' appears twice"),
        ("pkcs11:object=k?pin-value=1&pin-value=2", "'pin-value' appears twice"),
        ("pkcs11:object=a%2", "bad percent-encoding '%2' in object"),
        ("pkcs11:object=a%zz", "bad percent-encoding '%zz' in object"),
        ("pkcs11:object=my key", "' ' in object must be written %20"),
        ("pkcs11:object=a/b", "'/' in object must be written %2F"),
        ("pkcs11:object=a#frag", "'#' in object must be written %23"),
        ("pkcs11:object=clé", "'é' in object must be written %C3%A9"),
        ("pkcs11:object=%ff%fe", "object is not UTF-8 text"),
        ("pkcs11:type=secret", "unknown PKCS#11 object type 'secret'"),
        ("pkcs11:type=", "unknown PKCS#11 object type ''"),
        ("pkcs11:colour=blue", "unknown PKCS#11 URI path attribute 'colour'"),
        ("pkcs11:Object=k", "unknown PKCS#11 URI path attribute 'Object'"),
        ("pkcs11:x-vendor=1", "unknown PKCS#11 URI path attribute 'x-vendor'"),
        ("pkcs11:object=k?token=T", "unknown PKCS#11 URI query attribute 'token'"),
        ("pkcs11:slot-id=1", "'slot-id' is not supported"),
        ("pkcs11:object=k?module-name=softhsm2", "'module-name' is not supported"),
        ("pkcs11:object=k?pin-value=1&pin-source=/f", "both pin-value and pin-source"),
    ],
)
def test_malformed_uris_are_refused_with_a_message_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(Pkcs11Error, match=re.escape(message)):
        parse_pkcs11_uri(text)


def test_a_malformed_pin_value_is_never_quoted_in_the_message() -> None:
    for text in ("pkcs11:object=k?pin-value=sec ret", "pkcs11:object=k?pin-value=sec%zzret"):
        with pytest.raises(Pkcs11Error) as caught:
            parse_pkcs11_uri(text)
        assert "sec" not in str(caught.value)
        assert "zz" not in str(caught.value)


def test_the_pin_never_appears_in_the_repr_of_a_parsed_uri() -> None:
    uri = parse_pkcs11_uri("pkcs11:object=k?pin-value=s3cr3t")
    assert uri.pin_value == "s3cr3t"
    assert "s3cr3t" not in repr(uri)


_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_PATH_RAW_OK = set(_UNRESERVED + ":[]@!$'()*+,=&")
_QUERY_RAW_OK = set(_UNRESERVED + ":[]@!$'()*+,=/?|")


def _encode(data: bytes, raw_ok: set[str], draw: Callable[[st.SearchStrategy[Any]], Any]) -> str:
    """An independent RFC 7512 encoder: each byte either left alone (when the grammar allows) or
    percent-encoded in upper or lower case, as the draw decides."""
    out = []
    for byte in data:
        char = chr(byte)
        if char in raw_ok and draw(st.booleans()):
            out.append(char)
        else:
            hex_pair = f"{byte:02x}"
            out.append("%" + (hex_pair.upper() if draw(st.booleans()) else hex_pair))
    return "".join(out)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    token=st.none() | st.text(),
    label=st.none() | st.text(),
    key_id=st.none() | st.binary(max_size=40),
    object_type=st.none() | st.sampled_from(ObjectType),
    pin=st.none() | st.text(),
    module=st.none() | st.text(min_size=1),
)
def test_any_encoded_uri_parses_back_to_the_same_attributes(
    data: st.DataObject,
    token: str | None,
    label: str | None,
    key_id: bytes | None,
    object_type: ObjectType | None,
    pin: str | None,
    module: str | None,
) -> None:
    draw = data.draw
    path = []
    if token is not None:
        path.append("token=" + _encode(token.encode(), _PATH_RAW_OK, draw))
    if label is not None:
        path.append("object=" + _encode(label.encode(), _PATH_RAW_OK, draw))
    if key_id is not None:
        path.append("id=" + _encode(key_id, _PATH_RAW_OK, draw))
    if object_type is not None:
        path.append("type=" + object_type.value)
    query = []
    if pin is not None:
        query.append("pin-value=" + _encode(pin.encode(), _QUERY_RAW_OK, draw))
    if module is not None:
        query.append("module-path=" + _encode(module.encode(), _QUERY_RAW_OK, draw))
    path = draw(st.permutations(path))
    text = "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")

    assert parse_pkcs11_uri(text) == Pkcs11Uri(
        token=token, object=label, id=key_id, type=object_type, pin_value=pin, module_path=module
    )


@settings(max_examples=500)
@given(rest=st.text(alphabet=st.sampled_from(sorted(_QUERY_RAW_OK | set("%;#= é\x00"))), max_size=60))
def test_arbitrary_text_after_the_scheme_parses_or_raises_only_pkcs11_error(rest: str) -> None:
    try:
        parse_pkcs11_uri("pkcs11:" + rest)
    except Pkcs11Error as error:
        assert "\n" not in str(error)

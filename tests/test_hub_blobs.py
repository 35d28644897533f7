"""Blob downloads by signed URL against a real hub (refusals, ranges, HEAD, a large streamed download),
and the pure `Range`/`If-Range` rules they rest on."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from hub.byte_ranges import ByteRange, Unsatisfiable, requested_range
from hub.etags import condition_names
from hub.signed_urls import BlobUrlSigner
from signing.keys import KeyAlgorithm
from tests.firmware_helpers import Published, get, publish, upload
from tests.hub_helpers import FIRMWARE, RunningHub, running_hub
from tests.signing_helpers import make_image, signer_for


@pytest.fixture
def published(hub: RunningHub, tmp_path: Path) -> Published:
    return publish(hub, tmp_path)


#: a hub with a published release, shared by the tests that only read (none moves its clock)
Served = tuple[RunningHub, Published]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("blobs")
    with running_hub(root / "hub") as hub:
        yield hub, publish(hub, root)


def with_query(uri: str, **changes: str) -> str:
    parts = urlsplit(uri)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.update(changes)
    text = "&".join(f"{name}={value}" for name, value in query.items() if value != "-")
    return parts._replace(query=text).geturl()


def head(hub: RunningHub, uri: str, headers: dict[str, str]) -> requests.Response:
    return hub.http.head(uri, verify=str(hub.ca), timeout=30, headers=headers)


def assert_refused(response: requests.Response, reason: str) -> None:
    status, body = response.status_code, response.json()
    assert status == 403, body
    assert body["error"] == "forbidden"
    assert reason in body["error_description"]
    assert "sig=" not in response.text


# --- whole downloads ------------------------------------------------------------------------------


def test_the_artifact_of_a_task_downloads_with_its_url_alone(served: Served) -> None:
    hub, published = served
    artifact = published.task["artifacts"][0]
    assert artifact["uri"].startswith(f"{hub.url}/blobs/{published.release['sha256']}?expires=")
    response = get(hub, artifact["uri"])
    assert response.status_code == 200
    assert response.content == published.image
    assert artifact["checksum"] == "sha256:" + hashlib.sha256(response.content).hexdigest()
    assert artifact["size"] == len(response.content)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == f'"{published.release["sha256"]}"'
    assert response.headers["Content-Length"] == str(len(published.image))
    assert response.headers["Content-Type"] == "application/octet-stream"


def test_head_answers_the_headers_of_a_download_without_its_body(served: Served) -> None:
    hub, published = served
    response = hub.http.head(published.uri, verify=str(hub.ca), timeout=30)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Content-Length"] == str(len(published.image))
    assert response.headers["ETag"] == f'"{published.release["sha256"]}"'
    ranged = hub.http.head(published.uri, verify=str(hub.ca), timeout=30, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(published.image)}"


def test_a_large_image_streams_with_memory_that_does_not_grow_with_its_size(
    hub: RunningHub, tmp_path: Path
) -> None:
    payload = os.urandom(64 << 20)
    published = publish(hub, tmp_path, payload=payload)
    digest = hashlib.sha256()
    received = 0
    tracemalloc.start()
    try:
        with get(hub, published.uri, stream=True) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(1 << 16):
                digest.update(chunk)
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == published.release["size"]
    assert "sha256:" + digest.hexdigest() == published.task["artifacts"][0]["checksum"]
    assert peak < 24 << 20, f"peak {peak >> 20} MiB for a {len(payload) >> 20} MiB image"


def test_a_client_that_stops_reading_holds_little_of_the_servers_memory(
    hub: RunningHub, tmp_path: Path
) -> None:
    """Eight downloads that take a little and then stall, as gateways on slow links do: what the server
    holds for them (the chunk in hand and its encrypted copy, waiting in the transport) is bounded by the
    chunk size. With 4 MiB chunks that was about 15 MiB a client, enough for a fleet to exhaust a hub."""
    published = publish(hub, tmp_path, payload=os.urandom(48 << 20))
    tracemalloc.start()
    responses: list[requests.Response] = []
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            response = get(hub, published.uri, stream=True)
            responses.append(response)
            assert response.status_code == 200 and response.raw.read(1 << 16)
        held = _steady(lambda: tracemalloc.get_traced_memory()[0] - baseline)
    finally:
        for response in responses:
            response.close()
        tracemalloc.stop()
    # about 18 MiB at 1 MiB chunks, 70 MiB at 4 MiB chunks
    assert held < 8 * (4 << 20), f"{held >> 20} MiB held for 8 stalled clients"


def _steady(measure: Callable[[], int], deadline_s: float = 20.0) -> int:
    """`measure()` once it has stopped growing for half a second: the server sends until each stalled
    connection's kernel buffers are full, then waits."""
    deadline = time.monotonic() + deadline_s
    samples = [measure()]
    while len(samples) < 5 or max(samples[-5:]) - min(samples[-5:]) > 64 << 10:
        assert time.monotonic() < deadline, f"still growing: {[value >> 20 for value in samples[-5:]]} MiB"
        time.sleep(0.1)
        samples.append(measure())
    return samples[-1]


# --- ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=100-199", 100, 200),
        ("bytes=4000-", 4000, None),
        ("bytes=-50", -50, None),
        ("bytes=0-0", 0, 1),
        ("bytes=1-" + "0" * 28 + "2", 1, 3),
    ],
)
def test_a_single_range_is_a_partial_response(
    served: Served, header: str, start: int, stop: int | None
) -> None:
    hub, published = served
    response = get(hub, published.uri, headers={"Range": header})
    expected = published.image[start:stop]
    size = len(published.image)
    first = start % size
    assert response.status_code == 206
    assert response.content == expected
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{size}"
    assert response.headers["Content-Length"] == str(len(expected))


def test_a_resumed_download_reassembles_the_image(served: Served) -> None:
    hub, published = served
    size = len(published.image)
    parts = [
        get(hub, published.uri, headers={"Range": f"bytes={start}-{start + 999}"}).content
        for start in range(0, size, 1000)
    ]
    assert b"".join(parts) == published.image


def test_if_range_with_the_current_etag_honours_the_range(served: Served) -> None:
    hub, published = served
    etag = f'"{published.release["sha256"]}"'
    response = get(hub, published.uri, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert response.status_code == 206
    assert response.content == published.image[10:20]


@pytest.mark.parametrize("if_range", ['"another"', "W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_if_range_naming_anything_else_sends_the_whole_blob(served: Served, if_range: str) -> None:
    hub, published = served
    etag = f'"{published.release["sha256"]}"'
    response = get(
        hub, published.uri, headers={"Range": "bytes=10-19", "If-Range": if_range.format(etag=etag)}
    )
    assert response.status_code == 200
    assert response.content == published.image


@pytest.mark.parametrize("header", ["bytes=5000000-", "bytes=-0"])
def test_a_range_past_the_end_is_not_satisfiable(served: Served, header: str) -> None:
    hub, published = served
    response = get(hub, published.uri, headers={"Range": header})
    assert response.status_code == 416
    assert response.json()["error"] == "range_not_satisfiable"
    assert response.headers["Content-Range"] == f"bytes */{len(published.image)}"


@pytest.mark.parametrize("header", ["bytes=20-10", "lines=1-2", "bytes=a-b", "bytes=0-1,5-9", "bytes=-"])
def test_a_range_that_is_not_one_well_formed_byte_range_is_ignored(served: Served, header: str) -> None:
    hub, published = served
    response = get(hub, published.uri, headers={"Range": header})
    assert response.status_code == 200
    assert response.content == published.image


@pytest.mark.parametrize("if_none_match", ["{etag}", "W/{etag}", 'W/"x,y", {etag}', "*"])
def test_if_none_match_naming_the_blob_is_not_modified(served: Served, if_none_match: str) -> None:
    """RFC 9110 section 13.1.2: a GET whose `If-None-Match` names the blob (weakly) is a 304 without a
    body, before any `Range` is looked at, and still carries the ETag."""
    hub, published = served
    etag = f'"{published.release["sha256"]}"'
    headers = {"If-None-Match": if_none_match.format(etag=etag), "Range": "bytes=0-9"}
    for response in (get(hub, published.uri, headers=headers), head(hub, published.uri, headers)):
        assert response.status_code == 304, response.text
        assert response.content == b""
        assert response.headers["ETag"] == etag


def test_if_none_match_naming_other_tags_sends_the_blob(served: Served) -> None:
    hub, published = served
    response = get(hub, published.uri, headers={"If-None-Match": '"other", W/"a,b"'})
    assert response.status_code == 200
    assert response.content == published.image


@pytest.mark.parametrize("if_match", ['"other"', "W/{etag}", "{sha256}"])
def test_an_if_match_not_naming_the_blob_strongly_fails(served: Served, if_match: str) -> None:
    """RFC 9110 section 13.1.1: a failed `If-Match` is a 412, never the bytes of a blob the client did not
    expect."""
    hub, published = served
    sha256 = published.release["sha256"]
    header = if_match.format(etag=f'"{sha256}"', sha256=sha256)
    response = get(hub, published.uri, headers={"If-Match": header, "Range": "bytes=0-9"})
    assert response.status_code == 412, response.text
    assert response.json()["error"] == "precondition_failed"


@pytest.mark.parametrize("if_match", ["{etag}", '"other", {etag}', "*"])
def test_if_match_naming_the_blob_lets_the_download_go_on(served: Served, if_match: str) -> None:
    hub, published = served
    header = if_match.format(etag=f'"{published.release["sha256"]}"')
    response = get(hub, published.uri, headers={"If-Match": header, "Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.content == published.image[:10]


def test_a_precondition_is_not_evaluated_for_a_refused_url(served: Served) -> None:
    hub, published = served
    forged = with_query(published.uri, sig="0" * 64)
    assert_refused(get(hub, forged, headers={"If-None-Match": "*"}), "not valid")
    assert_refused(get(hub, forged, headers={"If-Match": '"other"'}), "not valid")


# --- refusals -------------------------------------------------------------------------------------


def test_an_expired_url_is_refused_and_the_task_hands_out_a_fresh_one(
    hub: RunningHub, published: Published
) -> None:
    hub.clock.advance(hub.state.settings.signed_url_lifetime + 1)
    assert_refused(get(hub, published.uri), "expired")
    fresh = hub.admin("GET", f"{FIRMWARE}/installationTasks/{published.task['id']}").json()
    assert fresh["artifacts"][0]["uri"] != published.uri
    assert get(hub, fresh["artifacts"][0]["uri"]).content == published.image


def test_a_url_pointed_at_another_blob_is_refused(
    hub: RunningHub, published: Published, tmp_path: Path
) -> None:
    other = upload(hub, make_image(tmp_path, [signer_for(KeyAlgorithm.ED25519)], name="other.signed"))
    assert other.status_code == 201
    moved = published.uri.replace(published.release["sha256"], other.json()["sha256"])
    assert_refused(get(hub, moved), "not valid")


def test_a_prolonged_or_forged_url_is_refused(served: Served) -> None:
    hub, published = served
    expires = parse_qs(urlsplit(published.uri).query)["expires"][0]
    sig = parse_qs(urlsplit(published.uri).query)["sig"][0]
    assert_refused(get(hub, with_query(published.uri, expires=str(int(expires) + 1))), "not valid")
    assert_refused(get(hub, with_query(published.uri, sig=sig[::-1])), "not valid")
    assert_refused(get(hub, with_query(published.uri, sig="")), "lacks")
    assert_refused(get(hub, with_query(published.uri, expires="-")), "lacks")
    assert_refused(get(hub, with_query(published.uri, sig="-", expires="-")), "lacks")
    assert_refused(get(hub, published.uri + f"&sig={sig}"), "not valid")  # which sig would be checked?


def test_head_is_refused_like_get(hub: RunningHub, published: Published) -> None:
    hub.clock.advance(hub.state.settings.signed_url_lifetime)
    response = hub.http.head(published.uri, verify=str(hub.ca), timeout=30)
    assert response.status_code == 403
    assert response.content == b""


def test_a_missing_blob_is_refused_exactly_like_a_forged_url(served: Served) -> None:
    hub, published = served
    absent = hashlib.sha256(b"never uploaded").hexdigest()
    signer = BlobUrlSigner(hub.state.url_secret, hub.url, 3600)
    genuine_but_absent = get(hub, signer.sign(absent, hub.clock()).uri)
    forged = get(hub, published.uri.replace(published.release["sha256"], absent))
    assert genuine_but_absent.status_code == forged.status_code == 403
    assert genuine_but_absent.json() == forged.json()


@pytest.mark.parametrize("path", ["/blobs/..%2Fhub.toml", "/blobs/url-secret", "/blobs/%00"])
def test_a_path_outside_the_blobs_yields_nothing(served: Served, path: str) -> None:
    hub, published = served
    query = urlsplit(published.uri).query
    response = get(hub, f"{hub.url}{path}?{query}")
    assert response.status_code in (403, 404)
    assert "error" in response.json()


def test_a_download_carries_no_other_credential_and_needs_none(served: Served) -> None:
    hub, published = served
    response = get(hub, published.uri, headers={"Authorization": "Bearer not-even-a-token"})
    assert response.status_code == 200


def test_a_refused_image_has_no_url(hub: RunningHub, published: Published, tmp_path: Path) -> None:
    """A rejected upload leaves no blob a forged URL could ever reach."""
    data = bytearray(published.image)
    data[100] ^= 1
    assert upload(hub, bytes(data)).status_code == 422
    signer = BlobUrlSigner(hub.state.url_secret, hub.url, 3600)
    assert get(hub, signer.sign(hashlib.sha256(data).hexdigest(), hub.clock()).uri).status_code == 403


# --- the Range rules, pure ------------------------------------------------------------------------

ETAG = '"abc"'


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-9", 10, ByteRange(0, 10, 10)),
        ("bytes=0-99", 10, ByteRange(0, 10, 10)),
        ("bytes=9-", 10, ByteRange(9, 10, 10)),
        ("bytes=-3", 10, ByteRange(7, 10, 10)),
        ("bytes=-30", 10, ByteRange(0, 10, 10)),
        ("BYTES=1-2", 10, ByteRange(1, 3, 10)),
        ("bytes=10-", 10, Unsatisfiable(10)),
        ("bytes=-0", 10, Unsatisfiable(10)),
        ("bytes=0-", 0, Unsatisfiable(0)),
        ("bytes=" + "9" * 40 + "-", 10, Unsatisfiable(10)),
        ("bytes=0-" + "9" * 40, 10, ByteRange(0, 10, 10)),
        ("bytes=1-" + "0" * 40 + "2", 10, ByteRange(1, 3, 10)),
        ("bytes=" + "0" * 40 + "1-2", 10, ByteRange(1, 3, 10)),
        ("bytes=-" + "0" * 40 + "3", 10, ByteRange(7, 10, 10)),
        ("bytes=" + "0" * 40 + "-", 10, ByteRange(0, 10, 10)),
        ("bytes=3-2", 10, None),
        ("bytes=1-2,4-5", 10, None),
        ("bytes=-", 10, None),
        ("bytes=\u0661-\u0662", 10, None),  # Arabic-Indic digits are not DIGIT
        ("items=1-2", 10, None),
    ],
)
def test_range_headers_select_bytes_as_rfc_9110_says(
    header: str | None, size: int, expected: ByteRange | Unsatisfiable | None
) -> None:
    assert requested_range(header, None, ETAG, size) == expected


def test_if_range_is_a_strong_comparison_with_the_etag() -> None:
    assert requested_range("bytes=1-2", ETAG, ETAG, 10) == ByteRange(1, 3, 10)
    assert requested_range("bytes=1-2", "W/" + ETAG, ETAG, 10) is None
    assert requested_range("bytes=1-2", '"abd"', ETAG, 10) is None
    assert requested_range(None, ETAG, ETAG, 10) is None


@pytest.mark.parametrize(
    ("field", "weak", "named"),
    [
        (ETAG, False, True),
        ("W/" + ETAG, False, False),
        ("W/" + ETAG, True, True),
        (f' , "x,abc", {ETAG} ,', False, True),  # empty elements, and a tag that holds a comma
        ('"x,abc"', True, False),
        (" * ", False, True),
        ("abc", True, False),  # unquoted: not an entity tag
        (f'"x" {ETAG}', True, False),  # no comma between the tags: malformed, names nothing
        ("", True, False),
    ],
)
def test_an_entity_tag_list_names_the_etag_as_rfc_9110_says(field: str, weak: bool, named: bool) -> None:
    assert condition_names(field, ETAG, weak=weak) is named


@given(
    size=st.integers(0, 10**6),
    first=st.integers(0, 2 * 10**6) | st.none(),
    last=st.integers(0, 2 * 10**6) | st.none(),
    zeros=st.integers(0, 40),
)
def test_leading_zeros_never_change_the_selected_range(
    size: int, first: int | None, last: int | None, zeros: int
) -> None:
    def header(pad: str) -> str:
        return f"bytes={'' if first is None else pad + str(first)}-{'' if last is None else pad + str(last)}"

    assert requested_range(header("0" * zeros), None, ETAG, size) == requested_range(
        header(""), None, ETAG, size
    )


@given(
    size=st.integers(0, 10**6),
    first=st.integers(0, 2 * 10**6) | st.none(),
    last=st.integers(0, 2 * 10**6) | st.none(),
)
def test_a_selected_range_is_never_empty_and_never_outside_the_blob(
    size: int, first: int | None, last: int | None
) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    selected = requested_range(header, None, ETAG, size)
    if isinstance(selected, ByteRange):
        assert 0 <= selected.start < selected.stop <= size
        assert selected.content_range == f"bytes {selected.start}-{selected.stop - 1}/{size}"
    elif isinstance(selected, Unsatisfiable):
        assert (first is not None and first >= size) or (first is None and (last == 0 or size == 0))
    else:
        assert (first is None and last is None) or (first is not None and last is not None and last < first)

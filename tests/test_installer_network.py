"""The download over a bad network: connections cut at random byte offsets by a TCP proxy between the
installer and the real hub (TLS end to end), and a signed URL that expires in the middle of a download."""

from __future__ import annotations

import datetime
import itertools
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from board.interface import SlotName
from hub.home import HubSettings
from mers.download import BlobFetcher
from mers.errors import DownloadError, HubRefusedError, ImageChangedError, InputError, TaskClosedError
from mers.install import Installer, InstallOutcome, InstallStep, refreshed_uri
from mers.journal import Phase, load_journal
from mers.tasks import Artifact, InstallationTask, TaskState
from signing.layout import parse_header
from tests.device_helpers import bad_server
from tests.hub_helpers import FIRMWARE, RunningHub, running_hub
from tests.installer_helpers import PAYLOAD_SIZE, TEST_DOWNLOAD, TEST_INSTALL, cutting_proxy, make_rig

#: TLS records (16 KiB) and socket buffers: what may be in flight beyond the chunk being read
IN_FLIGHT = 64 << 10
#: per connection: the TLS handshake, the request's answer headers
PER_CONNECTION = 8 << 10


def test_download_cut_at_random_offsets_completes_by_resuming(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    image = rig.image("2.0.0", counter=2)
    task = rig.task(rig.task_for(image))
    uri = task["artifacts"][0]["uri"]
    hub_port = urllib.parse.urlsplit(hub.url).port
    assert hub_port is not None
    generator = random.Random(7)
    cuts = [generator.randrange(20 << 10, PAYLOAD_SIZE) for _ in range(8)]
    with cutting_proxy(hub_port, cuts) as proxy:
        proxied = uri.replace(f":{hub_port}/", f":{proxy.port}/")
        with rig.client() as client:
            result = Installer(rig.board, client, settings=TEST_INSTALL).install_url(proxied)

    assert result.outcome is InstallOutcome.REBOOTING
    assert len(proxy.performed) == len(cuts), "every cut happened"
    stats = result.stats
    assert stats.received == PAYLOAD_SIZE, "each payload byte was handed over exactly once"
    assert len(stats.resumes) >= len(cuts) - 1
    overhead = proxy.sent_to_clients - image.stat().st_size
    per_cut = (overhead - proxy.connections * PER_CONNECTION) / len(cuts)
    assert per_cut < TEST_DOWNLOAD.chunk_size + IN_FLIGHT, (overhead, proxy.connections)
    assert rig.boot().decision.slot is SlotName.B, "the resumed slot holds the verified image"


@pytest.fixture
def short_url_hub(tmp_path: Path) -> Iterator[RunningHub]:
    """A hub whose signed URLs live 60 s, so moving its clock expires one mid-download."""
    with running_hub(tmp_path / "hub", HubSettings(signed_url_lifetime=60)) as running:
        yield running


def test_url_expiring_mid_download_is_refreshed_and_resumed_at_the_same_offset(
    short_url_hub: RunningHub, tmp_path: Path
) -> None:
    hub = short_url_hub
    rig = make_rig(hub, tmp_path / "rig")
    image = rig.image("2.0.0", counter=2)
    task_id = rig.task_for(image)
    payload_offset = parse_header(image.read_bytes()[:32]).hdr_size
    window = 256 << 10  # one range request per window: the next request presents the URL again
    settings = replace(TEST_INSTALL, download=replace(TEST_DOWNLOAD, request_bytes=window))
    seen: list[InstallStep] = []

    def expire_once(step: InstallStep) -> None:
        seen.append(step)
        if step is InstallStep.CHECKPOINT and seen.count(step) == 1:
            hub.clock.advance(120)

    with rig.client() as client:
        result = Installer(rig.board, client, settings=settings, hook=expire_once).install_task(task_id)

    assert result.outcome is InstallOutcome.REBOOTING
    assert result.stats.refreshes == 1
    assert result.stats.resumes == [payload_offset + window], "resumed where the expired URL stopped"
    assert result.stats.received == PAYLOAD_SIZE, "no byte downloaded twice"
    assert rig.task(task_id)["state"] == "ACTIVATING"


def test_downloading_progress_reaches_the_hub_at_most_once_a_second(hub: RunningHub, tmp_path: Path) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("2.0.0", counter=2))
    settings = replace(TEST_INSTALL, report_seconds=1.0)

    def slow_link(done: int, total: int) -> None:
        time.sleep(0.12)  # about 3 s for the 24 chunks: a slow uplink

    with rig.client() as client:
        Installer(rig.board, client, settings=settings, progress=slow_link).install_task(task_id)

    reports = [
        datetime.datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))
        for entry in rig.task(task_id)["history"]
        if entry["to"] == "DOWNLOADING"
    ]
    assert len(reports) >= 3, "the start, then progress while it lasts"
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(reports)]
    assert min(gaps) >= 0.99, gaps


def test_a_dead_link_ends_after_bounded_retries_and_a_new_url_resumes_from_the_journal(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    task_id = rig.task_for(rig.image("2.0.0", counter=2))
    uri = rig.task(task_id)["artifacts"][0]["uri"]
    hub_port = urllib.parse.urlsplit(hub.url).port
    assert hub_port is not None
    dead = 600 << 10
    with cutting_proxy(hub_port, [dead + n for n in range(20)]) as proxy, rig.client() as client:
        proxied = uri.replace(f":{hub_port}/", f":{proxy.port}/")
        installer = Installer(rig.board, client, settings=TEST_INSTALL)
        with pytest.raises(DownloadError, match="kept failing"):
            installer.install_url(proxied)
    attempts = proxy.connections
    assert 1 + TEST_DOWNLOAD.retries <= attempts <= 3 + TEST_DOWNLOAD.retries, "bounded"
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.DOWNLOADING and 0 < journal.offset < dead

    with rig.client() as client:
        fresh = rig.task(task_id)["artifacts"][0]["uri"]
        result = Installer(rig.board, client, settings=TEST_INSTALL).install_url(fresh)
    assert result.outcome is InstallOutcome.REBOOTING
    assert result.stats.received == PAYLOAD_SIZE - journal.offset, "resumed at the journalled offset"


@pytest.mark.parametrize(
    ("token", "as_sent"),
    [("tok-7f3a9c1e5b2d4068", "tok-7f3a9c1e5b2d4068"), ("tok 7f3a|9c1e", "tok%207f3a%7C9c1e")],
    ids=["plain", "quoted when sent"],
)
def test_a_credential_in_the_url_path_stays_out_of_errors_and_logs(
    hub: RunningHub, caplog: pytest.LogCaptureFixture, token: str, as_sent: str
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there: every attempt is refused
    url = f"https://127.0.0.1:{port}/cdn/{token}/rootfs.signed"
    caplog.set_level(logging.DEBUG)
    fetcher = BlobFetcher(url, hub.ca, settings=replace(TEST_DOWNLOAD, retries=1))
    with fetcher, pytest.raises(DownloadError) as failure:
        fetcher.probe()
    assert "kept failing" in str(failure.value) and "Connection refused" in str(failure.value)  # its cause
    for secret in {token, as_sent, "7f3a"}:
        assert secret not in str(failure.value) and secret not in caplog.text


def test_a_task_cancelled_while_its_url_expired_ends_the_install_at_the_refresh(
    short_url_hub: RunningHub, tmp_path: Path
) -> None:
    hub = short_url_hub
    rig = make_rig(hub, tmp_path / "rig")
    task_id = rig.task_for(rig.image("2.0.0", counter=2))
    window = 256 << 10
    # no progress reports: the refresh is the first the installer hears of the task again
    settings = replace(
        TEST_INSTALL, report_seconds=3600.0, download=replace(TEST_DOWNLOAD, request_bytes=window)
    )
    seen: list[InstallStep] = []

    def cancel_and_expire(step: InstallStep) -> None:
        seen.append(step)
        if step is InstallStep.CHECKPOINT and seen.count(step) == 1:
            answer = hub.admin("PATCH", f"{FIRMWARE}/installationTasks/{task_id}", json={"state": "CANCELED"})
            assert answer.status_code == 200, answer.text
            hub.clock.advance(120)

    with rig.client() as client, pytest.raises(TaskClosedError, match="CANCELED"):
        Installer(rig.board, client, settings=settings, hook=cancel_and_expire).install_task(task_id)
    assert InstallStep.DOWNLOADED not in seen, "not a byte more of a cancelled task's image"
    journal = load_journal(rig.board.state)
    assert journal.phase is Phase.IDLE and journal.message.startswith("abandoned")
    assert rig.board.boot_env.read()["boot_slot"] == "a"


def test_a_refreshed_url_that_is_not_https_is_refused_before_it_is_used(
    hub: RunningHub, tmp_path: Path
) -> None:
    rig = make_rig(hub, tmp_path)
    url = rig.task(rig.task_for(rig.image("2.0.0", counter=2)))["artifacts"][0]["uri"]
    expired = url[: url.index("sig=") + 4] + "0" * 64  # the hub answers 403, as to an expired URL
    in_clear = "http://" + url.removeprefix("https://")
    fetcher = BlobFetcher(expired, hub.ca, settings=TEST_DOWNLOAD, refresh=lambda: in_clear)
    with fetcher, pytest.raises(InputError, match="must be https") as refused:
        fetcher.probe()
    assert fetcher.stats.requests == 1, "the signed URL never went out in clear"
    assert "sig=" not in str(refused.value)


def test_a_refused_url_is_reported_with_the_reason_the_hub_gave(hub: RunningHub, tmp_path: Path) -> None:
    """The hub says why it refuses a signed URL (expired, or not valid) in its 403 body: that reason is
    the operator's one clue, so it reaches the error instead of "no reason given"."""
    rig = make_rig(hub, tmp_path, onboard=False)
    url = rig.task(rig.task_for(rig.image("2.0.0", counter=2)))["artifacts"][0]["uri"]
    tampered = url[: url.index("sig=") + 4] + "0" * 64
    fetcher = BlobFetcher(tampered, hub.ca, settings=TEST_DOWNLOAD)
    with fetcher, pytest.raises(HubRefusedError, match="403") as refused:
        fetcher.probe()
    assert "the signed URL is not valid" in str(refused.value)
    assert "0" * 64 not in str(refused.value)


@pytest.mark.parametrize(
    "total",
    ["1\u00b2", "\u00b9", "1 0", "-1", "*"],
    ids=["superscript", "only superscript", "space", "sign", "star"],
)
def test_a_content_range_total_that_is_not_ascii_digits_is_a_download_error(
    tmp_path: Path, total: str
) -> None:
    """RFC 9110's complete-length is 1*DIGIT: "²" passes `str.isdigit` but not `int`, and must end as the
    typed error the installer reports, not as a traceback."""
    ca = tmp_path / "ca.pem"
    with bad_server("partial", content_range=f"bytes 0-0/{total}") as server:
        ca.write_bytes(server.ca_pem)
        fetcher = BlobFetcher(f"{server.url}/blobs/x?sig=1", ca, settings=TEST_DOWNLOAD)
        with fetcher, pytest.raises(DownloadError, match="no usable Content-Range"):
            fetcher.probe()


@pytest.mark.parametrize(
    ("later_range", "error", "message"),
    [
        ("bytes 0-0/2", ImageChangedError, "changed"),
        ("bytes 0-0/*", DownloadError, "no usable Content-Range"),
        ("bytes 0-0/1/1", DownloadError, "no usable Content-Range"),
        ("bytes 0-0", DownloadError, "no usable Content-Range"),
        ("bytes 0-0/0", DownloadError, "no usable Content-Range"),
        ("bytes 0-0/" + "1" * 5000, DownloadError, "no usable Content-Range"),
    ],
    ids=["another total", "unknown total", "two totals", "no total", "end beyond the total", "endless total"],
)
def test_a_range_of_another_size_than_the_probe_saw_is_never_spliced(
    tmp_path: Path, later_range: str, error: type[Exception], message: str
) -> None:
    """The probe saw a one-byte image; a later 206 whose complete-length differs is a range of another
    representation (a CDN node serving another build), and one that states no usable length proves
    nothing: either ends the download before its byte is handed on."""
    ca = tmp_path / "ca.pem"
    with bad_server("partial", later_range=later_range) as server:
        ca.write_bytes(server.ca_pem)
        fetcher = BlobFetcher(f"{server.url}/blobs/x?sig=1", ca, settings=TEST_DOWNLOAD)
        with fetcher:
            assert fetcher.probe().size == 1
            with pytest.raises(error, match=message):
                fetcher.read_range(0, 1)


def test_a_range_that_ends_elsewhere_than_asked_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with bad_server("partial", content_range="bytes 0-0/5", later_range="bytes 0-1/5") as server:
        ca.write_bytes(server.ca_pem)
        fetcher = BlobFetcher(f"{server.url}/blobs/x?sig=1", ca, settings=TEST_DOWNLOAD)
        with fetcher:
            fetcher.probe()
            with pytest.raises(DownloadError, match="another range than bytes 0-0"):
                fetcher.read_range(0, 1)


def _task(state: TaskState, *artifacts: Artifact) -> InstallationTask:
    return InstallationTask("t-1", state, 0.1, "", "r-1", "2.0.0", "3", artifacts)


IMAGE = Artifact("rootfs.signed", "https://hub.example/blobs/x?sig=1", "ab" * 32, 1000, "")


@pytest.mark.parametrize(
    ("task", "error"),
    [
        (_task(TaskState.CANCELED, IMAGE), TaskClosedError),
        (_task(TaskState.FAILED, IMAGE), TaskClosedError),
        (_task(TaskState.DOWNLOADING), ImageChangedError),
        (_task(TaskState.DOWNLOADING, IMAGE, IMAGE), ImageChangedError),
        (_task(TaskState.DOWNLOADING, replace(IMAGE, size=1001)), ImageChangedError),
        (_task(TaskState.DOWNLOADING, replace(IMAGE, sha256="cd" * 32)), ImageChangedError),
    ],
    ids=["cancelled", "failed", "no artifact", "two artifacts", "other size", "other checksum"],
)
def test_a_refresh_from_a_task_that_changed_meanwhile_is_a_typed_refusal(
    task: InstallationTask, error: type[Exception]
) -> None:
    with pytest.raises(error):
        refreshed_uri(task, IMAGE)
    fresh = replace(IMAGE, uri="https://hub.example/blobs/x?sig=2")
    assert refreshed_uri(_task(TaskState.DOWNLOADING, fresh), IMAGE) == fresh.uri


def test_a_server_trickling_bytes_inside_the_read_timeout_is_dropped_at_the_low_speed_limit(
    tmp_path: Path,
) -> None:
    """A byte every 0.1 s never trips a read timeout; without a low-speed limit it held the download for
    as long as the server liked. Below the limit for its window, the connection is dropped and the range
    asked again, and the retries end it with a clear error."""
    settings = replace(TEST_DOWNLOAD, retries=1, low_speed_limit=100, low_speed_time=1.0)
    with bad_server("trickle") as server:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(server.ca_pem)
        ended: list[BaseException] = []

        def fetch() -> None:
            with BlobFetcher(f"{server.url}/blobs/image?sig=x", ca, settings=settings) as fetcher:
                try:
                    for _ in fetcher.stream(0, 1 << 20):
                        pass
                except DownloadError as error:
                    ended.append(error)

        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the trickle still holds the download"
    (error,) = ended
    assert "under the 100 bytes/s it must keep" in str(error) and "kept failing" in str(error)
    assert server.connections == 2  # dropped, asked again once (retries=1), then given up

"""Fetching an image through its signed URL: HTTP `Range` requests pinned to one ETag, resumed where the
last byte arrived, with bounded retries and the URL refreshed when it expires.

- TLS is verified against the boarding CA on every request, `trust_env` is off and redirects are not
  followed (as in `mers.http`): a signed URL is a credential and goes nowhere else.
- Every range request carries `If-Range: <etag>`: if the blob changed, the server answers 200 with the
  whole new blob and we stop (`ImageChangedError`) instead of splicing two images into one slot.
- A connection that breaks mid-body is resumed from the last byte handed to the caller, so what is read
  again is at most the chunk that was being read plus what was in flight. The backoff and the budget are
  urllib3's `Retry` (the budget counts failures in a row: progress refills it).
- A 403 means the signed URL expired (or was tampered with): `refresh()` gets a new one (the task again)
  and the download continues at the same offset, once, before the budget counts it as a failure.
- No URL is ever put in a message or a log line: only its origin (`redacted`).
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from .errors import DownloadError, HubRefusedError, ImageChangedError, InputError
from .http import certificate_refused, network_reason, pinned_session, retry_policy

#: how much of a refusal's body is read for its reason (the hub's are a line of JSON)
_REASON_BYTES = 4096
#: what a refreshed URL comes from: a function that returns a new signed URL for the same image
UrlRefresher = Callable[[], str]


@dataclass(frozen=True)
class DownloadSettings:
    """Chunk, timeouts and retry budget. `request_bytes` bounds one range request, so a long download
    re-presents its signed URL now and then instead of riding one connection for hours."""

    chunk_size: int = 1 << 20
    request_bytes: int = 1 << 30
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 8  # failures in a row without a byte of progress
    #: a connection that brings fewer than `low_speed_limit` bytes a second for `low_speed_time` seconds
    #: is dropped and the range asked again, as curl's --speed-limit/--speed-time: a server trickling a
    #: byte just inside the read timeout would otherwise hold the download for ever
    low_speed_limit: int = 1024
    low_speed_time: float = 60.0
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 0.5

    def retry(self) -> Retry:
        return retry_policy(self.retries, self.backoff_factor, self.backoff_max, self.backoff_jitter)


@dataclass
class DownloadStats:
    """What a download did, for progress lines, tests and the benchmark."""

    received: int = 0  # payload bytes handed to the caller
    metadata: int = 0  # header and trailer bytes (read before the payload)
    requests: int = 0
    resumes: list[int] = field(default_factory=list)  # offsets a broken or expired request resumed at
    refreshes: int = 0  # signed URLs fetched again after a 403


@dataclass(frozen=True)
class RemoteImage:
    size: int
    etag: str  # as the server sent it, quotes included


def redacted(url: str) -> str:
    """The URL's origin only: its path and query (the signature) are the credential."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # a bracket never closed: nothing of it is safe to show
        return "(an unparsable URL)"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


def check_image_url(url: str) -> None:
    """Refuse, before any request, a URL that is not https (a signed URL is a credential, never sent in
    clear) or that cannot be parsed (a bracket never closed, a port that is not a number): that is the
    operator's input, exit 2, and no retry cures it. Applied to every URL, the refreshed ones too, which
    come from the hub's answer and get no more trust than the first. No part of the URL is shown but its
    origin."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising ValueError for one that is not a number
    except ValueError as exc:
        raise InputError(f"the image URL is not a URL ({exc})") from None
    if parts.scheme != "https":
        raise InputError(f"an image URL must be https, not {redacted(url)}")
    if not parts.hostname:
        raise InputError(f"the image URL {redacted(url)} names no host")
    try:
        requests.Request("GET", url).prepare()
    except requests.RequestException:  # its message holds the URL: not shown
        raise InputError(f"the image URL {redacted(url)} is not a valid URL") from None


class BlobFetcher:
    """Range requests to one image behind a signed URL (refreshed through `refresh` when it expires)."""

    def __init__(
        self,
        url: str,
        ca_file: Path,
        *,
        settings: DownloadSettings | None = None,
        refresh: UrlRefresher | None = None,
        proxy_url: str | None = None,
    ) -> None:
        check_image_url(url)
        self.url = url
        self.settings = settings or DownloadSettings()
        self.stats = DownloadStats()
        self._ca_file = str(ca_file)
        self._refresh = refresh
        self._etag = ""
        self._size: int | None = None  # the probe's, which every later range must state as its total
        # the adapter retries only 429 and 5xx answers; broken connections are this class's `_Budget`
        # (one budget, so the two layers do not multiply each other's attempts)
        statuses = self.settings.retry().new(total=None, connect=0, read=0, other=0)
        self._http = pinned_session(proxy_url, HTTPAdapter(max_retries=statuses))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BlobFetcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def probe(self) -> RemoteImage:
        """The image's size and ETag, from a one-byte range request (a HEAD would not prove the URL works
        for GET), with the same retries and URL refresh as the payload."""
        budget = _Budget(self)
        while True:
            try:
                with self._get(0, 1, pin=False) as response:
                    size = _content_range(response, self.url)[2]
                    etag = response.headers.get("etag", "")
                    response.content  # noqa: B018 - read the one byte, so the connection is reused
                break
            except _RETRIABLE as exc:
                budget.failed(exc, 0)
        if not etag.startswith('"'):
            raise DownloadError(f"{redacted(self.url)} sent no strong ETag: a resume could mix images")
        self._etag = etag
        self._size = size
        return RemoteImage(size, etag)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop): small reads only (the header and the trailer)."""
        data = b"".join(self.stream(start, stop))
        self.stats.received -= len(data)
        self.stats.metadata += len(data)
        return data

    def stream(self, start: int, stop: int) -> Iterator[bytes]:
        """Bytes [start, stop) in chunks, across broken connections and expired URLs."""
        position = start
        budget = _Budget(self)
        while position < stop:
            window = min(stop, position + self.settings.request_bytes)
            try:
                for chunk in self._chunks(position, window):
                    position += len(chunk)
                    self.stats.received += len(chunk)
                    budget.progressed()
                    yield chunk
            except _RETRIABLE as exc:
                budget.failed(exc, position)

    def refresh_url(self, reason: str) -> None:
        """A new signed URL for the same image, after a 403 (expired)."""
        if self._refresh is None:
            raise HubRefusedError(f"the image URL was refused (403): {reason}", status=403, code="forbidden")
        url = self._refresh()
        check_image_url(url)
        self.url = url
        self.stats.refreshes += 1

    def _chunks(self, start: int, stop: int) -> Iterator[bytes]:
        with self._get(start, stop) as response:
            got = 0
            for chunk in self._paced(response):
                if got + len(chunk) > stop - start:
                    raise DownloadError(f"{redacted(self.url)} sent more than the {stop - start} bytes asked")
                got += len(chunk)
                yield chunk
            if got != stop - start:
                raise requests.exceptions.ChunkedEncodingError(f"the body ended after {got} bytes")

    def _paced(self, response: requests.Response) -> Iterator[bytes]:
        """The body in chunks of up to `chunk_size`, each yielded as soon as it is whole or the stream
        pauses; a stretch of `low_speed_time` below `low_speed_limit` ends it (`_TooSlow`, retried)."""
        settings = self.settings
        window_start, window_bytes = time.monotonic(), 0
        pending: list[bytes] = []
        pending_size = 0
        while True:
            data = response.raw.read1(settings.chunk_size - pending_size)
            if data:
                pending.append(data)
                pending_size += len(data)
                window_bytes += len(data)
            if not data or pending_size >= settings.chunk_size:
                if pending:
                    yield b"".join(pending)
                    pending, pending_size = [], 0
                if not data:
                    return
            now = time.monotonic()
            if now - window_start >= settings.low_speed_time:
                rate = window_bytes / (now - window_start)
                if rate < settings.low_speed_limit:
                    raise _TooSlow(
                        f"{rate:.0f} bytes/s for {now - window_start:.0f} s, under the "
                        f"{settings.low_speed_limit} bytes/s it must keep"
                    )
                window_start, window_bytes = now, 0

    def _get(self, start: int, stop: int, *, pin: bool = True) -> requests.Response:
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
        if pin and self._etag:
            headers["If-Range"] = self._etag
        self.stats.requests += 1
        try:
            response = self._http.get(
                self.url,
                headers=headers,
                timeout=(self.settings.connect_timeout, self.settings.read_timeout),
                verify=self._ca_file,
                allow_redirects=False,
                stream=True,
            )
        except _UNUSABLE_URL:  # a URL `check_image_url` let through; retrying it would fail alike
            raise InputError(f"the image URL {redacted(self.url)} is not a valid URL") from None
        if response.status_code == 206:
            if pin and self._etag and response.headers.get("etag") != self._etag:
                response.close()
                raise ImageChangedError("the image behind the URL changed (another ETag) during the download")
            _check_content_range(response, start, stop, self._size if pin else None, self.url)
            return response
        if response.status_code == 403:
            raise _Expired(_description(response))
        if response.status_code == 200:
            response.close()
            raise ImageChangedError(
                "the server sent the whole image instead of the range asked: it changed (another ETag) "
                "or it does not do ranges"
            )
        if response.status_code >= 500 or response.status_code == 429:
            response.close()
            raise DownloadError(f"{redacted(self.url)} kept answering {response.status_code}")
        raise HubRefusedError(
            f"{redacted(self.url)} answered {response.status_code} to a range request: "
            f"{_description(response)}",
            status=response.status_code,
        )


class _Budget:
    """The retries of one operation: urllib3's `Retry` counts failures in a row and sleeps its backoff;
    progress starts the count again. A 403 gets one URL refresh per stretch without progress."""

    def __init__(self, fetcher: BlobFetcher) -> None:
        self._fetcher = fetcher
        self._retry = fetcher.settings.retry()
        self._refreshed = False

    def progressed(self) -> None:
        self._retry = self._fetcher.settings.retry()
        self._refreshed = False

    def failed(self, exc: BaseException, position: int) -> None:
        """Return to try again (after refreshing or backing off), or raise the error that ends it."""
        fetcher = self._fetcher
        if isinstance(exc, _Expired):
            if self._refreshed:
                raise HubRefusedError(
                    f"a refreshed image URL was refused too (403): {exc.reason}", status=403, code="forbidden"
                ) from None
            fetcher.refresh_url(exc.reason)
            self._refreshed = True
        elif certificate_refused(exc):  # the same certificate at every try: no retry cures it
            raise DownloadError(
                f"TLS to {redacted(fetcher.url)} refused the server's certificate (is it from the boarding "
                f"CA?): {_reason(exc, fetcher.url)}"
            ) from None
        else:
            try:
                self._retry = self._retry.increment(
                    method="GET", url=redacted(fetcher.url), error=_plain(exc, fetcher.url)
                )
            except MaxRetryError:
                raise DownloadError(
                    f"the download from {redacted(fetcher.url)} kept failing at byte {position} "
                    f"({fetcher.settings.retries + 1} attempts): {_reason(exc, fetcher.url)}"
                ) from None
            self._retry.sleep()
        fetcher.stats.resumes.append(position)


class _TooSlow(Exception):
    """The connection brought too few bytes for too long: dropped, and the range asked again."""


class _Expired(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: what no retry cures: the URL itself is wrong (these are `RequestException`s, caught before `_RETRIABLE`)
_UNUSABLE_URL = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
)
#: what a retry can cure: an expired URL, a broken or timed-out connection
_RETRIABLE = (_Expired, _TooSlow, requests.RequestException, Urllib3Error, OSError)


def _description(response: requests.Response) -> str:
    """The `error_description` of a refusal's JSON body, then the response closed. The body is read from
    the open response (a closed one reads as empty: every reason was lost) and only its first
    `_REASON_BYTES`: an error page as large as an image must not be held in memory."""
    try:
        document = json.loads(response.raw.read(_REASON_BYTES, decode_content=True))
    except (ValueError, RecursionError, OSError, Urllib3Error):
        return "no reason given"
    finally:
        response.close()
    text = document.get("error_description") if isinstance(document, dict) else None
    return str(text)[:200] if text else "no reason given"


#: RFC 9110's 206 Content-Range, "bytes first-last/complete-length", each 1*DIGIT: ASCII digits only
#: (`str.isdigit` takes "²", which `int` refuses) and at most 20 (`int` refuses more than 4300 digits)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20})")


def _content_range(response: requests.Response, url: str) -> tuple[int, int, int]:
    """First byte, last byte and complete-length of a 206's `Content-Range`. An unknown length (`*`) or
    a malformed header is refused (the response closed) with the typed error: it cannot show that the
    bytes belong to the image the download started with."""
    content_range = response.headers.get("content-range", "")
    numbers = _CONTENT_RANGE.fullmatch(content_range)
    if numbers is not None:
        first, last, total = (int(number) for number in numbers.groups())
        if first <= last < total:
            return first, last, total
    response.close()
    raise DownloadError(f"{redacted(url)} sent no usable Content-Range ({content_range[:60]!r})")


def _check_content_range(
    response: requests.Response, start: int, stop: int, size: int | None, url: str
) -> None:
    """A 206 must be the range asked, of the image of `size` bytes (the probe's, `None` for the probe
    itself): another range would put bytes at the wrong offset, and another complete-length is another
    representation (a CDN node serving another build under the same URL and ETag), whose bytes spliced
    with the first's would make an image that was never signed."""
    first, last, total = _content_range(response, url)
    if (first, last) != (start, stop - 1):
        response.close()
        raise DownloadError(f"{redacted(url)} answered another range than bytes {start}-{stop - 1}")
    if size is not None and total != size:
        response.close()
        raise ImageChangedError(f"the image behind the URL changed (its size from {size} to {total} bytes)")


def _plain(exc: BaseException, url: str) -> Exception:
    """The error for urllib3's history, with no URL in its text."""
    return Exception(_reason(exc, url))


def _reason(exc: BaseException, url: str) -> str:
    """The error's text, or only its type when the text may hold any part of `url`: requests puts the
    request's URL into its messages ("Max retries exceeded with url: /path?query"), and a signed URL's
    credential may be in its query (the hub's, S3's) or in its path (CDN tokens)."""
    text = network_reason(exc)
    parts = urllib.parse.urlsplit(url)
    pieces = ["https://", parts.query, parts.path, urllib.parse.unquote(parts.path)]
    try:
        sent = urllib.parse.urlsplit(requests.Request("GET", url).prepare().url or "")
        pieces += [sent.path, sent.query]  # as requests quotes them into its messages
    except requests.RequestException:  # a URL requests cannot even prepare: nothing was sent
        pass
    if "?" in text or any(len(piece) > 1 and piece in text for piece in pieces):
        return type(exc).__name__
    return text[:200] if text else type(exc).__name__

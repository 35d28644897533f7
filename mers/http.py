"""The one way the device talks to its hub: TLS verified against the boarding CA, the boarding proxy,
bounded retries with exponential backoff and jitter, bounded answers, and the hub's clock.

- TLS: `verify=` the CA file on every request and `trust_env = False`: requests would otherwise prefer
  `REQUESTS_CA_BUNDLE` from the environment over `Session.verify`, read ~/.netrc (basic credentials
  replacing our bearer token) and route through an environment proxy. The proxy comes only from the
  boarding data's network configuration.
- Retries: urllib3's `Retry` through requests' `HTTPAdapter`, for connection errors, timeouts, dropped
  connections and 429/5xx, on every method; a `Retry-After` is honoured only up to `backoff_max`
  (`BoundedRetry`); an answer cut short after its headers is asked for again
  with the same budget. That is safe here: registering again is refused as in
  progress (429) or as a used IAT; renewing again with the same RAT is what the hub's previous-RAT rule
  exists for; a token request sent again is refused as a spent assertion, and the client signs a new one
  (`mers.client`).
- Redirects are not followed: a bearer token must never be sent where the hub did not ask for it.
- Answers are read up to `MAX_ANSWER` bytes: a hostile or broken server cannot fill the device's memory.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProtocolError, ProxyError, SSLError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from .boarding import NetworkConfig
from .clock import HubClock
from .errors import HubProtocolError, HubUnreachableError

MAX_ANSWER = 1 << 20
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RetryKind = TypeVar("RetryKind", bound=Retry)


class BoundedRetry(Retry):
    """urllib3's `Retry`, honouring a `Retry-After` only up to `backoff_max`.

    urllib3 caps a `Retry-After` at its own `retry_after_max` (six hours by default, and a parameter
    only recent releases take), not at `backoff_max`: a hub or proxy answering 429/503 with a long
    `Retry-After` would hold one call, and the state directory's lock with it, for hours per retry.
    Capping here works with every urllib3 2.x."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.backoff_max)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        """No retry for a certificate the CA did not sign: it is the same certificate at every try, and
        retrying held the call (and the state directory's lock) for the whole backoff, over a minute."""
        if error is not None and certificate_refused(error):
            raise MaxRetryError(_pool, url or "", error) from error  # type: ignore[arg-type]
        return super().increment(method, url, response, error, _pool, _stacktrace)


def certificate_refused(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is TLS refusing the server's certificate: not signed by the CA
    given, or not for that host."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        reason = getattr(current, "reason", None)
        wrapped = [arg for arg in current.args if isinstance(arg, BaseException)]
        pending += [
            reason if isinstance(reason, BaseException) else None,
            current.__cause__,
            current.__context__,
        ]
        pending += wrapped
    return False


def pinned_session(proxy_url: str | None, adapter: HTTPAdapter) -> requests.Session:
    """The device's one kind of HTTP session: nothing from the environment (`trust_env` off, see the
    module docstring), the boarding proxy or none, and `adapter` (its retries) for every request. TLS
    verification against the boarding CA and `allow_redirects=False` are given on each request."""
    session = requests.Session()
    session.trust_env = False
    if proxy_url:
        session.proxies = {"https": proxy_url, "http": proxy_url}
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts (seconds) and the retry budget; the defaults suit a gateway on a slow uplink."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4
    backoff_factor: float = 1.0  # waits of about 1, 2, 4, 8 s ...
    backoff_max: float = 60.0
    backoff_jitter: float = 1.0  # plus up to this much, so a fleet rebooting together spreads out

    def retry(self, kind: type[RetryKind] = BoundedRetry) -> RetryKind:  # type: ignore[assignment]
        return retry_policy(self.retries, self.backoff_factor, self.backoff_max, self.backoff_jitter, kind)


def retry_policy(
    retries: int,
    backoff_factor: float,
    backoff_max: float,
    backoff_jitter: float,
    kind: type[RetryKind] = BoundedRetry,  # type: ignore[assignment]
) -> RetryKind:
    """urllib3's retries as every hub call wants them: connection errors, read errors and the transient
    statuses alike, exponential backoff with jitter, no redirects, and the last answer returned rather
    than raised so the caller can report its status. `kind` is `BoundedRetry` or a subclass of it."""
    return kind(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=retries,
        redirect=0,
        allowed_methods=None,  # every method: see the module docstring
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff_factor,
        backoff_max=backoff_max,
        backoff_jitter=backoff_jitter,
        raise_on_status=False,
        raise_on_redirect=False,
        respect_retry_after_header=True,
    )


@dataclass(frozen=True)
class HubAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    #: an earlier try of this request may have reached the hub (its answer was lost, cut short or a 5xx):
    #: the hub may have acted on it, so a refusal of this one may be the consequence of our own first try
    repeated: bool = False

    def json(self) -> dict[str, Any]:
        try:
            document = json.loads(self.body)
        except ValueError as exc:
            raise HubProtocolError(f"the hub answered {self.status} with a body that is not JSON") from exc
        if not isinstance(document, dict):
            raise HubProtocolError(f"the hub answered {self.status} with JSON that is not an object")
        return document

    def error(self) -> tuple[str, str]:
        """The hub's `{"error", "error_description"}` (the OAuth shape every endpoint uses), or empty
        strings when the body is something else."""
        try:
            document = self.json()
        except HubProtocolError:
            return "", ""
        code, description = document.get("error"), document.get("error_description")
        return (code if isinstance(code, str) else "", description if isinstance(description, str) else "")


class HubSession:
    """HTTPS to one hub. Not thread-safe (one per thread, like a requests Session)."""

    def __init__(
        self,
        base_url: str,
        ca_file: Path,
        clock: HubClock,
        *,
        network: NetworkConfig | None = None,
        settings: HttpSettings | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._ca_file = str(ca_file)
        self._clock = clock
        self._settings = settings or HttpSettings()
        self._adapter = HTTPAdapter(max_retries=self._settings.retry())
        self._http = pinned_session(network.proxy_url if network else None, self._adapter)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, target: str, *, bearer: str | None = None, **kwargs: Any) -> HubAnswer:
        """`target` is a path under the base URL, or an absolute https URL the hub gave (the registration
        client URI). Network failures and 5xx that outlast the retries raise `HubUnreachableError`.

        An answer cut short after its headers (the connection dropped mid-body) is asked for again, with
        the same budget and backoff: urllib3's retries end once the headers are in, and the reasons that
        make retrying every method safe (module docstring) hold for a repeated request too."""
        url = self._url(target)
        cuts: Retry = self._settings.retry()
        while True:
            try:
                answer = self._attempt(method, url, bearer, kwargs)
                return replace(answer, repeated=True) if cuts.history else answer
            except _AnswerCut as cut:
                try:
                    cuts = cuts.increment(method=method, url=_origin(url), error=ProtocolError(cut.reason))
                except MaxRetryError:
                    raise HubUnreachableError(
                        f"the hub at {_origin(url)} kept cutting its answer short "
                        f"({self._settings.retries + 1} attempts): {cut.reason}"
                    ) from None
                cuts.sleep()

    def _attempt(self, method: str, url: str, bearer: str | None, kwargs: dict[str, Any]) -> HubAnswer:
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        timeout = (self._settings.connect_timeout, self._settings.read_timeout)
        retry = self._settings.retry(_TrackedRetry)
        tries = retry.tries
        self._adapter.max_retries = retry
        try:
            with self._http.request(
                method,
                url,
                headers=headers,
                timeout=timeout,
                verify=self._ca_file,
                allow_redirects=False,
                stream=True,
                **kwargs,
            ) as response:
                try:
                    body = _bounded_body(response)
                except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                    raise _AnswerCut(network_reason(exc)) from exc
                elapsed = response.elapsed.total_seconds()
                answer = HubAnswer(
                    response.status_code,
                    {k.lower(): v for k, v in response.headers.items()},
                    body,
                    repeated=tries.reached,
                )
        except requests.exceptions.SSLError as exc:
            raise HubUnreachableError(
                f"TLS to {_origin(url)} failed (is the hub's certificate from the boarding CA?): "
                f"{network_reason(exc)}",
                reached_the_hub=tries.reached_or_unknown,
            ) from exc
        except requests.exceptions.RequestException as exc:
            attempts = self._settings.retries + 1
            raise HubUnreachableError(
                f"cannot reach the hub at {_origin(url)} after {attempts} attempts: {network_reason(exc)}",
                reached_the_hub=tries.reached_or_unknown,
            ) from exc
        self._clock.observe(answer.headers, round_trip=elapsed)
        if answer.status >= 500:
            _, description = answer.error()
            detail = f": {description}" if description else ""
            raise HubUnreachableError(
                f"the hub at {_origin(url)} kept failing: {answer.status}{detail} "
                f"({self._settings.retries + 1} attempts); try again later"
            )
        return answer

    def _url(self, target: str) -> str:
        if target.startswith("/"):
            return self.base_url + target
        if urllib.parse.urlsplit(target).scheme != "https":
            raise HubProtocolError(f"the hub gave a URL that is not https: {target[:100]!r}")
        return target


def try_may_have_reached_the_hub(response: object | None, error: Exception | None) -> bool:
    """Whether a failed try may have reached the hub: it got an answer (a 5xx), or failed once the
    connection was up (a read timeout, a dropped connection). A try that could not connect or pass the
    proxy did not; urllib3 reports some TLS failures as read errors, which count as "may have"."""
    never_sent = (ConnectTimeoutError, ProxyError, SSLError)  # NewConnectionError is a ConnectTimeoutError
    return response is not None or (error is not None and not isinstance(error, never_sent))


class _Tries:
    """What the failed tries of one request came to."""

    def __init__(self) -> None:
        self.failed = 0
        self.reached = False  # one of them may have reached the hub

    @property
    def reached_or_unknown(self) -> bool:
        """For a request that failed in the end: False only when every try is known not to have left."""
        return self.reached or self.failed == 0


class _TrackedRetry(BoundedRetry):
    """The retry policy, noting in `tries` what each failed try came to: urllib3 keeps its history on the
    last answer, but drops it when the tries run out with an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tries = _Tries()

    def new(self, **kw: Any) -> Self:
        retry = super().new(**kw)
        retry.tries = self.tries  # one record for all the tries of one request
        return retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        self.tries.failed += 1
        self.tries.reached = self.tries.reached or try_may_have_reached_the_hub(response, error)
        return super().increment(method, url, response, error, _pool, _stacktrace)


class _AnswerCut(Exception):
    """The connection dropped after the answer's headers, before its whole body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _bounded_body(response: requests.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise HubProtocolError(f"the hub's answer exceeds {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def network_reason(exc: BaseException) -> str:
    """What went wrong on the network, in one line: the innermost cause ("[Errno 111] Connection
    refused"), without the layers requests and urllib3 wrap around it ("HTTPSConnectionPool(host=...):
    Max retries exceeded with url: /path?query (Caused by NewConnectionError(...))"), which repeat the
    request's URL, and a signed URL's credential with it."""
    cause = exc
    for _ in range(16):  # the wrapping is a few layers deep; a cycle of causes must not loop for ever
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        if inner is None and not str(cause) and cause.__context__ is not None:
            inner = cause.__context__
        if inner is None:
            break
        cause = inner
    text = re.sub(r"^\w+\(host=[^)]*\): ", "", " ".join(str(cause).split()))
    text = text.removeprefix("Failed to establish a new connection: ")
    return text[:300] if text else type(cause).__name__

"""The one way the device talks to its hub: TLS verified against the boarding CA, the boarding proxy,
bounded retries with exponential backoff and jitter, bounded answers, and the hub's clock.

- TLS: `verify=` the CA file on every request and `trust_env = False`: requests would otherwise prefer
  `REQUESTS_CA_BUNDLE` from the environment over `Session.verify`, read ~/.netrc (basic credentials
  replacing our bearer token) and route through an environment proxy. The proxy comes only from the
  boarding data's network configuration.
- Retries: urllib3's `Retry` through requests' `HTTPAdapter`, for connection errors, timeouts, dropped
  connections and 429/5xx, on every method; an answer cut short after its headers is asked for again
  with the same budget. That is safe here: registering again is refused as in
  progress (429) or as a used IAT; renewing again with the same RAT is what the hub's previous-RAT rule
  exists for; a token request sent again is refused as a spent assertion, and the client signs a new one
  (`mers.client`).
- Redirects are not followed: a bearer token must never be sent where the hub did not ask for it.
- Answers are read up to `MAX_ANSWER` bytes: a hostile or broken server cannot fill the device's memory.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProtocolError, ProxyError, SSLError
from urllib3.util.retry import Retry

from .boarding import NetworkConfig
from .clock import HubClock
from .errors import HubProtocolError, HubUnreachableError

MAX_ANSWER = 1 << 20
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts (seconds) and the retry budget; the defaults suit a gateway on a slow uplink."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4
    backoff_factor: float = 1.0  # waits of about 1, 2, 4, 8 s ...
    backoff_max: float = 60.0
    backoff_jitter: float = 1.0  # plus up to this much, so a fleet rebooting together spreads out

    def retry(self) -> Retry:
        return retry_policy(self.retries, self.backoff_factor, self.backoff_max, self.backoff_jitter)


def retry_policy(retries: int, backoff_factor: float, backoff_max: float, backoff_jitter: float) -> Retry:
    """urllib3's retries as every hub call wants them: connection errors, read errors and the transient
    statuses alike, exponential backoff with jitter, no redirects, and the last answer returned rather
    than raised so the caller can report its status."""
    return Retry(
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
    #: the request went out more than once (an answer was lost, cut short or a 5xx): the hub may have
    #: acted on an earlier copy, so a refusal of this one may be the consequence of our own first try
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
        self._http = requests.Session()
        self._http.trust_env = False
        if network is not None:
            self._http.proxies = {"https": network.proxy_url, "http": network.proxy_url}
        adapter = HTTPAdapter(max_retries=self._settings.retry())
        self._http.mount("https://", adapter)
        self._http.mount("http://", adapter)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, target: str, *, bearer: str | None = None, **kwargs: Any) -> HubAnswer:
        """`target` is a path under the base URL, or an absolute https URL the hub gave (the registration
        client URI). Network failures and 5xx that outlast the retries raise `HubUnreachableError`.

        An answer cut short after its headers (the connection dropped mid-body) is asked for again, with
        the same budget and backoff: urllib3's retries end once the headers are in, and the reasons that
        make retrying every method safe (module docstring) hold for a repeated request too."""
        url = self._url(target)
        cuts = self._settings.retry()
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
                    raise _AnswerCut(_reason(exc)) from exc
                elapsed = response.elapsed.total_seconds()
                answer = HubAnswer(
                    response.status_code,
                    {k.lower(): v for k, v in response.headers.items()},
                    body,
                    repeated=may_have_reached_the_hub(getattr(response.raw, "retries", None)),
                )
        except requests.exceptions.SSLError as exc:
            raise HubUnreachableError(
                f"TLS to {_origin(url)} failed (is the hub's certificate from the boarding CA?): "
                f"{_reason(exc)}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            attempts = self._settings.retries + 1
            raise HubUnreachableError(
                f"cannot reach the hub at {_origin(url)} after {attempts} attempts: {_reason(exc)}"
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


def may_have_reached_the_hub(retries: Retry | None) -> bool:
    """Whether an earlier try of this request may have reached the hub: it got a status, or failed after
    the connection was up (a read timeout, a dropped connection). A try that failed to connect, to pass
    the proxy or to set up TLS never did."""
    never_sent = (ConnectTimeoutError, ProxyError, SSLError)  # NewConnectionError is a ConnectTimeoutError
    return any(
        entry.status is not None or (entry.error is not None and not isinstance(entry.error, never_sent))
        for entry in (retries.history if retries is not None else ())
    )


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


def _reason(exc: BaseException) -> str:
    """The innermost cause, on one line, without the URL (which may carry a signed query)."""
    while exc.__context__ is not None and not str(exc):
        exc = exc.__context__
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__

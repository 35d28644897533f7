"""The operator's client of the hub's HTTP API: what `mers-hub agent|release|task` call.

It hands back the hub's JSON documents as the hub sent them (so `--json` prints exactly the API's answer)
and turns every failure into one `HubError` whose message is one line:

- TLS is always verified against the hub's own CA, passed with each request. requests prefers the
  `REQUESTS_CA_BUNDLE` environment variable over `Session.verify`, so a session-wide setting would quietly
  trust the system store instead of the hub's CA: the real hub would then fail to verify, and a server
  holding any publicly trusted certificate for that name would pass.
- Every request has a timeout, so a hub that stops answering cannot hang a script.
- The admin token only ever travels in the `Authorization` header; no message, repr or log line holds it.
- A release is streamed from its file as the body, never read whole into memory (images reach gigabytes).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import requests

from signing import ImageVersion, SigningError

from .errors import HubError, HubSetupError, NotFoundError
from .home import HubHome

AGENTS = "/api/agentmanagement/v3"
FIRMWARE = "/api/firmwaredeployment/v3"

#: a JSON object exactly as the hub sent it
JsonObject = dict[str, Any]
#: called with the number of bytes just sent
Progress = Callable[[int], None]

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: the hub verifies a whole image (hash and signatures) before it answers an upload
UPLOAD_READ_TIMEOUT = 600.0
UPLOAD_CHUNK = 1 << 20


class HubRefusedError(HubError):
    """The hub answered with an error; it carries the hub's status and code."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(f"{description} ({code}, HTTP {status})", code=code)
        self.status = status


class HubUnreachableError(HubError):
    """No usable answer: the connection failed, TLS verification failed, the hub timed out, or what
    answered does not speak the hub's API."""

    code = "hub_unreachable"


class LocalFileError(HubError):
    """A file named on the command line (token, CA, image, key) cannot be read."""

    code = "local_file"


class ImageShrankError(LocalFileError):
    """The image ended before the size the upload declared (it shrank while being sent): the upload was
    aborted, and the hub stored nothing."""


@dataclass(frozen=True)
class ReleaseUpload:
    """The release holding the uploaded bytes; `created` is False when they were already a release."""

    release: JsonObject
    created: bool


@dataclass(frozen=True)
class HubConnection:
    """Where the hub is, how to trust it, and the admin token (kept out of `repr`)."""

    url: str
    ca: Path
    token: str = field(repr=False)

    @classmethod
    def resolve(
        cls,
        directory: Path | None,
        url: str | None = None,
        token_file: Path | None = None,
        ca: Path | None = None,
    ) -> HubConnection:
        """From a hub directory (`DIR/url`, `DIR/admin-token`, `DIR/ca.pem`), each file replaceable by an
        explicit option; without a directory all three options are needed."""
        if directory is None:
            if url is None or token_file is None or ca is None:
                raise HubSetupError("say which hub: --dir DIR, or all of --url, --token-file and --ca")
            return cls._from_files(url, token_file, ca)
        home = HubHome(directory)
        return cls._from_files(
            url or _read_url(home), token_file or home.admin_token, ca or home.ca_certificate
        )

    @classmethod
    def _from_files(cls, url: str, token_file: Path, ca: Path) -> HubConnection:
        token = _read_text(token_file, "the admin token").strip()
        if not token:
            raise LocalFileError(f"{token_file} is empty: it should hold the admin token")
        if not ca.is_file():
            raise LocalFileError(f"the CA certificate {ca} does not exist")
        return cls(url.rstrip("/"), ca, token)


def _read_url(home: HubHome) -> str:
    try:
        text = home.url_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        if not home.settings_file.is_file():
            raise HubSetupError(f"{home.root} is not a hub directory (no hub.toml)") from exc
        raise HubSetupError(
            f"{home.url_file} is missing: is the hub running? (mers-hub serve {home.root})"
        ) from exc
    except OSError as exc:
        raise HubSetupError(f"cannot read {home.url_file}: {exc.strerror}") from exc
    if not text.startswith("https://"):
        raise HubSetupError(f"{home.url_file} does not hold an https:// URL")
    return text


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LocalFileError(f"cannot read {what} from {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise LocalFileError(f"{path} is not text: it should hold {what}") from exc


class AdminClient:
    """The admin endpoints of one hub, over one keep-alive session. Use it as a context manager."""

    def __init__(self, connection: HubConnection) -> None:
        self.connection = connection
        self.http = requests.Session()
        # nothing from the environment: a ~/.netrc entry for the hub's host would replace the bearer token
        # with basic credentials, and a proxy meant for the internet would carry the hub's admin traffic
        self.http.trust_env = False

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.close()

    # --- agents -----------------------------------------------------------------------------------

    def create_agent(self, name: str, profile: str, description: str | None = None) -> JsonObject:
        body: JsonObject = {"name": name, "securityProfile": profile}
        if description is not None:
            body["description"] = description
        return self._json("POST", f"{AGENTS}/agents", json=body)

    def list_agents(self, *, page: int = 0, size: int = 100, name: str | None = None) -> JsonObject:
        params: dict[str, str | int] = {"page": page, "size": size}
        if name is not None:
            params["name"] = name
        return self._json("GET", f"{AGENTS}/agents", params=params)

    def agent(self, agent_id: str) -> JsonObject:
        return self._json("GET", f"{AGENTS}/agents/{_segment(agent_id)}")

    def delete_agent(self, agent_id: str) -> JsonObject:
        """Delete the agent as it is now, and return it as it was: its current eTag goes in `If-Match`,
        so a change made by someone else in between makes the hub refuse (412) rather than delete what
        we did not see."""
        agent = self.agent(agent_id)
        etag = agent["eTag"]
        self._send("DELETE", f"{AGENTS}/agents/{_segment(agent_id)}", headers={"If-Match": f'"{etag}"'})
        return agent

    def boarding_configuration(self, agent_id: str) -> JsonObject:
        return self._json("GET", f"{AGENTS}/agents/{_segment(agent_id)}/boarding/configuration")

    def boarding_status(self, agent_id: str) -> JsonObject:
        return self._json("GET", f"{AGENTS}/agents/{_segment(agent_id)}/boarding/status")

    def offboard(self, agent_id: str) -> JsonObject:
        return self._json("POST", f"{AGENTS}/agents/{_segment(agent_id)}/boarding/offboard")

    def agent_names(self, agent_ids: set[str]) -> dict[str, str]:
        """The name of each agent in `agent_ids` that still exists (a deleted one keeps only its id)."""
        names = {}
        for agent_id in sorted(agent_ids):
            try:
                names[agent_id] = str(self.agent(agent_id)["name"])
            except HubRefusedError as exc:
                if exc.status != NotFoundError.status:
                    raise
        return names

    def resolve_agent(self, reference: str) -> str:
        """The id of the agent whose id or name is `reference`; refused when it is the id of one agent
        and the name of another, since acting on the wrong gateway is worse than asking again."""
        listed = self.list_agents(name=reference).get("content", [])
        named = [entry["id"] for entry in listed if entry.get("name") == reference]
        try:
            by_id: str | None = self.agent(reference)["id"]
        except HubRefusedError as exc:
            if exc.status != NotFoundError.status:
                raise
            by_id = None
        candidates = set(named) | ({by_id} if by_id else set())
        if not candidates:
            raise HubRefusedError(404, "not_found", f"no agent has the id or name {reference!r}")
        if len(candidates) > 1:
            raise HubRefusedError(
                409, "ambiguous", f"{reference!r} is the id of one agent and the name of another; use an id"
            )
        return candidates.pop()

    # --- releases and their trust -------------------------------------------------------------------

    def add_trusted_key(self, public_key: Path, name: str) -> JsonObject:
        """Trust the PEM public key in the file `public_key` for release uploads. A private key is refused
        here, before it is sent anywhere: the hub would refuse it too, but only after receiving it."""
        pem = _read_text(public_key, "a PEM public key")
        if "PRIVATE KEY-----" in pem:
            raise LocalFileError(
                f"{public_key} holds a private key; trust its public half: mers-sign getpub KEY -o PUB.pem"
            )
        return self._json("POST", f"{FIRMWARE}/trustedKeys", json={"name": name, "pem": pem})

    def trusted_keys(self) -> JsonObject:
        return self._json("GET", f"{FIRMWARE}/trustedKeys")

    def upload_release(self, image: Path, name: str, progress: Progress | None = None) -> ReleaseUpload:
        """Stream `image` to the hub, which verifies it against its trusted keys (422 if it fails)."""
        with _open_image(image) as (handle, size):
            body = _StreamedFile(handle, image, size, progress)
            response = self._send(
                "POST",
                f"{FIRMWARE}/releases",
                params={"name": name},
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                read_timeout=UPLOAD_READ_TIMEOUT,
            )
        # 201: a new release; 200: these bytes already are one, and that release is the answer
        return ReleaseUpload(self._document(response), created=response.status_code == 201)

    def releases(self) -> JsonObject:
        return self._json("GET", f"{FIRMWARE}/releases")

    def resolve_release(self, reference: str) -> str:
        """The id of the release whose id or version is `reference` (`1.2.0+7`, as `release list` shows
        it, or `1.2.0` for a build number of 0); refused when a version names several releases (for other
        hardware, say)."""
        listed = self.releases().get("content", [])
        found = sorted(
            {
                str(entry["id"])
                for entry in listed
                if reference == entry.get("id") or _same_version(reference, entry.get("version"))
            }
        )
        if not found:
            raise HubRefusedError(404, "not_found", f"no release has the id or version {reference!r}")
        if len(found) > 1:
            raise HubRefusedError(
                409,
                "ambiguous",
                f"{len(found)} releases have the version {reference!r}: use an id ({', '.join(found)})",
            )
        return found[0]

    # --- installation tasks -------------------------------------------------------------------------

    def create_task(self, device_id: str, release_id: str) -> JsonObject:
        body = {"deviceId": device_id, "softwareType": "FIRMWARE", "softwareReleaseId": release_id}
        return self._json("POST", f"{FIRMWARE}/installationTasks", json=body)

    def tasks(self, *, device_id: str | None = None, status: str | None = None) -> JsonObject:
        params = {key: value for key, value in (("deviceId", device_id), ("status", status)) if value}
        return self._json("GET", f"{FIRMWARE}/installationTasks", params=params)

    def task(self, task_id: str) -> JsonObject:
        return self._json("GET", f"{FIRMWARE}/installationTasks/{_segment(task_id)}")

    def cancel_task(self, task_id: str) -> JsonObject:
        """Move the task to CANCELED. No `If-Match`: a device's progress reports change the eTag every few
        seconds, and the hub's state machine already refuses (409) to cancel a task that has closed."""
        body = {"state": "CANCELED", "message": "canceled by the operator"}
        return self._json("PATCH", f"{FIRMWARE}/installationTasks/{_segment(task_id)}", json=body)

    # --- the wire -----------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        return self._document(self._send(method, path, **kwargs))

    def _document(self, response: requests.Response) -> JsonObject:
        where = f"{self.connection.url} answered {response.request.method} {urlsplit(response.url).path}"
        try:
            document = response.json()
        except ValueError as exc:
            raise HubUnreachableError(f"{where} with something that is not JSON") from exc
        if not isinstance(document, dict):
            raise HubUnreachableError(f"{where} with JSON that is not an object")
        return document

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        read_timeout: float = READ_TIMEOUT,
        **kwargs: Any,
    ) -> requests.Response:
        url = self.connection.url + path
        all_headers = {
            "Authorization": f"Bearer {self.connection.token}",
            "Accept": "application/json",
            **(headers or {}),
        }
        try:
            response = self.http.request(
                method,
                url,
                headers=all_headers,
                verify=str(self.connection.ca),
                timeout=(CONNECT_TIMEOUT, read_timeout),
                allow_redirects=False,  # a redirect would carry the admin token to another address
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise HubUnreachableError(
                f"TLS with {self.connection.url} failed (trusting {self.connection.ca}): {_root_cause(exc)}"
            ) from exc
        except requests.exceptions.Timeout as exc:
            raise HubUnreachableError(f"{self.connection.url} did not answer in time") from exc
        except requests.exceptions.RequestException as exc:
            raise HubUnreachableError(f"cannot reach {self.connection.url}: {_root_cause(exc)}") from exc
        if response.status_code >= 300:
            raise _refusal(response)
        return response


def _segment(value: str) -> str:
    """`value` as one path segment, so an id like `../x` cannot reach another endpoint."""
    return quote(value, safe="")


def _refusal(response: requests.Response) -> HubError:
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        description = str(document.get("error_description") or document["error"])
        return HubRefusedError(response.status_code, document["error"], _one_line(description))
    if response.status_code >= 500:
        return HubRefusedError(response.status_code, "server_error", f"the hub failed: {response.reason}")
    return HubUnreachableError(
        f"{response.url.split('?')[0]} answered HTTP {response.status_code} {response.reason} without the "
        "hub's error document: is this the hub's URL?"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error ("Connection refused"), without the layers of
    pool and connection descriptions around it."""
    cause: BaseException = exc
    while True:
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        if inner is None:
            break
        cause = inner
    text = re.sub(r"^\w+\(host=[^)]*\): ", "", str(cause))
    return _one_line(text) or type(cause).__name__


@contextmanager
def _open_image(image: Path) -> Iterator[tuple[BinaryIO, int]]:
    """The image and the size its upload declares. A regular file only: a pipe or a device has no size
    to declare (a pipe's reads as 0). Opened without blocking, so a FIFO is refused, not waited on."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalFileError(f"cannot read the image {image}: {exc.strerror}") from exc
    with open(fd, "rb") as handle:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise LocalFileError(
                f"the image {image} is not a regular file: upload a file, not a pipe or device"
            )
        yield handle, status.st_size


class _StreamedFile:
    """A file as a request body of known length, read a chunk at a time as the socket takes it.

    Having a length, it is sent with `Content-Length` (so the hub can refuse an oversized image before
    reading it) rather than chunked, and exactly that many bytes are sent: what a growing file gains
    meanwhile is not (it would follow the body on the connection), and a file that ends early raises
    `ImageShrankError`, which aborts the request instead of leaving the hub waiting for bytes that never
    come."""

    def __init__(self, handle: BinaryIO, image: Path, length: int, progress: Progress | None) -> None:
        self.handle = handle
        self.image = image
        self.length = length
        self.remaining = length
        self.progress = progress

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = UPLOAD_CHUNK) -> bytes:
        wanted = min(size if size > 0 else UPLOAD_CHUNK, self.remaining)
        if not wanted:
            return b""
        chunk = self.handle.read(wanted)
        if not chunk:
            raise ImageShrankError(
                f"the image {self.image} ended {self.remaining} bytes short of its {self.length} bytes: "
                "it changed during the upload, which was aborted"
            )
        self.remaining -= len(chunk)
        if self.progress is not None:
            self.progress(len(chunk))
        return chunk


def _same_version(reference: str, version: object) -> bool:
    """Whether `reference` is the image version `version`, as the images' own format compares them."""
    try:
        return isinstance(version, str) and ImageVersion.parse(reference) == ImageVersion.parse(version)
    except SigningError:
        return False

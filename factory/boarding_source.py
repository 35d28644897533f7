"""Where a board's boarding configuration (and its IAT) comes from: the hub's admin API, or a batch file.

Both sources hand back a `Boarding`: the configuration as the exact bytes the board will store (canonical
JSON, so the same configuration always hashes the same, whichever source it came from, and a re-run can
recognise a board it already provisioned) and the facts the records keep about the IAT (`jti`, expiry)
instead of the token itself, which is a credential.

- `HubSource` finds or creates the agent named after the board's serial number and fetches its
  configuration; it refuses an agent that already onboarded (its IAT is used, and offboarding it would cut
  a working device off), and when the IAT expires within the margin it offboards the agent to get a fresh
  one.
- `BatchSource` reads JSON lines ``{"serial", "agentId"?, "boarding"}`` exported from the hub with
  `export_batch` (`mers-factory batch export`), for a line without access to the hub.

The hub is reached with TLS verified against its CA on every request (`verify=` per request, and the
session ignores the environment, since requests prefers ``REQUESTS_CA_BUNDLE`` over `Session.verify`); the
admin token travels only in the Authorization header and is never part of a message or repr. A URL that
is not ``https`` is refused before any request (`verify=` means nothing over plain HTTP: the token would
cross the network in clear), and redirects are not followed (requests keeps the header on a redirect to
another path of the same origin, which a proxy may route to another service).
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import jwt
import requests

from board import protocol as wire

from .errors import (
    AgentOnboardedError,
    BatchFileError,
    DuplicateAgentsError,
    HubRefusedError,
    HubUnreachableError,
    IatError,
    InputError,
)

AGENTS: Final = "/api/agentmanagement/v3"
HUB_TIMEOUT_S: Final = (10.0, 30.0)
PROFILES: Final = ("SHARED_SECRET", "RSA_3072")
MAX_BATCH_LINE: Final = 64 * 1024
AGENT_PAGE_SIZE: Final = 100  # the hub lists one agent by name; more shows duplicates or an ignored filter
#: a listing that ignores the name filter is read to its end, up to this many pages
MAX_AGENT_PAGES: Final = 1000
# the widths of the records' columns that keep these values (factory.records.attempts)
MAX_ID: Final = 128
MAX_JTI: Final = 256
MAX_EXPIRES: Final = 253402300800  # 10000-01-01T00:00:00Z


@dataclass(frozen=True)
class Boarding:
    """One serial number's boarding configuration, ready to write."""

    serial_number: str
    agent_id: str | None
    config: bytes = field(repr=False)  # holds the IAT: kept out of reprs and logs
    client_id: str
    iat_jti: str
    iat_expires: int

    def expires_within(self, not_before: float) -> bool:
        return self.iat_expires < not_before


def canonical_json(document: object) -> bytes:
    """Sorted keys, no blanks: equal documents are equal bytes, so the board's hash of them is stable."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_boarding(serial_number: str, agent_id: str | None, document: object) -> Boarding:
    """A `Boarding` from a configuration document (as the hub serves it); `ValueError` names what is wrong.

    The IAT's claims are read without checking its signature: that is the hub's to check at onboarding;
    here they only give the expiry and the ``jti`` the records keep."""
    if not isinstance(document, dict) or not isinstance(document.get("content"), dict):
        raise ValueError("the boarding configuration has no content object")
    content = document["content"]
    client_id, token = content.get("clientId"), content.get("iat")
    if not isinstance(client_id, str) or not isinstance(token, str):
        raise ValueError("the boarding configuration lacks clientId or iat")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise ValueError("the IAT is not a JWT") from None
    jti, expires = claims.get("jti"), claims.get("exp")
    if not isinstance(jti, str) or not jti:
        raise ValueError("the IAT has no jti")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise ValueError("the IAT has no exp")
    if not 0 <= expires < MAX_EXPIRES:  # NaN fails too: a year beyond 9999 is no expiry the records keep
        raise ValueError("the IAT's exp is not a time before the year 10000")
    if claims.get("sub") != client_id:
        raise ValueError("the IAT was not issued for the configuration's clientId")
    # what the records keep must be storable: checked before a board is written, not after it is locked
    check_serial_number(serial_number)
    _check_text(jti, "the IAT's jti", MAX_JTI)
    _check_text(client_id, "clientId", MAX_ID)
    if agent_id is not None:
        _check_text(agent_id, "agentId", MAX_ID)
    try:
        config = canonical_json(document)
    except UnicodeEncodeError:
        raise ValueError("the boarding configuration holds text that is not UTF-8") from None
    return Boarding(serial_number, agent_id, config, client_id, jti, int(expires))


def check_serial_number(serial_number: str) -> None:
    """`ValueError` unless the board's protocol can carry `serial_number` (and the records keep it)."""
    _check_text(serial_number, "the serial number", wire.MAX_SERIAL_NUMBER)


def _check_text(value: str, what: str, longest: int) -> None:
    if not 0 < len(value) <= longest or not value.isprintable():
        raise ValueError(f"{what} must be 1 to {longest} printable characters")


class BoardingSource(Protocol):
    """What the station needs of a source of boarding configurations."""

    def current(self, serial_number: str) -> Boarding | None:
        """The configuration as it stands, changing nothing (None when there is none for this serial)."""
        ...

    def fresh(self, serial_number: str, not_before: float) -> Boarding:
        """A configuration whose IAT is valid at least until `not_before`, or `IatError`."""
        ...


# --- the hub -------------------------------------------------------------------------------------------


class BoardingStatus(enum.StrEnum):
    """An agent's boarding status as the hub's admin API reports it (docs/design.md §7).

    ONBOARDING is what the hub reports as soon as the configuration was handed out, which `fresh` does
    itself, and also while a registration is in progress: the admin API does not tell the two apart."""

    NOT_ONBOARDED = "NOT_ONBOARDED"
    ONBOARDING = "ONBOARDING"
    ONBOARDED = "ONBOARDED"


@dataclass
class HubSource:
    """The hub's admin API (Agent Management v3): one agent per board, named after its serial number."""

    url: str
    ca: Path
    token: str = field(repr=False)
    profile: str = "SHARED_SECRET"
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        _check_hub_url(self.url)
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE must not replace the hub's CA

    @classmethod
    def from_files(cls, url: str, token_file: Path, ca: Path, profile: str = "SHARED_SECRET") -> HubSource:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise InputError(f"cannot read the hub token file {token_file}: {error.strerror}") from None
        if not token:
            raise InputError(f"the hub token file {token_file} is empty", field="hub-token-file")
        if not ca.is_file():
            raise InputError(f"the hub CA {ca} does not exist", field="hub-ca")
        return cls(url, ca, token, profile)

    def current(self, serial_number: str) -> Boarding | None:
        agent_id = self._find_agent(serial_number)
        if agent_id is None:
            return None
        return self._configuration(serial_number, agent_id)

    def fresh(self, serial_number: str, not_before: float) -> Boarding:
        """The agent's configuration, its IAT renewed by offboarding when it expires within the margin.

        The status is asked on every call, after the configuration: the hub keeps handing out an IAT after
        it was used, and a board sealed with a used IAT can never onboard. An agent ONBOARDING is given its
        configuration: that status is what handing the configuration out sets (a re-run, a second station,
        an exported batch), and the records keep one IAT from being burned into two boards."""
        agent_id = self._find_agent(serial_number) or self._create_agent(serial_number)
        boarding = self._configuration(serial_number, agent_id)
        status = self._status(agent_id)
        if status is BoardingStatus.ONBOARDED:
            raise AgentOnboardedError(serial_number, agent_id, status.value, boarding)
        if not boarding.expires_within(not_before):
            return boarding
        self._request("POST", f"/agents/{agent_id}/boarding/offboard")
        boarding = self._configuration(serial_number, agent_id)
        if boarding.expires_within(not_before):
            raise IatError(
                f"the hub issues IATs that expire within the margin (jti {boarding.iat_jti})", boarding
            )
        return boarding

    def _status(self, agent_id: str) -> BoardingStatus:
        status = self._request("GET", f"/agents/{agent_id}/boarding/status").get("status")
        if not isinstance(status, str) or status not in BoardingStatus.__members__:
            raise HubRefusedError(f"the hub's boarding status of agent {agent_id} is not understood", 200)
        return BoardingStatus(status)

    def _find_agent(self, serial_number: str) -> str | None:
        """The id of the one agent named `serial_number`, or None when there is none.

        Each listed agent's name is checked rather than trusting the hub's filter: a listing that ignored
        it (as an API may ignore a query parameter) handed a board the first agent listed, another board's
        agent and IAT. Several agents with that name are refused: which one is this board's is unknown.
        Such a listing is read to its last page: an agent past the first one was missed, and the station
        created a second agent with the board's name."""
        named: list[str] = []
        for number in range(MAX_AGENT_PAGES):
            params = {"name": serial_number, "size": AGENT_PAGE_SIZE, "page": number}
            page = self._request("GET", "/agents", params=params)
            content = page.get("content")
            if not isinstance(content, list):
                break
            if not all(isinstance(agent, dict) and isinstance(agent.get("id"), str) for agent in content):
                raise HubRefusedError("the hub's agent list is not understood", 200)
            named += [agent["id"] for agent in content if agent.get("name") == serial_number]
            if not content or _last_page(page, number):
                break
        else:
            raise HubRefusedError(f"the hub lists more than {MAX_AGENT_PAGES} pages of agents", 200)
        if len(named) > 1:
            raise DuplicateAgentsError(serial_number, named)
        return named[0] if named else None

    def _create_agent(self, serial_number: str) -> str:
        try:
            agent = self._request(
                "POST", "/agents", json={"name": serial_number, "securityProfile": self.profile}
            )
        except HubRefusedError as error:
            if error.status != 409:
                raise
            found = self._find_agent(serial_number)  # another station created it first
            if found is None:
                raise
            return found
        agent_id = agent.get("id")
        if not isinstance(agent_id, str):
            raise HubRefusedError("the hub's new agent has no id", 201)
        return agent_id

    def _configuration(self, serial_number: str, agent_id: str) -> Boarding:
        document = self._request("GET", f"/agents/{agent_id}/boarding/configuration")
        try:
            return parse_boarding(serial_number, agent_id, document)
        except ValueError as error:
            raise HubRefusedError(
                f"the hub's boarding configuration for {serial_number}: {error}", 200
            ) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.session.request(
                method,
                self.url + AGENTS + path,
                headers={"Authorization": f"Bearer {self.token}"},
                verify=str(self.ca),
                timeout=HUB_TIMEOUT_S,
                allow_redirects=False,
                **kwargs,
            )
        except requests.exceptions.SSLError:
            raise HubUnreachableError(f"TLS verification of {self.url} against {self.ca} failed") from None
        except requests.RequestException as error:
            raise HubUnreachableError(
                f"the hub at {self.url} is unreachable ({type(error).__name__})"
            ) from None
        if response.is_redirect:
            raise HubRefusedError(
                f"the hub answered {method} {path} with a redirect (HTTP {response.status_code}), not "
                "followed: the admin token goes to the --hub URL only; give the hub's own URL",
                response.status_code,
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.ok:
            reason = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise HubRefusedError(
                f"the hub refused {method} {path}: HTTP {response.status_code} {reason or response.reason}",
                response.status_code,
            )
        if not isinstance(body, dict):
            raise HubUnreachableError(f"{self.url} does not answer like a hub (no JSON object)")
        return body


def _check_hub_url(url: str) -> None:
    """Only ``https://HOST[:PORT]``: over plain HTTP the admin token would travel in clear, and the
    request would go out unverified whatever CA is given."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise InputError("the hub's URL is not a URL (https://HOST:PORT)", field="hub") from None
    if parts.scheme != "https" or not parts.hostname:
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise InputError(
            f"the hub's URL must be https://HOST:PORT (not {scheme}): the admin token travels only over TLS",
            field="hub",
        )


# --- batch files ---------------------------------------------------------------------------------------


@dataclass
class BatchSource:
    """A batch file of JSON lines ``{"serial", "agentId"?, "boarding"}``, one per board."""

    entries: dict[str, Boarding]

    @classmethod
    def load(cls, path: Path) -> BatchSource:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BatchFileError(f"cannot read the batch file {path}: {error}") from None
        return cls(parse_batch(text.splitlines(), str(path)))

    def current(self, serial_number: str) -> Boarding | None:
        return self.entries.get(serial_number)

    def fresh(self, serial_number: str, not_before: float) -> Boarding:
        boarding = self.entries.get(serial_number)
        if boarding is None:
            raise BatchFileError(f"the batch file has no boarding configuration for {serial_number}")
        if boarding.expires_within(not_before):
            raise IatError(
                f"the IAT for {serial_number} (jti {boarding.iat_jti}) expires within the margin: "
                "export a fresh batch",
                boarding,
            )
        return boarding


def parse_batch(lines: Iterable[str], source: str = "batch") -> dict[str, Boarding]:
    """Every line's `Boarding`, by serial number; blank lines are allowed, anything else wrong is a
    `BatchFileError` naming the line (a batch is refused whole, before any board is touched)."""
    entries: dict[str, Boarding] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        if len(line) > MAX_BATCH_LINE:
            raise BatchFileError(f"{where} is longer than {MAX_BATCH_LINE} characters")
        try:
            item = json.loads(line)
        except ValueError:
            raise BatchFileError(f"{where} is not JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("serial"), str) or not item["serial"]:
            raise BatchFileError(f"{where} is not an object with a serial")
        agent_id = item.get("agentId")
        if agent_id is not None and not isinstance(agent_id, str):
            raise BatchFileError(f"{where}: agentId is not a string")
        try:
            boarding = parse_boarding(item["serial"], agent_id, item.get("boarding"))
        except ValueError as error:
            raise BatchFileError(f"{where}: {error}") from None
        if boarding.serial_number in entries:
            raise BatchFileError(f"{where}: {boarding.serial_number} appears twice")
        entries[boarding.serial_number] = boarding
    return entries


def batch_line(boarding: Boarding) -> str:
    document = json.loads(boarding.config)
    return json.dumps({"serial": boarding.serial_number, "agentId": boarding.agent_id, "boarding": document})


def export_batch(
    source: BoardingSource, serial_numbers: Iterable[str], output: Path, not_before: float
) -> int:
    """Write a batch file for `serial_numbers` (each IAT valid until `not_before`), atomically and readable
    by its owner only: it holds credentials. Returns the number of lines."""
    lines = [batch_line(source.fresh(serial, not_before)) for serial in dict.fromkeys(serial_numbers)]
    try:
        _write_secret_atomically(output, "".join(line + "\n" for line in lines).encode())
    except OSError as error:
        raise InputError(f"cannot write the batch file {output}: {error.strerror}", field="output") from None
    return len(lines)


def _write_secret_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or what it held before: a temporary file beside it (created 0600 by
    mkstemp, so the IATs are never readable by others, even for a moment), fsynced, renamed over it, and
    the directory fsynced so the rename survives a power cut. Any failure (a full disk) removes the
    temporary file, which holds credentials. `board.storage` has its like; docs/design.md §2 keeps the
    factory to `board.protocol`."""
    directory = path.absolute().parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _last_page(page: dict[str, Any], number: int) -> bool:
    """Whether `page` (Spring Data's shape) is the listing's last; a page that does not say is."""
    last, pages = page.get("last"), page.get("totalPages")
    if isinstance(last, bool):
        return last
    if isinstance(pages, int) and not isinstance(pages, bool):
        return number + 1 >= pages
    return True

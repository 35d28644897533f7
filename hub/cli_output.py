"""How `mers-hub` shows things: the hub's documents as short tables and lines for people, and every
failure as one line on stderr with an exit code that says which kind it was (see `hub.cli`).

People get what they act on; secrets stay out of the human views: a boarding configuration's IAT and an
artifact's signed URL are credentials, shown only by `--json`, which a script asks for on purpose. Free
text in them (a task's message comes from the device) is shown with its control characters escaped, so
it can neither forge a line of a listing nor send escape sequences to the operator's terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import click

from .admin_client import HubUnreachableError, JsonObject, LocalFileError
from .errors import HubError, HubSetupError
from .texts import escaped

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors as one line on stderr and a distinct exit code; no traceback for what a user can fix."""
    try:
        yield
    except HubError as error:
        # one line even when the reason quotes a multi-line message (a database driver's, say)
        click.echo(f"mers-hub: error: {' '.join(str(error).split())}", err=True)
        sys.exit(exit_code(error))


def exit_code(error: HubError) -> int:
    if isinstance(error, HubSetupError | HubUnreachableError | LocalFileError):
        return EXIT_SETUP
    return EXIT_REFUSED


def echo_json(document: JsonObject) -> None:
    click.echo(json.dumps(document, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, headers first."""
    cells = [list(headers), *[[_cell(value) for value in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return escaped(str(value))


def when(value: Any) -> str:
    """An ISO time from the hub to the second: `2026-03-01 12:00:00Z`."""
    if not isinstance(value, str) or len(value) < 19:
        return _cell(value)
    return value[:10] + " " + value[11:19] + "Z"


def percent(value: Any) -> str:
    return f"{round(float(value) * 100)}%" if isinstance(value, int | float) else "-"


# --- agents -----------------------------------------------------------------------------------------


def agents_table(page: JsonObject) -> str:
    agents = page.get("content", [])
    rows = [
        (a.get("id"), a.get("name"), a.get("securityProfile"), when(a.get("createdAt")), a.get("description"))
        for a in agents
    ]
    text = table(("ID", "NAME", "PROFILE", "CREATED", "DESCRIPTION"), rows) if rows else "no agents"
    number, pages = page.get("number", 0), page.get("totalPages", 1)
    if isinstance(number, int) and isinstance(pages, int) and pages > 1:
        text += f"\npage {number + 1} of {pages} ({page.get('totalElements')} agents)"
        if not page.get("last", True):
            text += f"; next: --page {number + 1}"
    return text


def agent_text(agent: JsonObject, status: JsonObject) -> str:
    lines = [
        f"agent {agent.get('name')} ({agent.get('id')})",
        f"security profile {agent.get('securityProfile')}; boarding status {status.get('status')} "
        f"since {when(status.get('updatedAt'))}",
        f"created {when(agent.get('createdAt'))}, updated {when(agent.get('updatedAt'))}, "
        f"eTag {agent.get('eTag')}",
    ]
    if agent.get("description"):
        lines.append(f"description: {escaped(str(agent['description']))}")
    return "\n".join(lines)


def boarding_text(agent_id: str, configuration: JsonObject, as_json_command: str) -> str:
    content = configuration.get("content", {})
    profiles = ", ".join(content.get("clientCredentialProfile", [])) or "-"
    return "\n".join(
        [
            f"boarding configuration of agent {agent_id}: client id {content.get('clientId')}, "
            f"tenant {content.get('tenant')}, profile {profiles}",
            f"base URL {content.get('baseUrl')}; its initial access token expires "
            f"{when(configuration.get('expiration'))}",
            f"for the factory, IAT included: {as_json_command}",
        ]
    )


# --- releases ---------------------------------------------------------------------------------------


def trusted_keys_table(listing: JsonObject) -> str:
    rows = [
        (k.get("keyHash"), k.get("name"), k.get("algorithm"), when(k.get("addedAt")))
        for k in listing.get("content", [])
    ]
    return table(("KEY HASH", "NAME", "ALGORITHM", "ADDED"), rows) if rows else "no trusted keys"


def release_line(release: JsonObject) -> str:
    return (
        f"release {release.get('id')}: {release.get('name')} version {release.get('version')}, "
        f"security counter {release.get('securityCounter')}, {release.get('size')} bytes, "
        f"sha256 {release.get('sha256')}"
    )


def releases_table(listing: JsonObject) -> str:
    rows = [
        (
            r.get("id"),
            r.get("name"),
            r.get("version"),
            r.get("securityCounter"),
            r.get("size"),
            when(r.get("uploadedAt")),
        )
        for r in listing.get("content", [])
    ]
    headers = ("ID", "NAME", "VERSION", "SEC.COUNTER", "SIZE", "UPLOADED")
    return table(headers, rows) if rows else "no releases"


# --- installation tasks -----------------------------------------------------------------------------


def task_line(task: JsonObject) -> str:
    return (
        f"task {task.get('id')}: {task.get('softwareType')} release {task.get('softwareReleaseId')} "
        f"(version {task.get('softwareVersion')}) for device {task.get('deviceId')}, "
        f"state {task.get('state')}, progress {percent(task.get('progress'))}"
    )


def tasks_table(listing: JsonObject, names: Mapping[str, str]) -> str:
    """The tasks, each device by its name where `names` has it (its id otherwise)."""
    rows = [
        (
            t.get("id"),
            names.get(str(t.get("deviceId")), t.get("deviceId")),
            t.get("softwareVersion"),
            t.get("state"),
            percent(t.get("progress")),
            when(t.get("updatedAt")),
            t.get("message"),
        )
        for t in listing.get("content", [])
    ]
    headers = ("ID", "DEVICE", "VERSION", "STATE", "PROGRESS", "UPDATED", "MESSAGE")
    return table(headers, rows) if rows else "no installation tasks"


def task_text(task: JsonObject) -> str:
    lines = [
        task_line(task),
        f"created {when(task.get('createdAt'))}, updated {when(task.get('updatedAt'))}, "
        f"eTag {task.get('eTag')}",
    ]
    if task.get("message"):
        lines.append(f"message: {escaped(str(task['message']))}")
    for artifact in task.get("artifacts", []):
        lines.append(
            f"artifact {artifact.get('name')}: {artifact.get('size')} bytes, {artifact.get('checksum')}, "
            f"URL valid until {when(artifact.get('validUntil'))} (the signed URL: --json)"
        )
    history = task.get("history", [])
    if history:
        lines.append("history:")
        lines.extend("  " + _history_entry(entry) for entry in history)
    return "\n".join(lines)


def _history_entry(entry: JsonObject) -> str:
    """One accepted change: `{"from", "to", "progress", "message", "actor", "at"}`."""
    moved = f"{entry.get('from') or 'new'} -> {entry.get('to')}"
    parts = [when(entry.get("at")), moved, percent(entry.get("progress")), f"by {entry.get('actor')}"]
    if entry.get("message"):
        parts.append(escaped(str(entry["message"])))
    return "  ".join(parts)

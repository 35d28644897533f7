"""`mers-hub`: create a hub directory, serve it over HTTPS, and administer it through its HTTP API.

Each command parses its options, calls the library (`setup.create_hub`, `server.serve`, or an
`AdminClient`) and prints a line, a table, or with `--json` exactly the API's JSON. Every failure is
one line on stderr and one of these exit codes:

- 0: done;
- 1: the hub refused the request (its reason is the line printed), or failed;
- 2: usage: an option or argument is not acceptable (click uses 2 as well);
- 3: the hub directory, a local file, or the connection to the hub could not be used (not initialised,
  not running, TLS verification failed, unreachable).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import click

from . import cli_output as show
from .admin_client import AdminClient, HubConnection, JsonObject, Progress
from .errors import HubSetupError
from .home import HubHome, HubSettings

# `init` and `serve` import their library inside the command: the server side (FastAPI, uvicorn,
# SQLAlchemy) takes most of a second to load, which every admin command would otherwise pay.

#: the Agent Management API's client credential profiles (docs/design.md §6)
SECURITY_PROFILES = ("SHARED_SECRET", "RSA_3072")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class HttpsUrl(click.ParamType[str, Any]):
    """An `https://host[:port][/path]` URL: the hub speaks nothing else, and devices take it verbatim."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError:
            self.fail(f"{text!r} is not a URL", param, ctx)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            self.fail(f"{text!r} is not an https://HOST[:PORT][/PATH] URL", param, ctx)
        return text.rstrip("/")


class Hostname(click.ParamType[str, Any]):
    """A DNS name or an IP address for the hub's TLS certificate."""

    name = "HOST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        labels = text.removesuffix(".").split(".")
        if len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            self.fail(f"{text!r} is neither an IP address nor an ASCII DNS name", param, ctx)
        return text.removesuffix(".").lower()


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Exit codes: 0 ok, 1 refused by the hub, 2 usage, 3 hub directory, file or connection, "
    "130 interrupted.",
)
@click.version_option(package_name="mers")
def main() -> None:
    """The local reference hub: agent management, onboarding, firmware releases and installation tasks.

    \b
    Example:
      mers-hub init ./hub --hostname hub.example.com
      mers-hub serve ./hub --host 0.0.0.0 --port 8443
      mers-hub agent create GW-0001 --dir ./hub
    """


@main.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--hostname",
    "hostnames",
    type=Hostname(),
    multiple=True,
    help="A name devices reach the hub by, for its certificate (127.0.0.1, localhost always); repeatable.",
)
@click.option(
    "--database-url", default="", help="SQLAlchemy URL, e.g. postgresql+psycopg://… [default: DIR/hub.db]"
)
@click.option(
    "--tenant",
    default=HubSettings.tenant,
    show_default=True,
    help="Tenant named in tokens and configurations.",
)
@click.option("--public-url", type=HttpsUrl(), help="Base URL devices use, if not the one served on.")
def init(
    directory: Path, hostnames: tuple[str, ...], database_url: str, tenant: str, public_url: str | None
) -> None:
    """Create a hub in DIR (new or empty): keys, TLS CA and certificate, admin token, database.

    The admin token is printed once; it stays in DIR/admin-token (0600) for the local CLI. Give DIR/ca.pem
    to the factory: each device trusts the hub through it.

    Example: mers-hub init ./hub --hostname hub.example.com --public-url https://hub.example.com:8443
    """
    if not tenant.strip():
        raise click.BadParameter("the tenant may not be empty", param_hint="--tenant")
    settings = HubSettings(database_url=database_url, tenant=tenant, public_url=public_url or "")
    with show.reported_errors(), _server_side():
        from .setup import create_hub  # noqa: PLC0415  (see the imports)

    with show.reported_errors():
        created = create_hub(directory, hostnames, settings)
    home = created.home
    if created.restarted:
        click.echo(f"cleared what an interrupted init had left in {home.root} (no hub.toml: never served)")
    click.echo(f"created the hub in {home.root}")
    click.echo(f"admin token (shown once; kept in {home.admin_token}, mode 0600): {created.admin_token}")
    click.echo(f"CA certificate for devices and admin clients: {home.ca_certificate}")
    click.echo(f"start it with: mers-hub serve {home.root}")


@main.command("serve")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: all; devices are then given init's first --hostname).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8443, show_default=True, help="0 picks a free port."
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def serve_command(directory: Path, host: str, port: int, log_level: str) -> None:
    """Serve the hub in DIR over HTTPS until SIGTERM or SIGINT.

    Once it listens, DIR/url holds its URL (useful with --port 0); a clean stop removes it again.

    Example: mers-hub serve ./hub --host 0.0.0.0 --port 8443
    """
    with show.reported_errors(), _server_side():
        from .server import serve  # noqa: PLC0415  (see the imports)

    with show.reported_errors(), _stop_signals_end_cleanly():
        serve(HubHome(directory), host, port, log_level=log_level)


@contextmanager
def _server_side() -> Iterator[None]:
    """Import the server's library, or say in one line which extra brings it."""
    try:
        yield
    except ModuleNotFoundError as missing:
        if missing.name is None or missing.name.split(".")[0] not in _SERVER_LIBRARIES:
            raise
        raise HubSetupError(f"the hub's server needs {missing.name}: pip install 'mers[hub]'") from None


_SERVER_LIBRARIES = ("fastapi", "uvicorn", "starlette", "pydantic", "sqlalchemy", "psycopg")


class _Stopped(Exception):
    """SIGTERM or SIGINT asked the hub to stop."""


@contextmanager
def _stop_signals_end_cleanly() -> Iterator[None]:
    """While uvicorn serves it handles SIGTERM/SIGINT itself (a graceful shutdown that removes DIR/url),
    then re-raises the signal to the handler that was there before. Python's defaults would then kill the
    process by SIGTERM, or print a KeyboardInterrupt traceback; with this handler a stop ends the command
    with status 0, including one that arrives while the hub is still loading."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise _Stopped

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# --- administration over the HTTP API --------------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    """What an admin command works with: the client, whether to print the API's JSON, and the options
    that reached this hub as the command line gave them (`reach`), for the next command it suggests."""

    client: AdminClient
    as_json: bool
    reach: str = ""

    def command(self, *words: str) -> str:
        """`mers-hub WORDS...` with the options that reach this hub: a suggestion that works when pasted."""
        return shlex.join(["mers-hub", *words]) + self.reach

    def show(self, document: JsonObject, human: Callable[[JsonObject], str]) -> None:
        if self.as_json:
            show.echo_json(document)
        else:
            click.echo(human(document))


def _reach(directory: Path | None, url: str | None, token_file: Path | None, ca: Path | None) -> str:
    """The hub options given on the command line, as they would be typed again (an environment variable
    such as MERS_HUB_DIR still holds in the shell the suggestion is pasted into)."""
    context = click.get_current_context()
    given = [
        (f"--{name.replace('_', '-')}", value)
        for name, value in (("dir", directory), ("url", url), ("token_file", token_file), ("ca", ca))
        if value is not None
        and context.get_parameter_source("directory" if name == "dir" else name)
        is click.core.ParameterSource.COMMANDLINE
    ]
    return "".join(f" {option} {shlex.quote(str(value))}" for option, value in given)


def admin_command(function: Callable[..., None]) -> Callable[..., None]:
    """The options that say which hub to talk to (and `--json`); the command gets an `Admin` first."""

    @functools.wraps(function)
    def command(
        directory: Path | None,
        url: str | None,
        token_file: Path | None,
        ca: Path | None,
        as_json: bool,
        **arguments: Any,
    ) -> None:
        if directory is None and (url is None or token_file is None or ca is None):
            raise click.UsageError("say which hub: --dir DIR, or all of --url, --token-file and --ca")
        with show.reported_errors():
            connection = HubConnection.resolve(directory, url, token_file, ca)
            with AdminClient(connection) as client:
                function(Admin(client, as_json, _reach(directory, url, token_file, ca)), **arguments)

    file_type = click.Path(dir_okay=False, path_type=Path)
    options = [
        click.option(
            "--dir",
            "directory",
            type=click.Path(file_okay=False, path_type=Path),
            envvar="MERS_HUB_DIR",
            help="The hub directory: its url, admin-token and ca.pem [env MERS_HUB_DIR].",
        ),
        click.option("--url", type=HttpsUrl(), help="The hub's URL (instead of DIR/url)."),
        click.option(
            "--token-file", type=file_type, help="File holding the admin token (instead of DIR/admin-token)."
        ),
        click.option("--ca", type=file_type, help="The hub's CA certificate (instead of DIR/ca.pem)."),
        click.option("--json", "as_json", is_flag=True, help="Print exactly the API's JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group()
def agent() -> None:
    """Agents (gateways): create them, hand out their boarding configuration, offboard, delete.

    An agent may be named by its id or, when no other agent has it as id, by its name.

    Example: mers-hub agent create GW-0001 --profile RSA_3072 --dir ./hub
    """


@agent.command("create")
@click.argument("name")
@click.option(
    "--profile",
    type=click.Choice(SECURITY_PROFILES, case_sensitive=False),
    default=SECURITY_PROFILES[0],
    show_default=True,
    help="How the agent authenticates once onboarded.",
)
@click.option("--description", help="Free text.")
@admin_command
def agent_create(admin: Admin, name: str, profile: str, description: str | None) -> None:
    """Create the agent NAME; its boarding configuration is then ready (`agent config`).

    Example: mers-hub agent create GW-0001 --profile RSA_3072 --description "line 3" --dir ./hub
    """
    created = admin.client.create_agent(name, profile, description)
    admin.show(
        created,
        lambda a: (
            f"created agent {a.get('name')} ({a.get('id')}), profile {a.get('securityProfile')}; "
            f"boarding configuration: {admin.command('agent', 'config', str(a.get('id')), '--json')}"
        ),
    )


@agent.command("list")
@click.option("--page", type=click.IntRange(0), default=0, show_default=True, help="Page number, from 0.")
@click.option("--size", type=click.IntRange(1), default=100, show_default=True, help="Agents per page.")
@admin_command
def agent_list(admin: Admin, page: int, size: int) -> None:
    """List the agents, one page at a time.

    Example: mers-hub agent list --dir ./hub --json
    """
    admin.show(admin.client.list_agents(page=page, size=size), show.agents_table)


@agent.command("show")
@click.argument("agent_ref", metavar="AGENT")
@admin_command
def agent_show(admin: Admin, agent_ref: str) -> None:
    """Show AGENT (an id or name) and its boarding status; --json: the agent as the API has it.

    Example: mers-hub agent show GW-0001 --dir ./hub
    """
    agent_id = admin.client.resolve_agent(agent_ref)
    found = admin.client.agent(agent_id)
    if admin.as_json:
        show.echo_json(found)
    else:
        click.echo(show.agent_text(found, admin.client.boarding_status(agent_id)))


@agent.command("config")
@click.argument("agent_ref", metavar="AGENT")
@admin_command
def agent_config(admin: Admin, agent_ref: str) -> None:
    """The boarding configuration of AGENT; with --json exactly the document the factory writes to the
    device (it holds the single-use initial access token).

    Example: mers-hub agent config GW-0001 --json --dir ./hub > GW-0001.boarding.json
    """
    agent_id = admin.client.resolve_agent(agent_ref)
    again = admin.command("agent", "config", agent_id, "--json")
    configuration = admin.client.boarding_configuration(agent_id)
    admin.show(configuration, lambda c: show.boarding_text(agent_id, c, again))


@agent.command("offboard")
@click.argument("agent_ref", metavar="AGENT")
@admin_command
def agent_offboard(admin: Admin, agent_ref: str) -> None:
    """Revoke AGENT's credentials; it must onboard again, with a new boarding configuration.

    Example: mers-hub agent offboard GW-0001 --dir ./hub
    """
    agent_id = admin.client.resolve_agent(agent_ref)
    admin.show(
        admin.client.offboard(agent_id),
        lambda s: (
            f"offboarded agent {agent_id}: {s.get('status')}; "
            f"its new boarding configuration: {admin.command('agent', 'config', agent_id, '--json')}"
        ),
    )


@agent.command("delete")
@click.argument("agent_ref", metavar="AGENT")
@admin_command
def agent_delete(admin: Admin, agent_ref: str) -> None:
    """Delete AGENT, its credentials and its installation tasks (--json prints nothing: the API answers
    204 without a body).

    Example: mers-hub agent delete GW-0001 --dir ./hub
    """
    deleted = admin.client.delete_agent(admin.client.resolve_agent(agent_ref))
    if not admin.as_json:
        click.echo(f"deleted agent {deleted.get('name')} ({deleted.get('id')})")


@main.group()
def release() -> None:
    """Firmware releases and the keys they must be signed with.

    \b
    Example:
      mers-hub release trust add release.pub.pem --name release-2026 --dir ./hub
      mers-hub release upload rootfs.signed --dir ./hub
    """


@release.group("trust")
def trust() -> None:
    """The public keys the hub verifies uploaded releases against.

    Example: mers-hub release trust add release.pub.pem --name release-2026 --dir ./hub
    """


@trust.command("add")
@click.argument("public_key", metavar="PUB.pem", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name for the key [default: the file name without .pub.pem].")
@admin_command
def trust_add(admin: Admin, public_key: Path, name: str | None) -> None:
    """Trust the public key in PUB.pem (as `mers-sign keygen` writes it) for release uploads.

    Example: mers-hub release trust add release.pub.pem --name release-2026 --dir ./hub
    """
    added = admin.client.add_trusted_key(
        public_key, name or public_key.name.removesuffix(".pem").removesuffix(".pub")
    )
    admin.show(
        added,
        lambda k: f"trusted key {k.get('name')}: {k.get('algorithm')}, key hash {k.get('keyHash')}",
    )


@trust.command("list")
@admin_command
def trust_list(admin: Admin) -> None:
    """List the trusted release keys.

    Example: mers-hub release trust list --dir ./hub
    """
    admin.show(admin.client.trusted_keys(), show.trusted_keys_table)


@release.command("upload")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name for the release [default: the file name].")
@admin_command
def release_upload(admin: Admin, image: Path, name: str | None) -> None:
    """Upload the signed IMAGE; the hub refuses it unless a trusted key's signature verifies.

    The file is streamed, with a progress bar on a terminal.

    Example: mers-hub release upload rootfs-1.2.0.signed --name rootfs --dir ./hub
    """
    with _upload_progress(image.stat().st_size) as progress:
        upload = admin.client.upload_release(image, name or image.name, progress)
    verb = "uploaded" if upload.created else "already uploaded (the same bytes):"
    admin.show(upload.release, lambda r: f"{verb} {show.release_line(r)}")


@contextmanager
def _upload_progress(size: int) -> Iterator[Progress | None]:
    if not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=size, label="uploading", file=sys.stderr) as bar:
        yield bar.update


@release.command("list")
@admin_command
def release_list(admin: Admin) -> None:
    """List the releases.

    Example: mers-hub release list --dir ./hub
    """
    admin.show(admin.client.releases(), show.releases_table)


@main.group()
def task() -> None:
    """Installation tasks: which release a device installs, and how far it got.

    Example: mers-hub task create --device GW-0001 --release 1.2.0+7 --dir ./hub
    """


@task.command("create")
@click.option("--device", "device_ref", required=True, help="The agent (id or name) to install on.")
@click.option(
    "--release", "release_ref", required=True, help="The release: its id or its version (see `release list`)."
)
@admin_command
def task_create(admin: Admin, device_ref: str, release_ref: str) -> None:
    """Ask a device to install a release; it picks the task up when it next polls. A device has one open
    task at a time: `task cancel` the open one first to install another release.

    Example: mers-hub task create --device GW-0001 --release 1.2.0+7 --dir ./hub
    """
    device_id = admin.client.resolve_agent(device_ref)
    release_id = admin.client.resolve_release(release_ref)
    admin.show(admin.client.create_task(device_id, release_id), lambda t: "created " + show.task_line(t))


@task.command("list")
@click.option("--device", "device_ref", help="Only this agent's tasks (id or name).")
@click.option(
    "--status",
    metavar="open|closed|STATE",
    help="Only open tasks, closed ones, or those in one state (e.g. DOWNLOADING); the hub checks it.",
)
@admin_command
def task_list(admin: Admin, device_ref: str | None, status: str | None) -> None:
    """List installation tasks.

    Example: mers-hub task list --device GW-0001 --status open --dir ./hub
    """
    device_id = admin.client.resolve_agent(device_ref) if device_ref else None
    listing = admin.client.tasks(device_id=device_id, status=status)
    names = admin.client.agent_names(
        {task["deviceId"] for task in listing.get("content", [])} if not admin.as_json else set()
    )
    admin.show(listing, lambda found: show.tasks_table(found, names))


@task.command("show")
@click.argument("task_id", metavar="TASK")
@admin_command
def task_show(admin: Admin, task_id: str) -> None:
    """Show TASK with its artifacts and history (--json also shows the artifacts' signed URLs).

    Example: mers-hub task show 8c1d… --dir ./hub
    """
    admin.show(admin.client.task(task_id), show.task_text)


@task.command("cancel")
@click.argument("task_id", metavar="TASK")
@admin_command
def task_cancel(admin: Admin, task_id: str) -> None:
    """Cancel TASK (refused once it is closed: activated, failed or canceled).

    Example: mers-hub task cancel 8c1d… --dir ./hub
    """
    admin.show(admin.client.cancel_task(task_id), lambda t: "canceled " + show.task_line(t))


EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended


def script() -> None:
    """The `mers-hub` console script: `main`, with Ctrl-C ending it in exit 130 (`main` itself is left
    without a signal handler for tests and library users who call it in-process)."""
    signal.signal(signal.SIGINT, _interrupted)
    main()


def _interrupted(signum: int, frame: object) -> NoReturn:
    """Ctrl-C: unwind as KeyboardInterrupt would (context managers close, files stay whole), but end in
    the shell's code for it, 130, rather than click's "Aborted!" and 1, which means something else here.
    A SIGTERM is not caught: it ends the command as the signal does (143 in a shell)."""
    click.echo("mers-hub: interrupted", err=True)
    raise SystemExit(EXIT_INTERRUPTED)

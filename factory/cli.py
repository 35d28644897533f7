"""`mers-factory`: provision boards over their serial console, export boarding batches, read the records.

A thin click layer over `station`, `boarding_source` and `records`. Every failure is one line on stderr,
``mers-factory: error: ...``, and one of the exit codes of `factory.errors.ExitCode`:

- 0 done; 1 several boards failed in different ways, or the station was stopped (Ctrl-C, SIGTERM); 2 usage
  or bad input (options, key file, batch file, network file, CA bundle); 3 refused (IAT expiring or
  claimed for another serial, a duplicate serial number, board locked over other data, read-back mismatch,
  a write refused by the board); 4 serial port (busy, gone, no answer); 5 hub (unreachable, TLS, refused);
  6 records (database, or a broken chain or anchor for ``records verify``).

``--records`` names a SQLite file (``factory-records.db`` in the working directory by default) or a
PostgreSQL URL. A SQLite file that does not exist is refused (exit 6): ``records`` commands would report a
missing record set as an intact empty one, and ``provision`` would check serial numbers and IATs against
nothing. ``provision --new-records`` starts a new record set there instead, and says so on stderr.

The admin token is read from a file and never printed; records and output keep the IAT's ``jti``, never
the token.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, NoReturn

import click

from signing import PublicKey, SigningError, load_public_key

from .boarding_source import (
    PROFILES,
    BatchSource,
    BoardingSource,
    HubSource,
    canonical_json,
    check_serial_number,
    export_batch,
)
from .errors import ExitCode, FactoryError, InputError, KeyFileError, RecordsNotFoundError

try:
    from .records import ChainReport, Outcome, Records, sqlite_file
    from .station import DEFAULT_IAT_MARGIN_S, Event, Result, Station, StationConfig
except ModuleNotFoundError as missing:  # the records' database layer comes with the `factory` extra
    if missing.name != "sqlalchemy":
        raise
    print("mers-factory: error: the records need SQLAlchemy: pip install 'mers[factory]'", file=sys.stderr)
    sys.exit(int(ExitCode.USAGE))

DEFAULT_RECORDS: Final = "factory-records.db"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
EPILOG: Final = (
    "Exit codes: 0 ok, 1 boards failed differently or stopped, 2 usage or bad input, 3 refused, "
    "4 serial port, 5 hub, 6 records, 130 interrupted (Ctrl-C outside provision)."
)


def parse_duration(text: str) -> float:
    """Seconds in ``N[.N]{s,m,h,d}`` (``24h``, ``90m``, ``2d``); anything else is a `ValueError`."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 24h, 90m or 2d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Duration(click.ParamType[float, Any]):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


def fail(error: FactoryError) -> NoReturn:
    click.echo(f"mers-factory: error: {_line(error)}", err=True)
    sys.exit(int(error.exit_code))


def _line(error: FactoryError) -> str:
    text = " ".join(str(error).split())  # one line, whatever the message held
    return f"[{error.field}] {text}" if error.field else text


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors as one line on stderr and the exit code each kind of failure has."""
    try:
        yield
    except FactoryError as error:
        fail(error)


# --- inputs --------------------------------------------------------------------------------------------


def load_keys(paths: Sequence[Path]) -> tuple[PublicKey, ...]:
    keys = []
    for path in paths:
        try:
            keys.append(load_public_key(path))
        except SigningError as error:
            raise KeyFileError(str(error)) from None
    return tuple(keys)


def read_ca(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}", field=option) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InputError(f"{path} holds no PEM certificate", field=option)
    return data


def read_network(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        document = json.loads(path.read_bytes())
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}", field="network") from None
    except ValueError:
        raise InputError(f"{path} is not JSON", field="network") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} is not a JSON object", field="network")
    return canonical_json(document)


def read_serials(arguments: Sequence[str], serials_file: IO[bytes] | None) -> list[str]:
    """The serial numbers given as arguments and in `serials_file` (one a line, blank lines and the
    blanks around a number ignored), each checked as the board's protocol bounds it: refused as bad input
    naming its place, before any hub request, rather than as an agent made for a serial no board carries."""
    found = [
        (f"serial number argument {index}", "serials", serial) for index, serial in enumerate(arguments, 1)
    ]
    if serials_file is not None:
        for index, raw in enumerate(serials_file, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(
                    f"{serials_file.name} line {index} is not UTF-8", field="serials-file"
                ) from None
            if line:
                found.append((f"{serials_file.name} line {index}", "serials-file", line))
    for where, option, serial in found:
        try:
            check_serial_number(serial)
        except ValueError as error:
            raise InputError(f"{where}: {error}", field=option) from None
    return [serial for _, _, serial in found]


def hub_source(url: str | None, token_file: Path | None, ca: Path | None, profile: str) -> HubSource:
    if url is None or token_file is None or ca is None:
        raise InputError("the hub needs all of --hub, --hub-token-file and --hub-ca", field="hub")
    return HubSource.from_files(url, token_file, ca, profile)


# --- output --------------------------------------------------------------------------------------------


class Printer:
    """Progress for people (a line per step, prefixed by the port) or one JSON event per step."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._lock = threading.Lock()

    def event(self, event: Event) -> None:
        if self.as_json:
            text = json.dumps(
                {"port": event.port, "serial": event.serial, "step": event.step, "status": event.status}
                | ({"detail": event.detail} if event.detail else {})
            )
        elif event.step == "done":
            return  # the summary says it
        else:
            text = f"{event.port} {event.serial or '-'}: {event.step} {event.status}"
        with self._lock:
            click.echo(text)

    def summary(self, result: Result) -> None:
        if self.as_json:
            return
        what = result.outcome.value.replace("_", " ")
        click.echo(f"{result.port} {result.serial or '-'}: {what} ({result.seconds:.1f} s)")


def exit_code_of(results: Sequence[Result]) -> ExitCode:
    codes = {result.error.exit_code for result in results if result.error is not None}
    if not codes:
        return ExitCode.OK
    return codes.pop() if len(codes) == 1 else ExitCode.FAILED


# --- commands ------------------------------------------------------------------------------------------


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EPILOG
)
@click.version_option(package_name="mers")
def cli() -> None:
    """The factory provisioning station: trust keys and boarding configurations into new boards.

    \b
    Example:
      mers-factory provision --port /dev/ttyUSB0 --key release.pub.pem \\
          --hub https://hub.example:8443 --hub-token-file admin-token --hub-ca hub-ca.pem
      mers-factory records verify --records factory-records.db
    """


_records_option = click.option(
    "--records",
    "records_url",
    default=DEFAULT_RECORDS,
    show_default=True,
    envvar="MERS_FACTORY_RECORDS",
    help="Records database: a SQLite file path or URL, or postgresql+psycopg://... for a shared line. "
    "A SQLite file must exist (provision: unless --new-records).",
)


@cli.command(epilog=EPILOG)
@click.option("--port", "ports", multiple=True, required=True, help="Serial device of a board; repeatable.")
@click.option(
    "--key", "key_paths", multiple=True, required=True, type=click.Path(path_type=Path), help="Trust key PEM."
)
@click.option("--hub", "hub_url", help="The hub's URL (https://HOST:PORT).")
@click.option("--hub-token-file", type=click.Path(path_type=Path), help="File holding the hub's admin token.")
@click.option("--hub-ca", type=click.Path(path_type=Path), help="The hub's CA certificate (PEM).")
@click.option("--boarding-batch", type=click.Path(path_type=Path), help="Batch file from `batch export`.")
@click.option("--profile", type=click.Choice(PROFILES), default=PROFILES[0], show_default=True)
@click.option("--device-ca", type=click.Path(path_type=Path), help="CA bundle the device trusts [--hub-ca].")
@click.option("--network", type=click.Path(path_type=Path), help="Network configuration JSON (HTTPS proxy).")
@click.option("--baud", type=click.IntRange(min=1), default=115200, show_default=True)
@click.option(
    "--iat-margin", type=Duration(), default="24h", show_default=True, help="Refuse IATs expiring sooner."
)
@click.option(
    "--station", default=socket.gethostname(), show_default=True, help="Station name for the records."
)
@_records_option
@click.option(
    "--new-records",
    is_flag=True,
    help="Start a new record set if the --records SQLite file does not exist (without it, a missing file is "
    "refused: a station run from another directory would check serial numbers and IATs against nothing).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON event per step per board on stdout.")
def provision(
    ports: tuple[str, ...],
    key_paths: tuple[Path, ...],
    hub_url: str | None,
    hub_token_file: Path | None,
    hub_ca: Path | None,
    boarding_batch: Path | None,
    profile: str,
    device_ca: Path | None,
    network: Path | None,
    baud: int,
    iat_margin: float,
    station: str,
    records_url: str,
    new_records: bool,
    as_json: bool,
) -> None:
    """Provision the board on each --port (concurrently): write the keys and the boarding configuration,
    read them back, lock, record.

    \b
    Example:
      mers-factory provision --port /dev/ttyUSB0 --port /dev/ttyUSB1 --key release.pub.pem \\
          --hub https://hub.example:8443 --hub-token-file admin-token --hub-ca hub-ca.pem \\
          --records /var/lib/mers/factory-records.db --new-records  # the first run of a new line
      mers-factory provision --port /dev/ttyUSB0 --key release.pub.pem \\
          --boarding-batch batch.jsonl --device-ca hub-ca.pem --records postgresql+psycopg://line/records
    """
    with reported_errors():
        source: BoardingSource
        if boarding_batch is not None:
            if hub_url or hub_token_file:
                raise InputError("give either --boarding-batch or the --hub options, not both", field="hub")
            source = BatchSource.load(boarding_batch)
        else:
            source = hub_source(hub_url, hub_token_file, hub_ca, profile)
        ca_path = device_ca or hub_ca
        if ca_path is None:
            raise InputError("--device-ca is needed with --boarding-batch", field="device-ca")
        config = StationConfig(
            keys=load_keys(key_paths),
            device_ca=read_ca(ca_path, "device-ca"),
            network=read_network(network),
            iat_margin=iat_margin,
            baud=baud,
            station=station,
        )
        printer = Printer(as_json)
        records = _station_records(records_url, new_records)
        station_run = Station(config, source, records, printer.event)
        try:
            with _stop_between_steps(station_run, len(ports)):
                results = station_run.provision_all(list(ports))
        finally:
            records.close()
    for result in results:
        printer.summary(result)
        if result.error is not None:
            click.echo(f"mers-factory: error: {result.port}: {_line(result.error)}", err=True)
    sys.exit(int(exit_code_of(results)))


def _station_records(url: str, new: bool) -> Records:
    """The records `provision` appends to; a new SQLite record set only when asked for (`new`), and then
    said on stderr with its absolute path, so a station started in the wrong directory is noticed."""
    try:
        store = Records.open(url, create=new)
    except RecordsNotFoundError as error:
        raise RecordsNotFoundError(error.path, "--new-records starts a new record set there") from None
    path = sqlite_file(url)
    if store.created and path is not None:
        click.echo(f"mers-factory: started a new record set at {path}", err=True)
    return store


@contextmanager
def _stop_between_steps(station: Station, ports: int) -> Iterator[None]:
    """Ctrl-C or SIGTERM (a supervisor stopping the station) sets `station.stop`: each board finishes the
    step in hand, is recorded as stopped and lets its serial number go, and the results print as usual.

    With one port, a second Ctrl-C interrupts at once (still recorded, see `Station.provision`), except
    while the board is being locked: that ends first, so a locked board is always recorded. With several
    ports the boards run in worker threads that an interruption of the main thread would not reach (it
    would only lose the results), so there a second Ctrl-C changes nothing."""
    at_once = ports == 1

    def request_stop(number: int, frame: object) -> None:
        # os.write: the main thread may be inside a buffered write to stderr when the signal arrives
        if station.stop.is_set() and number == signal.SIGINT and at_once:
            if station.sealing:
                os.write(2, b"mers-factory: the board is being locked: it is confirmed and recorded first\n")
                return
            raise KeyboardInterrupt
        station.stop.set()
        again = b" (Ctrl-C again: at once)" if at_once else b""
        os.write(2, b"mers-factory: stopping: each board stops before its next step" + again + b"\n")

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@cli.group()
def batch() -> None:
    """Boarding batch files (JSON lines {serial, agentId, boarding}) for lines without the hub."""


@batch.command("export", epilog=EPILOG)
@click.argument("serials", nargs=-1)
@click.option("--serials-file", type=click.File("rb"), help="Serial numbers, one a line (UTF-8).")
@click.option("--hub", "hub_url", required=True)
@click.option("--hub-token-file", required=True, type=click.Path(path_type=Path))
@click.option("--hub-ca", required=True, type=click.Path(path_type=Path))
@click.option("--profile", type=click.Choice(PROFILES), default=PROFILES[0], show_default=True)
@click.option("--iat-margin", type=Duration(), default="24h", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
def batch_export(
    serials: tuple[str, ...],
    serials_file: IO[bytes] | None,
    hub_url: str,
    hub_token_file: Path,
    hub_ca: Path,
    profile: str,
    iat_margin: float,
    output: Path,
) -> None:
    """Write OUTPUT (mode 0600: it holds IATs) with one boarding configuration per serial number, creating
    agents on the hub as needed.

    Example: mers-factory batch export GW-0001 GW-0002 --hub https://hub:8443 --hub-token-file t
    --hub-ca ca.pem -o batch.jsonl
    """
    with reported_errors():
        names = read_serials(serials, serials_file)
        if not names:
            raise InputError("give at least one serial number", field="serials")
        source = hub_source(hub_url, hub_token_file, hub_ca, profile)
        count = export_batch(source, names, output, time.time() + iat_margin)
    click.echo(f"{count} boarding configurations written to {output}")


@cli.group()
def records() -> None:
    """The provisioning records: verify the hash chain, export, show a board's attempts."""


def _with_records(action: Callable[[Records], None], url: str) -> None:
    with reported_errors():
        store = Records.open(url)
        try:
            action(store)
        finally:
            store.close()


@records.command("verify", epilog=EPILOG)
@_records_option
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="ROWS:HEAD",
    help="An anchor printed by an earlier verify and kept outside the database (a shift report, a "
    "ticket): the chain must still hold that row with that hash, so rows removed from its end are caught. "
    "Repeatable.",
)
def records_verify(records_url: str, anchors: tuple[str, ...]) -> None:
    """Check the hash chain from the first row; report the first broken row (exit 6).

    The chain shows any row altered or removed before its last one; only an anchor kept elsewhere shows
    the newest rows removed. Each run prints the anchor of the chain as it is now (an empty chain has
    none: there is no row yet whose removal an anchor could catch).

    Example: mers-factory records verify --records factory-records.db --anchor 120:3f9c…
    """
    try:
        parsed = [ChainReport.parse(anchor) for anchor in anchors]
    except ValueError as error:
        fail(InputError(str(error), field="anchor"))

    def verify(store: Records) -> None:
        report = store.verify(parsed)
        if report.anchor is None:  # any anchor given names a row, so an empty chain already failed it
            click.echo("chain intact: 0 rows; no anchor: the chain has no row to anchor yet")
            return
        checked = f"; {len(parsed)} anchor(s) hold" if parsed else ""
        click.echo(f"chain intact: {report.rows} rows, head {report.head}{checked}; anchor {report.anchor}")

    _with_records(verify, records_url)


@records.command("export", epilog=EPILOG)
@_records_option
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one row each.")
def records_export(records_url: str, as_csv: bool, as_json: bool) -> None:
    """Every row, in chain order, on stdout.

    Example: mers-factory records export --csv > records.csv
    """
    if as_csv == as_json:
        fail(InputError("give exactly one of --csv and --json", field="format"))

    def export(store: Records) -> None:
        writer: Any = None
        for row in store.rows():
            if as_json:
                click.echo(json.dumps(row))
                continue
            if writer is None:
                writer = csv.DictWriter(sys.stdout, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow(row)

    _with_records(export, records_url)


@records.command("show", epilog=EPILOG)
@click.argument("serial")
@_records_option
@click.option("--json", "as_json", is_flag=True)
def records_show(serial: str, records_url: str, as_json: bool) -> None:
    """The attempts for board SERIAL, oldest first.

    Example: mers-factory records show GW-0001
    """

    def show(store: Records) -> None:
        found = False
        for row in store.rows(serial):
            found = True
            if as_json:
                click.echo(json.dumps(row))
            else:
                error = f" {row['error']}" if row["error"] else ""
                click.echo(
                    f"{row['seq']} {row['ended_at']} {row['station']} {row['port']} {row['outcome']}{error}"
                )
        if not found:
            raise InputError(f"no records for {serial}", field="serial")

    _with_records(show, records_url)


def main() -> None:
    """Run the CLI with click's own error output reduced to our one line, and Ctrl-C outside `provision`
    (which stops its boards first, see `_stop_between_steps`) ending it in exit 130."""
    signal.signal(signal.SIGINT, _interrupted)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("mers-factory: error: aborted", err=True)
        sys.exit(int(ExitCode.FAILED))
    except click.ClickException as error:
        click.echo(f"mers-factory: error: {' '.join(error.format_message().split())}", err=True)
        sys.exit(int(ExitCode.USAGE))


def _interrupted(signum: int, frame: object) -> NoReturn:
    """Ctrl-C: unwind as KeyboardInterrupt would, but end in the shell's code for it, 130, rather than
    click's "Aborted!" and 1, which means "boards failed" here. A SIGTERM is not caught outside
    `provision`: it ends the command as the signal does (143 in a shell)."""
    click.echo("mers-factory: interrupted", err=True)
    raise SystemExit(int(ExitCode.INTERRUPTED))


__all__ = ["DEFAULT_IAT_MARGIN_S", "Outcome", "cli", "main"]

"""The factory's one exception family, and the exit code of each kind of failure.

Every failure of the station is a `FactoryError` naming the step or field that failed, so a caller catches
one base and the CLI prints one line and exits with the code of the family (`ExitCode`). No message ever
holds the hub's admin token or an IAT: they are credentials, and error lines end up in shift logs.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import ClassVar

from board import protocol as wire


class ExitCode(enum.IntEnum):
    """`mers-factory`'s documented exit codes."""

    OK = 0
    FAILED = 1
    """Boards failed in different ways (each board's line says why), or the station was stopped."""
    USAGE = 2
    """Bad input on the command line: options, key file, batch file, network file, CA bundle."""
    REFUSED = 3
    """A check refused the board or its data: IAT expiring or claimed, board locked over other data,
    read-back mismatch, the board refused a write."""
    PORT = 4
    """The serial port: busy, gone, or the board stopped answering (line failure)."""
    HUB = 5
    """The hub: unreachable, TLS failure, or it refused a request."""
    RECORDS = 6
    """The records database: unreachable, or `records verify` found a broken chain."""
    INTERRUPTED = 130
    """Ctrl-C outside `provision` (which stops its boards first and exits 1)."""


class FactoryError(Exception):
    """Base of every factory failure; `field` names the step, option or column that failed."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED
    field: str = ""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        if field:
            self.field = field


class StoppedError(FactoryError):
    """The station was asked to stop (Ctrl-C or SIGTERM) before this board's next step. The board is left
    unlocked, as an interrupted cable would leave it, and a re-run continues where it stands."""

    field = "stopped"


class UnexpectedError(FactoryError):
    """What no check foresaw (a defect): recorded as the attempt's failure, then raised as it came."""


# --- bad input -----------------------------------------------------------------------------------------


class InputError(FactoryError):
    """A file or option given to the station is unusable; nothing was touched."""

    exit_code = ExitCode.USAGE


class KeyFileError(InputError):
    field = "key"


class BatchFileError(InputError):
    field = "boarding-batch"


class BoardingTooLargeError(InputError):
    """Boarding data larger than a board accepts (`board.protocol`'s limits). A board measures it only at
    write_boarding, after write_key has burned its write-once key slots, so the station checks first:
    the CA bundle and network configuration when its configuration is built, each board's boarding
    configuration before that board's IAT is claimed. `size` and `limit` are in bytes."""

    def __init__(self, message: str, size: int, limit: int, *, field: str) -> None:
        super().__init__(message, field=field)
        self.size = size
        self.limit = limit


# --- the serial line -----------------------------------------------------------------------------------


class PortError(FactoryError):
    """The serial port could not be opened, or failed, or the board stopped answering."""

    exit_code = ExitCode.PORT
    field = "port"


class PortBusyError(PortError):
    """Another program (another station) holds the port exclusively."""


class PortGoneError(PortError):
    """The port does not exist or vanished (unplugged USB adapter)."""


class LineError(PortError):
    """No valid answer within the bounded retries: a dead, cut or hopelessly noisy line."""


# --- refusals ------------------------------------------------------------------------------------------


class RefusedError(FactoryError):
    """A check refused to go on with this board; the board was not locked by this attempt."""

    exit_code = ExitCode.REFUSED


class BoardRefusedError(RefusedError):
    """The board answered a request with an SMP error (`reply` names it)."""

    def __init__(self, step: str, reply: wire.ErrorReply) -> None:
        super().__init__(f"the board refused {step}: {reply.describe()}", field=step)
        self.reply = reply


class IatError(RefusedError):
    """The IAT cannot be burned: expired, expiring within the margin, used, or claimed for another board.
    `facts` is the refused configuration (a `Boarding`), when known, so the record names its ``jti``."""

    field = "iat"

    def __init__(self, message: str, facts: object = None) -> None:
        super().__init__(message)
        self.facts = facts


class AgentOnboardedError(IatError):
    """The hub's agent for this serial number has onboarded: its IAT is used, so a board given it could
    never onboard. The station does not offboard it for a new IAT, which would cut off the device holding
    its credentials: an operator offboards it on the hub (`mers-hub agent offboard`) if that device is gone
    or the serial number is a duplicate."""

    def __init__(self, serial_number: str, agent_id: str, status: str, facts: object = None) -> None:
        super().__init__(
            f"{serial_number}: the hub's agent {agent_id} is {status}, its IAT used: a board given it could "
            "never onboard (offboard the agent on the hub if its device is gone)",
            facts,
        )
        self.serial_number = serial_number
        self.agent_id = agent_id
        self.status = status


class LockedOverOtherDataError(RefusedError):
    """The board is already locked, and not over the data this station would write."""

    field = "lock"


class SerialAlreadyProvisionedError(RefusedError):
    """The records say another board with this serial number was provisioned: a duplicate serial."""

    field = "serial"


class SerialInProgressError(RefusedError):
    """Another attempt is writing a board with this serial number right now (or took this attempt's
    claim over while it stalled): a duplicate serial, refused before anything is written."""

    field = "serial"


class VerificationError(RefusedError):
    """The read-back does not match what the station wrote; the board was not locked."""

    field = "verify"


class BoardProtocolError(RefusedError):
    """The board answered something this station does not understand."""

    field = "protocol"


# --- the hub and the records ---------------------------------------------------------------------------


class HubError(FactoryError):
    exit_code = ExitCode.HUB
    field = "hub"


class HubUnreachableError(HubError):
    """No answer: connection refused, TLS verification failed, timeout."""


class HubRefusedError(HubError):
    """The hub answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DuplicateAgentsError(HubError):
    """Several of the hub's agents are named after one serial number: which one this board is cannot be
    told, so none is used (an operator deletes the others on the hub)."""

    def __init__(self, serial_number: str, agent_ids: list[str]) -> None:
        shown = ", ".join(agent_ids[:5]) + (", ..." if len(agent_ids) > 5 else "")
        super().__init__(
            f"the hub has {len(agent_ids)} agents named {serial_number} ({shown}): "
            "which one is this board's is unknown; delete the others on the hub"
        )
        self.serial_number = serial_number
        self.agent_ids = agent_ids


class RecordsError(FactoryError):
    exit_code = ExitCode.RECORDS
    field = "records"


class RecordsNotFoundError(RecordsError):
    """The SQLite file named for the records does not exist. Opening it would make a new, empty one: a
    verify would call a missing record set intact, and a station run from another directory (or given a
    mistyped path) would check serial numbers and IATs against nothing. `path` is absolute."""

    def __init__(self, path: Path, advice: str = "") -> None:
        super().__init__(f"the records database {path} does not exist" + (f"; {advice}" if advice else ""))
        self.path = path


class ChainBrokenError(RecordsError):
    """A row's hash or its link to the previous row does not verify: the records were altered."""

    def __init__(self, message: str, row_id: int) -> None:
        super().__init__(message)
        self.row_id = row_id

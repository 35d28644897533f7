"""The one exception family of the device client.

Every failure a caller must react to is a `MersError` subclass with an exit code, so the CLI prints one
line and exits with a code that says what to do next (fix the input, onboard, retry later, call the
operator), and the installer daemon can catch one base. A refused operation has changed no stored file.
"""

from __future__ import annotations

#: exit codes of the `mers` CLI (documented in `mers --help` and docs/design.md §6)
EXIT_USAGE = 2  # bad input: an option, an import file, boarding data that does not validate
EXIT_NOT_ONBOARDED = 3  # nothing to work with yet: no boarding data, or no credentials
EXIT_STORAGE = 4  # the board or its state files cannot be used
EXIT_UNREACHABLE = 5  # the hub could not be reached or kept failing (5xx, timeouts): retry later
EXIT_REFUSED = 6  # the hub refused (4xx), or the install's state forbids the command: the operator must act


class MersError(Exception):
    """Base of every error the device client raises on purpose."""

    exit_code: int = EXIT_REFUSED


# --- input and local state ---------------------------------------------------------------------------


class InputError(MersError):
    """A file or value given by the operator is not acceptable; nothing was stored."""

    exit_code = EXIT_USAGE


class BoardingDataError(InputError):
    """Boarding data (from the board or an import file) does not validate."""


class NoBoardingDataError(MersError):
    """The board holds no boarding data and none was imported."""

    exit_code = EXIT_NOT_ONBOARDED


class NotOnboardedError(MersError):
    """The device holds no credentials yet: `mers onboard` first."""

    exit_code = EXIT_NOT_ONBOARDED


class StorageError(MersError):
    """The board or a state file could not be opened, read or written."""

    exit_code = EXIT_STORAGE


class SlotStorageError(StorageError):
    """A slot failed to read, write or sync (worn flash: EIO; a file-size limit: EFBIG), or a file-backed
    slot's filesystem lacks room for the image (space may be freed). A one-shot command exits 4 as for any
    storage error; the daemon retries it with its backoff instead, since exiting only had systemd start it
    again every 30 s, re-reading the slot each time. The journal still names a durable offset, so a
    retry, or the next run, resumes from there."""


class CorruptStateError(StorageError):
    """A state file exists but is not what we write; reported, never silently reset (it may hold the only
    copy of a RAT)."""


# --- the hub -------------------------------------------------------------------------------------------


class HubUnreachableError(MersError):
    """Network errors, timeouts or 5xx answers outlasted the bounded retries: try again later.
    `reached_the_hub` is False only when no try can have reached the hub (none could connect)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, *, reached_the_hub: bool = True) -> None:
        super().__init__(message)
        self.reached_the_hub = reached_the_hub


class HubProtocolError(HubUnreachableError):
    """The hub answered something that is not the protocol of docs/design.md §6 (wrong status, bad JSON)."""


class HubRefusedError(MersError):
    """The hub refused a request (4xx); `status` and `code` are the hub's."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class IatExpiredError(HubRefusedError):
    """The boarding configuration's IAT expired (7 days): the operator must issue a new one."""


class IatUsedError(HubRefusedError):
    """The IAT was already used (or superseded by offboarding): it works once. `own_registration` when
    this device's own earlier registration most likely used it (its answer was lost)."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", own_registration: bool = False
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.own_registration = own_registration


class ReonboardingRequiredError(HubRefusedError):
    """The credentials and the RAT were refused (expired after a long offline period, or revoked by
    offboarding): only a new boarding configuration brings the device back."""


# --- the installer ---------------------------------------------------------------------------------------

EXIT_REJECTED = (
    7  # the image was refused (signature, hash, hardware, downgrade, size): a new release is needed
)
EXIT_NOT_CONFIRMED = 8  # the new firmware failed its health check or was rolled back by the bootloader


class InstallError(MersError):
    """Base of the installer's own failures; the journal says where the install stands."""

    exit_code = EXIT_REFUSED


class InstallBusyError(InstallError):
    """Another install is in progress (the journal names it): finish or confirm that one first."""


class AbandonRefusedError(InstallError):
    """The install cannot be abandoned: the new slot is already armed, so the bootloader and `mers
    confirm` decide how it ends."""


class ImageRejectedError(InstallError):
    """The image failed a check: `field` names it (the `signing` error's field, or `size`, `etag`).
    Raised before any slot byte is written whenever the header and trailer alone decide it."""

    exit_code = EXIT_REJECTED

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ImageChangedError(InstallError):
    """The image behind the URL is not the one the journal started with (ETag or size differ): splicing
    bytes of two images into one slot is never an option, so the install starts over."""


class DownloadError(HubUnreachableError):
    """The image could not be fetched within the bounded retries; the journal keeps the offset reached."""


class NotConfirmedError(InstallError):
    """`mers confirm` did not commit: the health check failed, or the bootloader rolled back."""

    exit_code = EXIT_NOT_CONFIRMED


class HealthCheckStoppedError(InstallError):
    """The health hook was stopped before it could judge (the daemon is stopping, or a stop signal reached
    the hook too, as systemd sends one to the whole service): no verdict, the trial stays as it was and
    the next `confirm` runs the check again."""


class TaskClosedError(InstallError):
    """The installation task is closed (ACTIVATED, FAILED or CANCELED by the operator): nothing more is
    done for it."""

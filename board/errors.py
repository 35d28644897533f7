"""The one exception family of the board package.

Everything a caller, a factory station or a damaged file can do wrong is a `BoardError` subclass that
names the field, so the CLI prints one line, the console maps it to an SMP error, and callers catch one
base. A refused operation has written nothing.
"""

from __future__ import annotations


class BoardError(Exception):
    """Base of every error the board package raises on purpose; `field` names what failed."""

    #: the field, setting, file or slot that failed; shown in messages and available to callers
    field: str = ""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        if field:
            self.field = field


# --- configuration ---------------------------------------------------------------------------------


class ConfigError(BoardError):
    """The board's TOML configuration (or a simulated board's directory) is missing, unreadable or wrong;
    `field` is the TOML key, e.g. `slots.a.size`."""

    field = "config"


class RunningSlotUnknownError(ConfigError):
    """The kernel command line does not say which slot is running, so the inactive one cannot be known."""

    field = "boot.slot_parameter"


# --- files -----------------------------------------------------------------------------------------


class StorageError(BoardError):
    """A file of the board could not be read or written (an atomic write leaves the old file)."""

    field = "storage"


class InvalidNameError(StorageError):
    """A state file name that could escape the state directory or collide with a temporary file."""

    field = "name"


class CorruptStoreError(StorageError):
    """A store file exists but is not what we wrote; it is reported, never silently reset."""


# --- key slots, lock and boarding data (the emulated OTP) -----------------------------------------


class KeyStoreError(BoardError):
    """Base of refused trust-anchor and lock operations."""

    field = "key_slot"


class KeySlotIndexError(KeyStoreError):
    """There is no key slot with that index."""


class InvalidKeyError(KeyStoreError):
    """The bytes are not a public key of a supported type, in the form MCUboot embeds."""

    field = "key"


class WriteOnceError(KeyStoreError):
    """The slot already holds another key: trust anchors are write-once."""


class DuplicateKeyError(KeyStoreError):
    """The key is already in another slot, where revoking one copy would leave the other trusted."""


class KeyRevokedError(KeyStoreError):
    """The slot's key is revoked; nothing can be written there again."""


class KeySlotEmptyError(KeyStoreError):
    """Revoking a slot that holds no key."""


class LastKeyError(KeyStoreError):
    """Revoking the last usable key of a locked board would leave it unable to accept any image."""


class BoardLockedError(KeyStoreError):
    """The board is locked: provisioning writes (keys, boarding data) are refused for good."""

    field = "lock"


class NotReadyToLockError(KeyStoreError):
    """Locking needs at least one usable key and the boarding data."""

    field = "lock"


class SecurityCounterRegressionError(BoardError):
    """A security-counter floor below the current one (the floor only rises), or outside 32 bits."""

    field = "security_counter"


class BoardingDataError(BoardError):
    """Boarding data that a device could not use to reach its hub; `field` names the part, e.g.
    `config.content.clientId`."""

    field = "boarding"


# --- slots -----------------------------------------------------------------------------------------


class SlotError(BoardError):
    """Base of slot problems; `field` names the slot."""

    field = "slot"


class ActiveSlotWriteError(SlotError):
    """Writing a slot the board runs, will boot next, or falls back to: refused."""


class SlotFullError(SlotError):
    """A write that would run past the end of the slot."""


class SlotRecordError(SlotError):
    """A slot record that is malformed or does not fit its slot."""


class SlotContentMismatchError(SlotError):
    """The slot's content does not hash to the SHA256 its recorded image header and TLVs carry."""


# --- boot environment and reboot -------------------------------------------------------------------


class BootEnvError(BoardError):
    """The U-Boot environment could not be read or written, or holds values outside our model."""

    field = "boot_env"


class RebootError(BoardError):
    """The reboot command failed or the reboot request could not be recorded."""

    field = "reboot"


class ConsoleBusyError(BoardError):
    """Another provisioning console already serves this board."""

    field = "board"

"""The one exception family of the signing package.

Every failure a user can cause (a bad file, a wrong passphrase, a tampered image) is a `SigningError`
subclass that names what failed, so the CLI prints one line and callers catch one base. Nothing in this
package lets a `struct.error`, `ValueError` or construct exception escape for bad input.
"""

from __future__ import annotations


class SigningError(Exception):
    """Base of every error the signing package raises on purpose."""

    #: the field, file or step that failed; shown in messages and available to callers
    field: str = ""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        if field:
            self.field = field


# --- arguments and files ----------------------------------------------------------------------------


class InvalidArgumentError(SigningError):
    """A value given by the user (version, TLV tag, header size...) is not acceptable."""


class InputFileError(SigningError):
    """An input file is missing, unreadable or too large for the format."""

    field = "input"


class OutputFileError(SigningError):
    """The output could not be written (nothing partial is left behind)."""

    field = "output"


# --- keys ------------------------------------------------------------------------------------------


class KeyError_(SigningError):
    """Base of key problems (named with a trailing underscore so it never shadows the builtin)."""

    field = "key"


class KeyFileError(KeyError_):
    """The key file is missing or unreadable."""


class KeyFormatError(KeyError_):
    """The key file holds no key we can read."""


class NotAPrivateKeyError(KeyError_):
    """A public key was given where signing needs a private one."""


class PassphraseRequiredError(KeyError_):
    """The private key is encrypted and no passphrase was given."""


class WrongPassphraseError(KeyError_):
    """The passphrase does not decrypt the private key."""


class UnsupportedKeyTypeError(KeyError_):
    """A key of a type or size the image format does not carry (only RSA-3072, ECDSA P-256, Ed25519)."""


class SigningFaultError(KeyError_):
    """The key produced a signature that does not verify with its own public key."""


class Pkcs11Error(KeyError_):
    """The PKCS#11 module, token or object could not be used."""

    field = "pkcs11"


# --- image structure -------------------------------------------------------------------------------


class ImageFormatError(SigningError):
    """The image is not a well-formed MCUboot image; `field` names the part that is wrong."""

    field = "image"


class TruncatedImageError(ImageFormatError):
    """The file ends before a structure it declares."""


class BadMagicError(ImageFormatError):
    """A magic number (header, TLV info) is not the expected one."""


class SizeOutOfRangeError(ImageFormatError):
    """A size or offset in the header points outside the file."""


class TlvOverrunError(ImageFormatError):
    """A TLV runs past the end of its area."""


class TrailingDataError(ImageFormatError):
    """Bytes follow the TLV area: they are covered by nothing and have no place in an image."""

    field = "trailer"


class BadTlvError(ImageFormatError):
    """A TLV has a length its type does not allow, is repeated, or is not allowed in its area."""


class UnsupportedImageError(ImageFormatError):
    """A well-formed image that uses a feature we refuse (encryption, compression, full public keys)."""


# --- verification ----------------------------------------------------------------------------------


class VerificationError(SigningError):
    """The image is well formed but must not be trusted; `field` names the failing check."""


class HashMismatchError(VerificationError):
    """The recomputed SHA-256 differs from the SHA256 TLV: something in the signed range changed."""

    field = "SHA256"


class MissingHashError(VerificationError):
    """The image carries no SHA256 TLV, or more than one."""

    field = "SHA256"


class NoSignatureError(VerificationError):
    """The image carries no signature at all."""

    field = "signature"


class MissingKeyHashError(VerificationError):
    """A signature TLV is not preceded by the KEYHASH that names its key."""

    field = "KEYHASH"


class UnknownKeyError(VerificationError):
    """The image is signed only by keys that are not trusted."""

    field = "KEYHASH"


class KeyHashMismatchError(VerificationError):
    """A signature verifies with a trusted key, but the KEYHASH beside it names another key."""

    field = "KEYHASH"


class RevokedKeyError(VerificationError):
    """The only trusted keys that signed the image are revoked."""

    field = "KEYHASH"


class SignatureTypeError(VerificationError):
    """The signature TLV's type does not match the algorithm of the key its KEYHASH names."""

    field = "signature"


class BadSignatureError(VerificationError):
    """The signature of a trusted key does not verify over the image digest."""

    field = "signature"


class SecurityCounterError(VerificationError):
    """The image's security counter is below the device's floor (a downgrade attempt)."""

    field = "SEC_CNT"


class VendorMismatchError(VerificationError):
    """UUID_VID is missing or names another vendor."""

    field = "UUID_VID"


class ClassMismatchError(VerificationError):
    """UUID_CID is missing or names another hardware class."""

    field = "UUID_CID"


class SlotTooSmallError(VerificationError):
    """The payload does not fit the target slot."""

    field = "img_size"

"""`mers-sign`: the release engineer's command line, a thin layer over the signing library.

Each command parses options, calls one library function, and prints one line (or JSON). Every
`SigningError` becomes a one-line message and a non-zero exit code; no traceback for user errors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .errors import (
    ImageFormatError,
    InputFileError,
    InvalidArgumentError,
    KeyError_,
    KeyFileError,
    OutputFileError,
    SigningError,
    VerificationError,
)

# The library modules are imported inside each command, not here: a command then loads only what it uses
# (`verify` needs neither the output pipeline nor the PKCS#11 code), and start-up time is a visible share
# of verifying an image. The names below are for type checking only.
if TYPE_CHECKING:
    from .build import ImageOptions
    from .key_sources import KeyAccess
    from .keys import PublicKey
    from .verify import VerifiedImage

MAX_SIGNATURE_BYTES = 0xFFFF  # a TLV's length is a u16
KEY_TYPES = ("rsa-3072", "ecdsa-p256", "ed25519")  # KeyAlgorithm's values, without importing cryptography

EXIT_REJECTED = 1  # the image is malformed or must not be trusted
EXIT_USAGE = 2  # a value given on the command line is not acceptable (click uses 2 as well)
EXIT_KEY = 3  # a key could not be used
EXIT_FILE = 4  # an input or output file could not be used
EXIT_OTHER = 5

STREAM_SWITCH_INTERVAL_S = 0.0001  # see `run`

F = TypeVar("F", bound=Callable[..., Any])


class Integer(click.ParamType[int, Any]):
    """An integer in C syntax (`512`, `0x200`), as firmware people write sizes."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            number = int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not an integer (decimal or 0x-hex)", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return number


class CustomTlv(click.ParamType[tuple[int, bytes], Any]):
    """`TAG=HEX`, e.g. `0xa0=deadbeef`."""

    name = "TAG=HEX"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, bytes]:
        if isinstance(value, tuple):
            return value
        tag_text, sep, hex_text = str(value).partition("=")
        try:
            tag = int(tag_text, 0)
            data = bytes.fromhex(hex_text.removeprefix("0x"))
        except ValueError:
            self.fail(f"{value!r} is not TAG=HEX (e.g. 0xa0=deadbeef)", param, ctx)
        if not sep:
            self.fail(f"{value!r} is not TAG=HEX (e.g. 0xa0=deadbeef)", param, ctx)
        return tag, data


@contextmanager
def reported_errors(*, refusal_as_json: bool = False) -> Iterator[None]:
    """Turn our errors into one line on stderr and an exit code that says which kind of failure it was.
    With `refusal_as_json`, a rejected image is also told on stdout, as `verify --json` tells a valid one:
    a pipeline reading stdout gets a verdict either way."""
    try:
        yield
    except SigningError as error:
        message = str(error)
        field = f"[{error.field}] " if error.field else ""
        click.echo(f"mers-sign: error: {field}{message}", err=True)
        code = _exit_code(error)
        if refusal_as_json and code == EXIT_REJECTED:
            verdict = {"valid": False, "reason": type(error).__name__, "field": error.field, "error": message}
            click.echo(json.dumps(verdict, indent=2))
        sys.exit(code)


def _exit_code(error: SigningError) -> int:
    if isinstance(error, VerificationError | ImageFormatError):
        return EXIT_REJECTED
    if isinstance(error, InvalidArgumentError):
        return EXIT_USAGE
    if isinstance(error, KeyError_):
        return EXIT_KEY
    if isinstance(error, InputFileError | OutputFileError):
        return EXIT_FILE
    return EXIT_OTHER


def key_access_options(function: F) -> F:
    """--passphrase-file, --pkcs11-module, --pkcs11-pin-file: what opening a private key may need."""
    function = click.option(
        "--pkcs11-pin-file",
        type=click.Path(path_type=Path),
        help="File holding the token PIN (else the URI's pin-value or pin-source).",
    )(function)
    function = click.option(
        "--pkcs11-module",
        metavar="PATH",
        envvar="MERS_PKCS11_MODULE",
        help="PKCS#11 module for pkcs11: URIs [env MERS_PKCS11_MODULE].",
    )(function)
    function = click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path),
        help="File holding the passphrase of an encrypted PEM key.",
    )(function)
    return function


def image_options(function: F) -> F:
    """The metadata options shared by `sign` and `digest`."""
    decorators = [
        click.option("--version", "version", required=True, help="Image version MAJOR.MINOR.REVISION+BUILD."),
        click.option(
            "--security-counter",
            type=Integer(),
            help="Anti-rollback counter (SEC_CNT); devices refuse lower.",
        ),
        click.option("--vendor", help="Vendor name (UUID_VID, derived as imgtool --vid derives it)."),
        click.option("--class", "image_class", help="Hardware class name within the vendor (UUID_CID)."),
        click.option(
            "-H",
            "--header-size",
            type=Integer(),
            default=32,
            show_default=True,
            help="Header plus padding; the payload starts there (e.g. 0x200).",
        ),
        click.option(
            "--custom-tlv", type=CustomTlv(), multiple=True, help="Protected custom TLV, tag 0xa0-0xfffe."
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _access(
    passphrase_file: Path | None, pkcs11_module: str | None, pkcs11_pin_file: Path | None
) -> KeyAccess:
    from .key_sources import KeyAccess
    from .keys import read_passphrase_file

    passphrase = read_passphrase_file(passphrase_file) if passphrase_file else None
    pin = None
    if pkcs11_pin_file:
        try:
            pin = read_passphrase_file(pkcs11_pin_file).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFileError(
                f"PIN file {pkcs11_pin_file} is not UTF-8 text", field=str(pkcs11_pin_file)
            ) from exc
    return KeyAccess(passphrase, pkcs11_module, pin)


def _options(
    version: str,
    security_counter: int | None,
    vendor: str | None,
    image_class: str | None,
    header_size: int,
    custom_tlv: tuple[tuple[int, bytes], ...],
) -> ImageOptions:
    from .build import ImageOptions
    from .image_format import ImageVersion

    return ImageOptions(
        version=ImageVersion.parse(version),
        security_counter=security_counter,
        vendor=vendor,
        image_class=image_class,
        header_size=header_size,
        custom_tlvs=tuple(custom_tlv),
    )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 ok, 1 image rejected, 2 usage, 3 key problem, 4 file problem, 130 interrupted.",
)
@click.version_option(package_name="mers")
def main() -> None:
    """Sign firmware images in MCUboot's format and verify them strictly.

    \b
    Example:
      mers-sign keygen -o release.pem
      mers-sign sign --key release.pem --version 1.2.0 --security-counter 3 rootfs.img rootfs.signed
      mers-sign verify --key release.pub.pem rootfs.signed
    """


@main.command()
@click.option(
    "--type",
    "key_type",
    type=click.Choice(KEY_TYPES),
    default=KEY_TYPES[0],
    show_default=True,
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Private key path.")
@click.option("--passphrase-file", type=click.Path(path_type=Path), help="Encrypt the key with this.")
def keygen(key_type: str, output: Path, passphrase_file: Path | None) -> None:
    """Generate a signing key: OUTPUT (mode 0600) and its public half beside it (KEY.pub.pem).

    Example: mers-sign keygen --type ecdsa-p256 -o release.pem
    """
    from .keys import KeyAlgorithm, load_public_key, read_passphrase_file, write_key_pair

    with reported_errors():
        passphrase = read_passphrase_file(passphrase_file) if passphrase_file else None
        private_path, public_path = write_key_pair(output, KeyAlgorithm(key_type), passphrase)
        key_hash = load_public_key(public_path).key_hash.hex()
    click.echo(f"wrote {private_path} (private, 0600) and {public_path}; key hash {key_hash}")


@main.command()
@click.argument("key")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["pem", "der", "hash", "c"]),
    default="pem",
    show_default=True,
    help="der is the form MCUboot embeds (PKCS#1 for RSA); hash is its SHA-256, the KEYHASH.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here, not stdout.")
@key_access_options
def getpub(
    key: str,
    output_format: str,
    output: Path | None,
    passphrase_file: Path | None,
    pkcs11_module: str | None,
    pkcs11_pin_file: Path | None,
) -> None:
    """Print the public key of KEY (a private or public key file, or a pkcs11: URI).

    Example: mers-sign getpub release.pem --format hash
    """
    from .key_sources import load_any_public_key
    from .output import atomic_output

    with reported_errors():
        public = load_any_public_key(key, _access(passphrase_file, pkcs11_module, pkcs11_pin_file))
        data = _public_key_output(public, output_format)
        if output is None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            with atomic_output(output) as handle:
                handle.write(data)


#: the array names `imgtool getpub -e lang-c` emits, which MCUboot's boot/zephyr/keys.c and the ports'
#: key files declare `extern`: a C file with other names does not link into the bootloader
_C_SYMBOL = {"rsa-3072": "rsa", "ecdsa-p256": "ecdsa", "ed25519": "ed25519"}


def _public_key_output(public: PublicKey, output_format: str) -> bytes:
    if output_format == "pem":
        return public.pem()
    if output_format == "der":
        return public.der
    if output_format == "hash":
        return public.key_hash.hex().encode() + b"\n"
    name = _C_SYMBOL[public.algorithm.value]
    rows = [
        "    " + " ".join(f"0x{byte:02x}," for byte in public.der[i : i + 8])
        for i in range(0, len(public.der), 8)
    ]
    text = "\n".join(
        [
            "/* Autogenerated by mers-sign, do not edit. */",
            f"const unsigned char {name}_pub_key[] = {{",
            *rows,
            "};",
            f"const unsigned int {name}_pub_key_len = {len(public.der)};",
        ]
    )
    return text.encode() + b"\n"


@main.command()
@click.option(
    "--key", "keys", multiple=True, required=True, help="Private key file or pkcs11: URI; repeatable."
)
@key_access_options
@image_options
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
def sign(
    keys: tuple[str, ...],
    passphrase_file: Path | None,
    pkcs11_module: str | None,
    pkcs11_pin_file: Path | None,
    input_path: Path,
    output_path: Path,
    **image: Any,
) -> None:
    """Wrap the payload IN into a signed image OUT, one signature per --key.

    Example: mers-sign sign --key release.pem --version 1.2.0+7 --vendor acme.example --class gw-1 IN OUT
    """
    from .build import ImageBuilder, finish_signed

    with reported_errors(), ExitStack() as stack:
        options = _options(**image)
        # the payload streams into OUT from here on, while the keys (and cryptography) load
        builder = stack.enter_context(ImageBuilder(input_path, output_path, options))
        from .key_sources import load_signer

        access = _access(passphrase_file, pkcs11_module, pkcs11_pin_file)
        signers = []
        for spec in keys:
            signer = load_signer(spec, access)
            stack.callback(signer.close)
            signers.append(signer)
        signed = finish_signed(builder, signers)
        click.echo(
            f"signed {output_path}: version {options.version}, payload {signed.img_size} bytes, "
            f"sha256 {signed.digest.hex()}, {len(signers)} signature(s)"
        )


@main.command()
@click.option(
    "--key", "keys", multiple=True, required=True, help="Trusted public key (PEM or DER); repeatable."
)
@click.option(
    "--min-security-counter", type=Integer(), default=0, show_default=True, help="The device's floor."
)
@click.option("--vendor", help="Require this vendor's UUID_VID.")
@click.option("--class", "image_class", help="Require this class's UUID_CID (needs --vendor).")
@click.option("--slot-size", type=Integer(), help="Require the payload to fit a slot of this many bytes.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the verified fields as JSON (or the refusal, exit 1)."
)
@click.argument("image", type=click.Path(path_type=Path))
def verify(
    keys: tuple[str, ...],
    min_security_counter: int,
    vendor: str | None,
    image_class: str | None,
    slot_size: int | None,
    as_json: bool,
    image: Path,
) -> None:
    """Exit 0 only if IMAGE is fully valid and signed by one of the --key public keys.

    Example: mers-sign verify --key release.pub.pem --min-security-counter 3 rootfs.signed
    """
    from .files import PrefixHasher, open_input

    if image_class is not None and vendor is None:
        raise click.UsageError("--class needs --vendor: a class is named within its vendor")
    with (
        reported_errors(refusal_as_json=as_json),
        open_input(image, "image") as handle,
        PrefixHasher(handle) as hasher,
    ):
        # the image is being hashed in the background while the verifier and the keys load
        from .image_format import class_uuid, vendor_uuid
        from .keys import load_public_key
        from .verify import Trust, verify_open_image

        trust = Trust(
            keys=tuple(load_public_key(Path(spec)) for spec in keys),
            min_security_counter=min_security_counter,
            vendor_uuid=_required_uuid("--vendor", vendor_uuid, vendor),
            # vendor is None only when image_class is too (refused above), so "" is never derived from
            class_uuid=_required_uuid("--class", partial(class_uuid, vendor or ""), image_class),
            slot_size=slot_size,
        )
        verified = verify_open_image(handle, hasher, trust)
    if as_json:
        click.echo(json.dumps(_verified_json(verified), indent=2))
    else:
        signers = ", ".join(key_hash.hex()[:16] for key_hash in verified.signed_by)
        click.echo(
            f"OK {image}: version {verified.version}, security counter {verified.security_counter}, "
            f"payload {verified.img_size} bytes, signed by {signers}"
        )


def _required_uuid(option: str, derive: Callable[[str], uuid.UUID], name: str | None) -> uuid.UUID | None:
    """The UUID an option requires, or None when the option was not given. An empty or unprintable name
    is a usage error, never "no requirement": `--vendor "$VENDOR"` with the variable unset must not
    silently turn off the hardware check."""
    if name is None:
        return None
    try:
        return derive(name)
    except InvalidArgumentError as exc:
        message = f"{option} {name!r} is not a printable name or a UUID"
        raise InvalidArgumentError(message, field=option) from exc


def _verified_json(verified: VerifiedImage) -> dict[str, Any]:
    return {
        "valid": True,
        "version": str(verified.version),
        "security_counter": verified.security_counter,
        "img_size": verified.img_size,
        "hdr_size": verified.hdr_size,
        "sha256": verified.digest.hex(),
        "signed_by": [key_hash.hex() for key_hash in verified.signed_by],
        "vendor_uuid": str(verified.vendor_uuid) if verified.vendor_uuid else None,
        "class_uuid": str(verified.class_uuid) if verified.class_uuid else None,
        "custom_tlvs": {f"0x{tag:04x}": value.hex() for tag, value in verified.custom_tlvs},
    }


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON shaped like imgtool dumpinfo --format json.")
@click.argument("image", type=click.Path(path_type=Path))
def info(as_json: bool, image: Path) -> None:
    """Show every header field and TLV of IMAGE. Needs no key and checks no signature.

    Example: mers-sign info --json rootfs.signed
    """
    from .info import read_image_info, render_text

    with reported_errors():
        description = read_image_info(image)
    click.echo(json.dumps(description, indent=2) if as_json else render_text(description))


@main.command()
@image_options
@click.option(
    "-o",
    "--output",
    "digest_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the 32-byte digest to sign.",
)
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("unsigned_path", metavar="UNSIGNED", type=click.Path(path_type=Path))
def digest(input_path: Path, unsigned_path: Path, digest_path: Path, **image: Any) -> None:
    """Detached signing, step 1: write the unsigned image UNSIGNED and the digest to sign.

    Sign the digest where the key lives, e.g. for RSA-3072:
    openssl pkeyutl -sign -inkey k.pem -pkeyopt digest:sha256 -pkeyopt rsa_padding_mode:pss
    -pkeyopt rsa_pss_saltlen:32 -in DIGEST -out SIG ; then run `mers-sign attach`.
    """
    from .build import prepare_detached

    with reported_errors():
        value = prepare_detached(input_path, unsigned_path, digest_path, _options(**image))
    click.echo(f"wrote {unsigned_path} and {digest_path}: sha256 {value.hex()}")


@main.command()
@click.option(
    "--signature",
    required=True,
    type=click.Path(path_type=Path),
    help="Raw signature of the digest.",
)
@click.option(
    "--pubkey",
    required=True,
    type=click.Path(path_type=Path),
    help="The signer's public key.",
)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
def attach(signature: Path, pubkey: Path, image: Path, output_path: Path) -> None:
    """Detached signing, step 2: check the signature, then write IMAGE with it as OUT.

    Example: mers-sign attach --signature sig.bin --pubkey hsm.pub.pem unsigned.img signed.img
    """
    from .build import attach_signature
    from .keys import load_public_key

    with reported_errors():
        public = load_public_key(pubkey)
        try:
            with signature.open("rb") as handle:  # bounded: /dev/zero given by mistake is an error
                signature_bytes = handle.read(MAX_SIGNATURE_BYTES + 1)
        except OSError as exc:
            raise InputFileError(
                f"cannot read signature {signature}: {exc.strerror}", field="signature"
            ) from exc
        if len(signature_bytes) > MAX_SIGNATURE_BYTES:
            raise InputFileError(
                f"signature {signature} holds more than {MAX_SIGNATURE_BYTES} bytes, more than a TLV can",
                field="signature",
            )
        value = attach_signature(image, output_path, signature_bytes, public)
    click.echo(f"wrote {output_path}: signature by {public.key_hash.hex()[:16]} over sha256 {value.hex()}")


def run() -> NoReturn:
    """The `mers-sign` console script: `main` tuned for a process of its own, then an exit that skips
    the interpreter's teardown. Both are process-wide, so they are here, not in `main` (which tests and
    library users may call in-process).

    sign and verify stream the image in a background thread that takes the GIL twice per chunk while the
    main thread imports cryptography and loads keys; at the default 5 ms switch interval each of those
    takes waits out the importer's turn, which cost 0.08 s of 0.56 s hashing 512 MiB here; at 0.1 ms the
    stream runs at full speed (measured) and the importer barely notices.

    When a command returns, everything it owes is done: outputs are fsynced and renamed, key files and
    HSM sessions closed (their context managers saw to it). Unloading cryptography, construct and click
    module by module would add about 20 ms to every command, a visible share of signing an image (the
    benchmark's target is 1.3x the time of hashing the same bytes). Only a clean `SystemExit` takes the
    shortcut, and only when no PKCS#11 module was loaded: python-pkcs11 calls `C_Finalize` when it unloads
    one at teardown, and a network HSM's client closes its connection there. Anything else unwinds as
    usual, traceback included.
    """
    sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        main()
    except SystemExit as done:
        code = done.code
    else:  # `main` runs click in standalone mode, which always ends in SystemExit
        code = 0
    if (code is not None and not isinstance(code, int)) or "pkcs11" in sys.modules:
        sys.exit(code)  # a message to print, or a module to finalize: the interpreter's own exit does it
    for stream in (sys.stdout, sys.stderr):  # None when the descriptor was closed (`>&-`)
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: the interpreter's own exit would also exit 120
            os._exit(120)
    os._exit(code or 0)


EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended


def _interrupted(signum: int, frame: object) -> NoReturn:
    """Ctrl-C: unwind as KeyboardInterrupt would (an output being written is removed, never left half),
    but end in the shell's code for it, 130, rather than click's "Aborted!" and 1, which means "image
    rejected" here. A SIGTERM is not caught: it ends the command as the signal does (143 in a shell)."""
    click.echo("mers-sign: interrupted", err=True)
    raise SystemExit(EXIT_INTERRUPTED)

"""Firmware image signing and strict verification in MCUboot's image format.

The safe calls are `sign_image` and `verify_image`; detached signing uses `prepare_unsigned` and
`attach_signature`. Everything raises `SigningError` subclasses on bad input.
"""

from .build import ImageOptions, SignedImage, attach_signature, prepare_unsigned, sign_image
from .errors import SigningError
from .image_format import ImageVersion, class_uuid, vendor_uuid
from .key_sources import KeyAccess, load_any_public_key, load_signer
from .keys import KeyAlgorithm, PublicKey, Signer, load_private_key, load_public_key, write_key_pair
from .verify import Trust, VerifiedImage, verify_image

__all__ = [
    "ImageOptions",
    "ImageVersion",
    "KeyAccess",
    "KeyAlgorithm",
    "PublicKey",
    "SignedImage",
    "Signer",
    "SigningError",
    "Trust",
    "VerifiedImage",
    "attach_signature",
    "class_uuid",
    "load_any_public_key",
    "load_private_key",
    "load_public_key",
    "load_signer",
    "prepare_unsigned",
    "sign_image",
    "vendor_uuid",
    "verify_image",
    "write_key_pair",
]

"""Firmware image signing and strict verification in MCUboot's image format.

The safe calls are `sign_image` and `verify_image`; detached signing uses `prepare_detached` (or
`prepare_unsigned`) and `attach_signature`. An image that streams past (a download, a slot read back) is
verified hashlib-style: `read_image_head` or `ImageHead.from_record`, then `ImageVerifier` (or
`ContentCheck` against a head verified before). Everything raises `SigningError` subclasses on bad input.

Names are imported on first use (PEP 562) so that a command-line call loads only the modules it needs:
start-up time is a visible share of verifying an image on a gateway.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import (
        ImageOptions,
        SignedImage,
        attach_signature,
        prepare_detached,
        prepare_unsigned,
        sign_image,
    )
    from .errors import SigningError
    from .image_format import ImageVersion, class_uuid, vendor_uuid
    from .key_sources import KeyAccess, load_any_public_key, load_signer
    from .keys import (
        KeyAlgorithm,
        PublicKey,
        Signer,
        load_private_key,
        load_public_key,
        public_key_from_bytes,
        write_key_pair,
    )
    from .stream import ContentCheck, ImageHead, ImageVerifier, read_image_head
    from .verify import Trust, VerifiedImage, verify_image

_LAZY = {
    "ContentCheck": ".stream",
    "ImageHead": ".stream",
    "ImageVerifier": ".stream",
    "ImageOptions": ".build",
    "ImageVersion": ".image_format",
    "KeyAccess": ".key_sources",
    "KeyAlgorithm": ".keys",
    "PublicKey": ".keys",
    "SignedImage": ".build",
    "Signer": ".keys",
    "SigningError": ".errors",
    "Trust": ".verify",
    "VerifiedImage": ".verify",
    "attach_signature": ".build",
    "class_uuid": ".image_format",
    "load_any_public_key": ".key_sources",
    "load_private_key": ".keys",
    "load_public_key": ".keys",
    "load_signer": ".key_sources",
    "prepare_detached": ".build",
    "prepare_unsigned": ".build",
    "public_key_from_bytes": ".keys",
    "read_image_head": ".stream",
    "sign_image": ".build",
    "vendor_uuid": ".image_format",
    "verify_image": ".verify",
    "write_key_pair": ".keys",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'signing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ContentCheck",
    "ImageHead",
    "ImageOptions",
    "ImageVerifier",
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
    "prepare_detached",
    "prepare_unsigned",
    "public_key_from_bytes",
    "read_image_head",
    "sign_image",
    "vendor_uuid",
    "verify_image",
    "write_key_pair",
]

"""A description of an image for humans and scripts, made without any key and without trusting it.

The JSON shape follows `imgtool dumpinfo --format json` (header fields, then the protected and unprotected
TLV lists with type, type_name, len and hex data) so tools written for one read the other; decoded values
(security counter, UUIDs) are added beside the raw data.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from .files import file_size, open_input
from .image_format import ImageFlag, SecurityCounterValue, TlvType
from .layout import FileSource, ImageLayout, TlvArea, TlvEntry, read_layout


def read_image_info(path: Path) -> dict[str, Any]:
    """Every header field and TLV of the image at `path`, as plain JSON-ready data."""
    with open_input(path, "image") as handle:
        layout = read_layout(FileSource(handle.fileno(), file_size(handle)))
    return describe_layout(layout)


def describe_layout(layout: ImageLayout) -> dict[str, Any]:
    header = layout.header
    description: dict[str, Any] = {
        "header": {
            "magic": header.magic,
            "load_addr": header.load_addr,
            "hdr_size": header.hdr_size,
            "protected_tlv_size": header.protect_tlv_size,
            "img_size": header.img_size,
            "flags": header.flags,
            "flag_names": [flag.name for flag in ImageFlag if flag & header.flags],
            "version": str(header.version),
        },
        "tlv_area": {},
        "file_size": layout.file_size,
    }
    areas = description["tlv_area"]
    # empty when there is no protected area, as imgtool dumpinfo writes it
    areas["tlv_hdr_prot"] = _area_header(layout.protected) if layout.protected else {}
    areas["tlvs_prot"] = (
        [_describe_tlv(entry) for entry in layout.protected.entries] if layout.protected else []
    )
    areas["tlv_hdr"] = _area_header(layout.unprotected)
    areas["tlvs"] = [_describe_tlv(entry) for entry in layout.unprotected.entries]
    return description


def _area_header(area: TlvArea) -> dict[str, int]:
    return {"magic": area.magic, "tlv_tot": area.total, "offset": area.offset}


def _describe_tlv(entry: TlvEntry) -> dict[str, Any]:
    described: dict[str, Any] = {
        "type": entry.type,
        "type_name": _type_name(entry.type),
        "len": len(entry.value),
        "data": entry.value.hex(),
    }
    decoded = _decode(entry)
    if decoded is not None:
        described["value"] = decoded
    return described


def _type_name(tlv_type: int) -> str:
    try:
        return TlvType(tlv_type).name
    except ValueError:
        return "UNKNOWN"


def _decode(entry: TlvEntry) -> int | str | None:
    if entry.type == TlvType.SEC_CNT and len(entry.value) == 4:
        value: int = SecurityCounterValue.parse(entry.value)
        return value
    if entry.type in (TlvType.UUID_VID, TlvType.UUID_CID) and len(entry.value) == 16:
        return str(uuid.UUID(bytes=entry.value))
    return None


def render_text(description: dict[str, Any]) -> str:
    """The human form printed by `mers-sign info`."""
    header = description["header"]
    flags = ", ".join(header["flag_names"]) or "none"
    lines = [
        f"magic             0x{header['magic']:08x}",
        f"version           {header['version']}",
        f"load_addr         0x{header['load_addr']:08x}",
        f"hdr_size          {header['hdr_size']} (0x{header['hdr_size']:x})",
        f"img_size          {header['img_size']}",
        f"protect_tlv_size  {header['protected_tlv_size']}",
        f"flags             0x{header['flags']:08x} ({flags})",
        f"file_size         {description['file_size']}",
    ]
    areas = description["tlv_area"]
    for title, key in (("protected TLVs", "tlvs_prot"), ("TLVs", "tlvs")):
        if not areas[key]:
            continue
        lines.append(f"{title}:")
        for tlv in areas[key]:
            shown = tlv.get("value", tlv["data"] if tlv["len"] <= 48 else tlv["data"][:96] + "...")
            lines.append(f"  0x{tlv['type']:04x} {tlv['type_name']:<10} len {tlv['len']:<4} {shown}")
    return "\n".join(lines)

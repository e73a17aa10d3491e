"""UEFI device paths as text, the way upstream Trustee writes them in event log claims.

A device path (UEFI 2.10, chapter 10) is a chain of nodes: type (1 byte), sub-type (1 byte),
length (2 bytes, little-endian, header included), then node data. This module renders the node
kinds upstream renders (PCI, ACPI, USB, MAC, IPv4, Fibre Channel Ex, hard drive, vendor media,
file path, BIOS boot specification); every other node, and every node whose data does not fit
its kind, is written generically as ``Path(type,sub-type,hex data)``.

The text is for policies to read, so it follows upstream's output byte for byte, including its
quirks: PCI prints the function before the device, IPv4 addresses print with their bytes
reversed, MAC addresses are taken from the first 31 bytes with trailing zero digits dropped.
It does not validate anything: a device path is measured as bytes, the text is informational.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from keybroker.errors import EvidenceError

NODE_HEADER_SIZE = 4
GUID_SIZE = 16
_Renderer = Callable[[bytes], str | None]

_BBS_DEVICE_TYPES = {
    0x01: "FLOPPY",
    0x02: "HARD_DRIVE",
    0x03: "CDROM",
    0x04: "PCMCIA",
    0x05: "USB",
    0x06: "EMBEDDED_NETWORK",
    0x80: "DEV",
    0xFF: "UNKNOWN",
}


def utf16_lossy(data: bytes) -> str:
    """UTF-16LE text where each unpaired surrogate becomes U+FFFD; an odd last byte is dropped."""
    text = data[: len(data) // 2 * 2].decode("utf-16-le", "surrogatepass")
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)


def uefi_guid(raw: bytes) -> str:
    """A GUID in registry format: the first three fields are little-endian, upper case."""
    data1, data2, data3 = struct.unpack_from("<IHH", raw)
    tail = raw[8:16].hex().upper()
    return f"{data1:08X}-{data2:04X}-{data3:04X}-{tail[:4]}-{tail[4:]}"


def _pci(data: bytes) -> str | None:
    return f"Pci({data[0]},{data[1]})" if len(data) >= 2 else None


def _acpi(data: bytes) -> str | None:
    if len(data) < 8:
        return None
    hid, uid = struct.unpack_from("<II", data)
    # the low 16 bits of _HID pack a three-letter EISA vendor id, five bits a letter
    letters = "".join(chr((hid >> shift & 0x1F) + ord("@")) for shift in (10, 5, 0))
    return f"ACPI({letters}{hid >> 16:04X},{uid})"


def _fibre_ex(data: bytes) -> str | None:
    if len(data) < 16:
        return None
    return f"FibreEx(0x{data[0:8].hex()},0x{data[8:16].hex()})"


def _usb(data: bytes) -> str | None:
    return f"USB({data[0]},{data[1]})" if len(data) >= 2 else None


def _mac(data: bytes) -> str | None:
    if len(data) != 33:
        return None
    address = data[0:31].hex().rstrip("0").upper()
    return f"Mac({address},{data[32]:#04x})"


def _ipv4_address(raw: bytes) -> str:
    return ".".join(str(octet) for octet in reversed(raw))


def _ipv4(data: bytes) -> str | None:
    if len(data) < 23:
        return None
    protocol = {6: "TCP", 17: "UDP"}.get(struct.unpack_from("<H", data, 12)[0], "")
    origin = {0: "DHCP", 1: "Static"}.get(data[14], "")
    gateway, subnet = struct.unpack_from("<II", data, 15)
    tail = f",{gateway},{subnet}" if gateway or subnet else ""
    local, remote = _ipv4_address(data[0:4]), _ipv4_address(data[4:8])
    return f"IPv4({remote},{protocol},{origin},{local}{tail})"


def _hard_drive(data: bytes) -> str | None:
    if len(data) < 38:
        return None
    number, start, size = struct.unpack_from("<IQQ", data)
    signature, partition_format = data[20:36], data[36]
    if partition_format == 0x01:
        kind, rendered = "MBR", f"{struct.unpack_from('<I', signature)[0]:#010x}"
    elif partition_format == 0x02:
        kind, rendered = "GPT", uefi_guid(signature)
    else:
        return None
    extent = f",{start:#x},{size:#x}" if number != 0 else ""
    return f"HD({number},{kind},{rendered}{extent})"


def _vendor_media(data: bytes) -> str | None:
    if len(data) < GUID_SIZE:
        return None
    return f"VenMedia({uefi_guid(data)},{data[GUID_SIZE:].hex()})"


def _file_path(data: bytes) -> str | None:
    if not data or len(data) % 2:
        return None
    return f"File({utf16_lossy(data[:-2])})"  # the last UTF-16 unit is the terminating NUL


def _bbs(data: bytes) -> str | None:
    if len(data) < 4:
        return None
    device_type, status = struct.unpack_from("<HH", data)
    description = data[4:].split(b"\x00", 1)[0]
    try:
        text = description.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return f"BBS({_BBS_DEVICE_TYPES.get(device_type, str(device_type))},{text},{status})"


# (type, sub-type) -> renderer; types: 1 hardware, 2 ACPI, 3 messaging, 4 media, 5 BIOS boot
_RENDERERS: dict[tuple[int, int], _Renderer] = {
    (0x01, 0x01): _pci,
    (0x02, 0x01): _acpi,
    (0x03, 0x05): _usb,
    (0x03, 0x0B): _mac,
    (0x03, 0x0C): _ipv4,
    (0x03, 0x15): _fibre_ex,
    (0x04, 0x01): _hard_drive,
    (0x04, 0x03): _vendor_media,
    (0x04, 0x04): _file_path,
    (0x05, 0x01): _bbs,
}


def render_node(node_type: int, sub_type: int, data: bytes) -> str:
    renderer = _RENDERERS.get((node_type, sub_type))
    text = renderer(data) if renderer is not None else None
    return text if text is not None else f"Path({node_type},{sub_type},{data.hex()})"


def render_device_path(unverified_path: bytes) -> list[str]:
    """Each node of a device path (its end node already cut off) as text, in order.

    Raises :class:`EvidenceError` when a node header is cut short or a node's length is smaller
    than its header or runs past the path: every node consumes at least its header, so the walk
    always ends.
    """
    nodes: list[str] = []
    rest = unverified_path
    while True:
        if len(rest) < NODE_HEADER_SIZE:
            raise EvidenceError(
                f"a device path node header needs {NODE_HEADER_SIZE} bytes, {len(rest)} remain"
            )
        node_type, sub_type, length = struct.unpack_from("<BBH", rest)
        if length < NODE_HEADER_SIZE or length > len(rest):
            raise EvidenceError(
                f"a device path node claims {length} bytes; expected {NODE_HEADER_SIZE} to "
                f"{len(rest)}"
            )
        nodes.append(render_node(node_type, sub_type, rest[NODE_HEADER_SIZE:length]))
        rest = rest[length:]
        if not rest:
            return nodes

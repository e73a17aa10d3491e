"""Event types of a TCG PC Client event log and the ``details`` upstream Trustee derives from each.

Upstream's claims carry, next to each event's raw data, a decoded view of it whose shape depends
on the event type (TCG PC Client Platform Firmware Profile 1.06, section 10.4.1):

* EFI variable events: the variable's GUID, its UTF-16 name and its data;
* image load events (``EV_EFI_BOOT_SERVICES_APPLICATION``): the device path, as text;
* ``EV_EVENT_TAG``: the tagged text, and for Attestation Agent (AAEL) events, their domain,
  operation and content;
* ``EV_IPL``, ``EV_PLATFORM_CONFIG_FLAGS``, the ``*2`` blob and table events, and plain action
  events: a string, each extracted the way upstream extracts it;
* every other type: no details.

Each decoder reproduces upstream's output for the same bytes, and fails (``EvidenceError``)
where upstream refuses the whole log. Nothing here is trusted: the details only describe data
whose digest the event log replay binds to a measurement register.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.tcg.eventlog_devpath import render_device_path, utf16_lossy

EV_NO_ACTION = 0x3
EV_EVENT_TAG = 0x6
EVENT_TYPE_NAMES: dict[int, str] = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x2: "EV_UNUSED",
    EV_NO_ACTION: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    EV_EVENT_TAG: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
AAEL_EVENT_ID = 0x4141454C  # the tag id of Attestation Agent events: "LEAA" little-endian
GUID_SIZE = 16
# serde_json, which upstream uses to read AAEL content, refuses nesting this deep or deeper
_JSON_MAX_DEPTH = 128
# UEFI_IMAGE_LOAD_EVENT: location, length, link-time address (u64 each), then the path length
_IMAGE_LOAD_HEADER = 32
_END_NODE_SIZE = 4
_GCE_IPL_PREFIX = b".\x00"  # Google's shim logs EV_IPL strings as UTF-16LE after this prefix


@dataclass(frozen=True)
class AaelEntry:
    """An Attestation Agent event: ``<domain> <operation> <content>``."""

    domain: str
    operation: str
    content: JsonValue  # the content parsed as JSON when it is JSON, else the text itself


@dataclass(frozen=True)
class EventDetails:
    """The decoded view of one event's data; fields a type does not have stay ``None``."""

    string: str | None = None
    unicode_name: str | None = None
    unicode_name_length: int | None = None
    variable_data: bytes | None = None
    variable_data_length: int | None = None
    variable_name: str | None = None
    device_paths: tuple[str, ...] | None = None
    data: AaelEntry | None = None

    def to_json(self) -> dict[str, JsonValue]:
        """Upstream's ``details`` object: absent fields are left out, bytes are base64."""
        out: dict[str, JsonValue] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode("ascii")
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, AaelEntry):
                value = {
                    "content": value.content,
                    "domain": value.domain,
                    "operation": value.operation,
                }
            out[field.name] = value
        return out


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvidenceError(f"{what} is not valid UTF-8 (byte {e.start})") from e


def _blank(_data: bytes) -> EventDetails:
    return EventDetails()


def _plain_string(data: bytes) -> EventDetails:
    return EventDetails(string=_utf8(data, "the event text"))


def _counted_string(data: bytes) -> EventDetails:
    """``*_BLOB2`` / ``*_TABLES2``: a length byte that counts a terminating NUL, then the text."""
    if not data:
        raise EvidenceError("a counted description needs at least 1 byte, found none")
    count = data[0]
    if count == 0 or len(data) < count:
        raise EvidenceError(f"a counted description of {count} bytes does not fit {len(data)}")
    return EventDetails(string=_utf8(data[1:count], "the description"))


def _platform_config_flags(data: bytes) -> EventDetails:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""  # binary configuration data (e.g. a TD HOB) has no text
    text = text.replace("\x10", " ")
    return EventDetails(string="".join(c for c in text if not _is_control(c)))


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F  # Unicode category Cc


def _ipl(data: bytes) -> EventDetails:
    if len(data) < 2:
        raise EvidenceError(f"an EV_IPL event needs at least 2 bytes, found {len(data)}")
    if data.startswith(_GCE_IPL_PREFIX):
        if len(data) == 2 or len(data) % 2:
            raise EvidenceError("an EV_IPL event with a UTF-16 prefix has no UTF-16 text")
        return EventDetails(string=utf16_lossy(data[2:-2]))
    try:
        return EventDetails(string=data.split(b"\x00", 1)[0].decode("utf-8"))
    except UnicodeDecodeError:
        return EventDetails(string=data.hex())


def _efi_variable(data: bytes) -> EventDetails:
    """UEFI_VARIABLE_DATA: GUID, name length (UTF-16 units), data length, name, data."""
    if len(data) < GUID_SIZE + 16:
        raise EvidenceError(f"an EFI variable event needs at least 32 bytes, found {len(data)}")
    name_units, data_size = struct.unpack_from("<QQ", data, GUID_SIZE)
    name_end = GUID_SIZE + 16 + 2 * name_units
    if name_end > len(data):
        raise EvidenceError(f"an EFI variable name of {name_units} units runs past the event")
    try:
        name = data[GUID_SIZE + 16 : name_end].decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise EvidenceError("an EFI variable name is not valid UTF-16") from e
    if name_end + data_size > len(data):
        raise EvidenceError(f"EFI variable data of {data_size} bytes runs past the event")
    guid = data[:GUID_SIZE].hex()
    return EventDetails(
        unicode_name=name,
        unicode_name_length=name_units,
        variable_data=data[name_end : name_end + data_size],
        variable_data_length=data_size,
        # upstream prints the GUID's bytes in order, not in registry (mixed-endian) format
        variable_name=f"{guid[:8]}-{guid[8:12]}-{guid[12:16]}-{guid[16:20]}-{guid[20:]}",
    )


def _image_load(data: bytes) -> EventDetails:
    """UEFI_IMAGE_LOAD_EVENT: the device path of the loaded image, without its end node."""
    if len(data) < _IMAGE_LOAD_HEADER:
        raise EvidenceError(f"an image load event needs 32 bytes, found {len(data)}")
    (path_size,) = struct.unpack_from("<Q", data, _IMAGE_LOAD_HEADER - 8)
    if path_size == 0:
        return EventDetails()
    path_end = _IMAGE_LOAD_HEADER + path_size - _END_NODE_SIZE
    if path_size < 2 * _END_NODE_SIZE or path_end > len(data):
        raise EvidenceError(f"a device path of {path_size} bytes does not fit the event")
    paths = render_device_path(data[_IMAGE_LOAD_HEADER:path_end])
    return EventDetails(device_paths=tuple(paths))


def _event_tag(data: bytes) -> EventDetails:
    """TCG_PCClientTaggedEvent: tag id, size, tagged data."""
    if len(data) < 8:
        raise EvidenceError(f"a tagged event needs at least 8 bytes, found {len(data)}")
    event_id, size = struct.unpack_from("<II", data)
    if 8 + size > len(data):
        raise EvidenceError(f"tagged data of {size} bytes runs past the event")
    tagged = data[8 : 8 + size]
    text = tagged.decode("utf-8", "replace").replace("\x00", "")
    if event_id != AAEL_EVENT_ID:
        return EventDetails(string=text)
    entry = aael_entry(_utf8(tagged, "an AAEL event"))
    return EventDetails(string=text, unicode_name="AAEL", data=entry)


def aael_entry(text: str) -> AaelEntry:
    """Split ``<domain> <operation> <content>`` at its first two spaces."""
    parts = text.split(" ", 2)
    if len(parts) < 3:
        raise EvidenceError("an AAEL event needs a domain, an operation and content")
    domain, operation, content = parts
    return AaelEntry(domain=domain, operation=operation, content=_json_or_text(content))


def _json_or_text(text: str) -> JsonValue:
    """The content as JSON where upstream's JSON reader accepts it, else the text itself."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        if _serde_compatible(value):
            return _serde_numbers(value)
    except (ValueError, RecursionError, OverflowError):
        pass
    return text


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _serde_compatible(value: JsonValue, depth: int = 1) -> bool:
    """No deeper than serde_json reads, and no lone surrogates (which serde_json refuses)."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if not isinstance(value, dict | list):
        return True
    if depth >= _JSON_MAX_DEPTH:
        return False
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    return all(_serde_compatible(item, depth + 1) for item in items)


def _serde_numbers(value: JsonValue) -> JsonValue:
    """Integers beyond 64 bits become floats, as serde_json reads them (or cannot)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_serde_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _serde_numbers(item) for key, item in value.items()}
    return value


_DECODERS: dict[int, Callable[[bytes], EventDetails]] = {
    0x1: _plain_string,  # EV_POST_CODE
    0x5: _plain_string,  # EV_ACTION
    EV_EVENT_TAG: _event_tag,
    0xA: _platform_config_flags,
    0xC: _plain_string,  # EV_COMPACT_HASH
    0xD: _ipl,
    0x12: _plain_string,  # EV_OMIT_BOOT_DEVICE_EVENTS
    0x80000001: _efi_variable,  # EV_EFI_VARIABLE_DRIVER_CONFIG
    0x80000002: _efi_variable,  # EV_EFI_VARIABLE_BOOT
    0x80000003: _image_load,  # EV_EFI_BOOT_SERVICES_APPLICATION
    0x80000007: _plain_string,  # EV_EFI_ACTION
    0x8000000A: _counted_string,  # EV_EFI_PLATFORM_FIRMWARE_BLOB2
    0x8000000B: _counted_string,  # EV_EFI_HANDOFF_TABLES2
    0x8000000C: _efi_variable,  # EV_EFI_VARIABLE_BOOT2
    0x800000E0: _efi_variable,  # EV_EFI_VARIABLE_AUTHORITY
}


def event_details(event_type: int, unverified_data: bytes) -> EventDetails:
    """The details of one event's data; types upstream does not decode have none."""
    return _DECODERS.get(event_type, _blank)(unverified_data)

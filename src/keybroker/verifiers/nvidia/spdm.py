"""NVIDIA GPU attestation reports: an SPDM 1.1 GET_MEASUREMENTS request and its signed response.

A report, as the GPU driver hands it to the attester, is the 37-byte request followed by the
response::

    request   version(0x11) code(0xE0) param1 param2 nonce[32] slot_id
    response  version(0x11) code(0x60) param1 param2 blocks(u8) record_length(u24 LE)
              measurement record  nonce[32]  opaque_length(u16 LE)  opaque data
              signature[96]  (ECDSA P-384 r||s over SHA-384 of everything before it)

The measurement record holds ``blocks`` DMTF measurement blocks (index, specification 1,
size u16, then type u8, value size u16, value); the opaque data is NVIDIA's list of
(type u16, size u16, value) items, decoded into upstream's ``config`` claims.

Pure parsing, strict and bounded: every length is checked against the bytes that remain, a
report must end after its signature (zero padding aside), an index or opaque type may appear
once, and unknown opaque types are refused (as upstream does). No signature is checked here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue

SPDM_VERSION = 0x11  # SPDM 1.1, the only version the GPUs speak (as upstream)
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
DMTF_SPECIFICATION = 1
NONCE_SIZE = 32
SIGNATURE_SIZE = 96  # P-384 r||s
REQUEST_SIZE = 4 + NONCE_SIZE + 1
# a Hopper report is about 4 KiB; a record or opaque field may not exceed its 24/16-bit length
MAX_REPORT_BYTES = 64 * 1024

_STRING_TYPES = {3, 11, 15, 16, 17, 18, 21, 35}
OPAQUE_NAMES = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "id_sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "measurement_count",
    13: "cpr_info",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
}
_FEATURES = {0: "SPT", 1: "MPT", 2: "PPCIE"}


@dataclass(frozen=True)
class SpdmReport:
    request_nonce: bytes
    response_nonce: bytes
    measurements: dict[int, bytes]  # block index -> DMTF measurement value
    opaque: dict[str, JsonValue]  # upstream's ``config`` claims
    signed: bytes  # request and response up to the signature
    signature: bytes  # r||s


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.offset, self.what = data, 0, what

    def take(self, size: int, field: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise EvidenceError(
                f"{self.what} is truncated: {field} needs {size} bytes at offset {self.offset}, "
                f"{len(self.data) - self.offset} remain"
            )
        chunk, self.offset = self.data[self.offset : end], end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "little")

    def done(self) -> bool:
        return self.offset == len(self.data)


def parse_report(report: bytes) -> SpdmReport:
    """The fields of an NVIDIA SPDM report; :class:`EvidenceError` for anything malformed."""
    if len(report) > MAX_REPORT_BYTES:
        raise EvidenceError(
            f"the NVIDIA report is {len(report)} bytes, at most {MAX_REPORT_BYTES} are accepted"
        )
    reader = _Reader(report, "the NVIDIA report")
    _header(reader, GET_MEASUREMENTS, "request")
    request_nonce = reader.take(NONCE_SIZE, "the request nonce")
    reader.u8("the request slot id")
    _header(reader, MEASUREMENTS, "response")
    blocks = reader.u8("the number of measurement blocks")
    record = reader.take(reader.uint(3, "the record length"), "the measurement record")
    measurements = _measurements(record, blocks)
    response_nonce = reader.take(NONCE_SIZE, "the response nonce")
    opaque = _opaque(reader.take(reader.uint(2, "the opaque length"), "the opaque data"))
    signed_size = reader.offset
    signature = reader.take(SIGNATURE_SIZE, "the signature")
    # Recorded reports from the CoCo CI carry one zero byte after the signature; upstream
    # ignores whatever follows. Zero padding is tolerated, anything else is refused.
    if any(report[reader.offset :]):
        raise EvidenceError(
            f"the NVIDIA report has {len(report) - reader.offset} non-padding bytes after its "
            "signature"
        )
    return SpdmReport(
        request_nonce, response_nonce, measurements, opaque, report[:signed_size], signature
    )


def _header(reader: _Reader, code: int, what: str) -> None:
    version = reader.u8(f"the {what} version")
    if version != SPDM_VERSION:
        raise EvidenceError(
            f"the NVIDIA report's {what} is SPDM version 0x{version:02x}, expected "
            f"0x{SPDM_VERSION:02x}"
        )
    found = reader.u8(f"the {what} code")
    if found != code:
        raise EvidenceError(
            f"the NVIDIA report's {what} code is 0x{found:02x}, expected 0x{code:02x}"
        )
    reader.take(2, f"the {what} parameters")


def _measurements(record: bytes, blocks: int) -> dict[int, bytes]:
    reader = _Reader(record, "the NVIDIA measurement record")
    out: dict[int, bytes] = {}
    for _ in range(blocks):
        index = reader.u8("a block index")
        if reader.u8("a block specification") != DMTF_SPECIFICATION:
            raise EvidenceError(f"NVIDIA measurement block {index} is not in the DMTF layout")
        block = _Reader(reader.take(reader.uint(2, "a block size"), "a block"), "a DMTF block")
        block.u8("the measurement type")
        value = block.take(block.uint(2, "the value size"), "the measurement value")
        if not block.done():
            raise EvidenceError(f"NVIDIA measurement block {index} has bytes after its value")
        if index in out:
            raise EvidenceError(f"NVIDIA measurement block {index} appears twice")
        out[index] = value
    if not reader.done():
        raise EvidenceError("the NVIDIA measurement record has bytes after its last block")
    return out


def _opaque(data: bytes) -> dict[str, JsonValue]:
    reader = _Reader(data, "the NVIDIA opaque data")
    out: dict[str, JsonValue] = {}
    while not reader.done():
        kind = reader.uint(2, "an opaque type")
        value = reader.take(reader.uint(2, "an opaque size"), "an opaque value")
        name = OPAQUE_NAMES.get(kind)
        if name is None:
            raise EvidenceError(f"the NVIDIA opaque data has an unknown type {kind}")
        if name in out:
            raise EvidenceError(f"the NVIDIA opaque data has {name} twice")
        out[name] = _opaque_value(kind, value)
    for required in ("vbios_version", "driver_version"):
        if required not in out:
            raise EvidenceError(f"the NVIDIA opaque data lacks {required}")
    return out


def _opaque_value(kind: int, value: bytes) -> JsonValue:
    if kind in _STRING_TYPES:
        return value.decode("utf-8", "replace").rstrip("\0")
    decode = _DECODERS.get(kind)
    return decode(value) if decode is not None else value.hex()


def _vbios_version(value: bytes) -> str:
    """Upstream's rendering: the first half of the bytes reversed, then the middle byte
    (``96.00.9f.00.01``)."""
    half = len(value) // 2
    if half >= len(value) or half == 0:
        raise EvidenceError("the NVIDIA vbios_version is malformed")
    return ".".join(f"{b:02x}" for b in reversed(value[:half])) + f".{value[half]:02x}"


def _chunks(value: bytes, size: int) -> list[bytes]:
    if len(value) % size:
        raise EvidenceError(f"an NVIDIA opaque value is not a multiple of {size} bytes")
    return [value[i : i + size] for i in range(0, len(value), size)]


def _small_integer(value: bytes) -> int:
    if len(value) > 8:
        raise EvidenceError("an NVIDIA opaque integer is longer than 8 bytes")
    return int.from_bytes(value, "little")


def _measurement_count(value: bytes) -> JsonValue:
    return {str(i + 1): int.from_bytes(c, "little") for i, c in enumerate(_chunks(value, 4))}


def _switch_pdis(value: bytes) -> JsonValue:
    return [chunk.hex() for chunk in _chunks(value, 8)]


def _feature_flag(value: bytes) -> JsonValue:
    return _FEATURES.get(_small_integer(value), "unknown")


_DECODERS: dict[int, Callable[[bytes], JsonValue]] = {
    6: _vbios_version,
    12: _measurement_count,
    22: _switch_pdis,
    34: _small_integer,
    36: _feature_flag,
}

"""The Hygon CSV attestation report: parsed once, by offset, into named fields; upstream's claims.

Upstream's evidence carries the report in a wrapper ``{magic[16], flags, data[4096]}``:
all-zero magic, or ``ATTESTATION_EXT\\0`` with flags 0, is a legacy (version 1) report; that
magic with flags 1 an extended (version 2) report. Version 3 (host data, flags 3) is newer than
upstream Trustee's verifier, which refuses it, and so do we.

Version 1 (0x150 bytes of TEE info): the firmware XORs every field with ``anonce`` (4 bytes,
repeated) and signs the first 180 bytes (up to the guest policy). ``anonce`` itself is outside
the signed bytes, so a decoded field is authentic only once something pins ``anonce``: the
report-data binding does (a 64-byte expected value determines all four bytes).
Version 2 (0x490 bytes): plain fields, with firmware build and RTMR0-4 (SM3); the first 1024
bytes are signed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.hygon.certs import Signature
from keybroker.verifiers.hygon.layout import U32, Bytes, Layout

REPORT_SIZE = 4096
EXT_MAGIC = b"ATTESTATION_EXT\0"
FLAGS_V1, FLAGS_V2 = 0, 1
WRAPPER: Layout = (("magic", Bytes(16)), ("flags", U32), ("data", Bytes(REPORT_SIZE)))
V1_SIGNED = 180
V2_SIGNED = 1024
RTMR_SIZE = 32
RTMR_COUNT = 5

POLICY_BITS = (  # name, first bit, width (upstream's GuestPolicy bitfield)
    ("nodbg", 0, 1),
    ("noks", 1, 1),
    ("es", 2, 1),
    ("nosend", 3, 1),
    ("domain", 4, 1),
    ("csv", 5, 1),
    ("csv3", 6, 1),
    ("asid_reuse", 7, 1),
    ("hsk_version", 8, 4),
    ("cek_version", 12, 4),
    ("api_major", 16, 8),
    ("api_minor", 24, 8),
)


def _unmask(data: bytes, anonce: int) -> bytes:
    mask = anonce.to_bytes(4, "little")
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@dataclass(frozen=True)
class CsvReport:
    """One report, fields decoded (a version 1 report's already XORed with its ``anonce``)."""

    version: int
    signed: bytes  # the bytes the PEK signed, as the firmware laid them out
    signature: Signature
    user_pubkey_digest: bytes
    vm_id: bytes
    vm_version: bytes
    report_data: bytes
    mnonce: bytes
    measure: bytes
    policy: int
    sig_usage: int
    sig_algo: int
    anonce: int = 0
    build: int = 0
    rtmr_version: int = 0
    reserved0: bytes = b""
    rtmrs: tuple[bytes, ...] = ()
    reserved1: bytes = b""

    def policy_claims(self) -> dict[str, JsonValue]:
        return {name: (self.policy >> bit) & ((1 << width) - 1) for name, bit, width in POLICY_BITS}

    @property
    def debug_allowed(self) -> bool:
        return self.policy & 1 == 0


def parse_report(magic: bytes, flags: int, data: bytes) -> CsvReport:
    """The report in a wrapper's ``data``; :class:`EvidenceError` if its kind is unknown."""
    if len(data) != REPORT_SIZE:
        raise EvidenceError(f"a CSV report is {REPORT_SIZE} bytes, this one {len(data)}")
    if magic == bytes(16) or (magic == EXT_MAGIC and flags == FLAGS_V1):
        return _parse_v1(data)
    if magic == EXT_MAGIC and flags == FLAGS_V2:
        return _parse_v2(data)
    raise EvidenceError(
        f"unsupported CSV report kind (magic {magic.hex()}, flags {flags}): expected a version 1 "
        "or 2 report"
    )


_COMMON = ((0, 32), (32, 48), (48, 64), (64, 128), (128, 144), (144, 176))


def _common(raw: bytes, anonce: int = 0) -> tuple[bytes, ...]:
    """user_pubkey_digest, vm_id, vm_version, report_data, mnonce, measure."""
    return tuple(_unmask(raw[start:end], anonce) for start, end in _COMMON)


def _parse_v1(data: bytes) -> CsvReport:
    policy, sig_usage, sig_algo, anonce = struct.unpack_from("<IIII", data, 176)
    digest, vm_id, vm_version, report_data, mnonce, measure = _common(data, anonce)
    return CsvReport(
        version=1,
        user_pubkey_digest=digest,
        vm_id=vm_id,
        vm_version=vm_version,
        report_data=report_data,
        mnonce=mnonce,
        measure=measure,
        signed=data[:V1_SIGNED],
        signature=Signature.from_bytes(data[192:336]),
        policy=policy ^ anonce,
        sig_usage=sig_usage ^ anonce,
        sig_algo=sig_algo ^ anonce,
        anonce=anonce,
    )


def _parse_v2(data: bytes) -> CsvReport:
    policy, sig_usage, sig_algo, build, rtmr_version = struct.unpack_from("<IIIIH", data, 176)
    digest, vm_id, vm_version, report_data, mnonce, measure = _common(data)
    rtmrs = tuple(data[208 + i * RTMR_SIZE : 208 + (i + 1) * RTMR_SIZE] for i in range(RTMR_COUNT))
    return CsvReport(
        version=2,
        user_pubkey_digest=digest,
        vm_id=vm_id,
        vm_version=vm_version,
        report_data=report_data,
        mnonce=mnonce,
        measure=measure,
        signed=data[:V2_SIGNED],
        signature=Signature.from_bytes(data[V2_SIGNED : V2_SIGNED + 144]),
        policy=policy,
        sig_usage=sig_usage,
        sig_algo=sig_algo,
        build=build,
        rtmr_version=rtmr_version,
        reserved0=data[194:208],
        rtmrs=rtmrs,
        reserved1=data[368:V2_SIGNED],
    )


def csv_claims(report: CsvReport, serial_number: str) -> dict[str, JsonValue]:
    """Upstream Trustee's ``csv`` claims, names and encodings as its verifier emits them."""
    claims: dict[str, JsonValue] = {
        "version": str(report.version),
        "policy": report.policy_claims(),
        "user_pubkey_digest": report.user_pubkey_digest.hex(),
        "vm_id": report.vm_id.hex(),
        "vm_version": report.vm_version.hex(),
        "report_data": report.report_data.hex(),
        "mnonce": report.mnonce.hex(),
        "measure": report.measure.hex(),
        "sig_usage": report.sig_usage.to_bytes(4, "little").hex(),
        "sig_algo": report.sig_algo.to_bytes(4, "little").hex(),
    }
    if report.version == 1:
        claims["anonce"] = report.anonce.to_bytes(4, "little").hex()
    else:
        claims["build"] = report.build
        claims["rtmr_version"] = report.rtmr_version
        claims["reserved0"] = report.reserved0.hex()
        for index, rtmr in enumerate(report.rtmrs):
            claims[f"rtmr{index}"] = rtmr.hex()
        claims["reserved1"] = report.reserved1.hex()
    claims["serial_number"] = serial_number
    return claims

"""Azure confidential VMs: the HCL report the paravisor (HCL) keeps in the vTPM's NV index.

Pure: bytes in, a frozen :class:`HclReport` out. The layout (little-endian), as Azure's
``az-cvm-vtpm`` crate reads it:

- offset 0, 32 bytes: header: signature ``HCLA``, version, report size, request type, status,
  12 reserved bytes;
- offset 32, 0x4A0 bytes: the hardware report: an SEV-SNP attestation report (0x4A0 bytes)
  or an Intel TDX TDREPORT (its first 1024 bytes);
- offset 0x4C0, 20 bytes: the IGVM request data: total size, version, report type (2 SNP,
  4 TDX), runtime-data hash type (1 SHA-256), runtime-data size;
- offset 0x4D4: the runtime data (Azure calls it variable data): JSON with the vTPM's keys as
  JWKs (``kid`` ``HCLAkPub`` is the attestation key), the VM configuration and ``user-data``
  (hex: the report data the guest asked the paravisor to include).

What ties it together is the runtime-data hash: the paravisor puts SHA-256 of the runtime-data
bytes in the first 32 bytes of the hardware report's REPORT_DATA, so once the hardware report's
signature is checked (by the SNP or TDX layer), the attestation key in the runtime data is
vouched for by the CPU. Nothing in an :class:`HclReport` is trusted before
:func:`check_runtime_data_binding` has compared that hash with a *verified* report's
REPORT_DATA.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker.errors import EvidenceError

HCL_SIGNATURE = b"HCLA"
HEADER_SIZE = 32
HW_REPORT_SIZE = 0x4A0  # room for the larger of the two reports (SNP's)
SNP_REPORT_SIZE = 0x4A0
TD_REPORT_SIZE = 1024
IGVM_REQUEST_OFFSET = HEADER_SIZE + HW_REPORT_SIZE
IGVM_REQUEST_SIZE = 20
RUNTIME_DATA_OFFSET = IGVM_REQUEST_OFFSET + IGVM_REQUEST_SIZE
HASH_TYPE_SHA256 = 1
AK_KEY_ID = "HCLAkPub"
MAX_HCL_REPORT_SIZE = 16 * 1024  # the vTPM's NV index holds 2600 bytes
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


class HclReportType(IntEnum):
    SNP = 2
    TDX = 4


@dataclass(frozen=True)
class RuntimeData:
    """The parsed runtime-data JSON: only the fields a verifier uses."""

    attestation_key: rsa.RSAPublicKey  # the vTPM's AK (JWK ``HCLAkPub``)
    user_data: bytes | None  # ``user-data``, hex-decoded


@dataclass(frozen=True)
class HclReport:
    """A parsed, *unverified* HCL report."""

    version: int
    report_type: HclReportType
    hw_report: bytes  # the SNP report (0x4A0 bytes) or the TDREPORT (1024 bytes)
    runtime_data_raw: bytes  # the exact bytes the hardware report's REPORT_DATA hashes
    runtime_data: RuntimeData

    def runtime_data_digest(self) -> bytes:
        return hashlib.sha256(self.runtime_data_raw).digest()


def parse_hcl_report(unverified: bytes, expected_type: HclReportType) -> HclReport:
    """Parse an HCL report that must wrap a hardware report of ``expected_type``."""
    if len(unverified) > MAX_HCL_REPORT_SIZE:
        raise EvidenceError(f"the HCL report is larger than {MAX_HCL_REPORT_SIZE} bytes")
    if len(unverified) < RUNTIME_DATA_OFFSET:
        raise EvidenceError(
            f"the HCL report is {len(unverified)} bytes, shorter than its fixed "
            f"{RUNTIME_DATA_OFFSET}-byte part"
        )
    if unverified[:4] != HCL_SIGNATURE:
        raise EvidenceError(f"the HCL report does not start with {HCL_SIGNATURE!r}")
    (version,) = struct.unpack_from("<I", unverified, 4)
    _size, _version, report_type, hash_type, runtime_size = struct.unpack_from(
        "<5I", unverified, IGVM_REQUEST_OFFSET
    )
    if report_type != expected_type:
        raise EvidenceError(
            f"the HCL report wraps a report of type {report_type}, expected "
            f"{expected_type.name} ({expected_type.value})"
        )
    if hash_type != HASH_TYPE_SHA256:
        raise EvidenceError(
            f"the HCL report's runtime data is hashed with type {hash_type}, expected "
            f"SHA-256 ({HASH_TYPE_SHA256})"
        )
    end = RUNTIME_DATA_OFFSET + runtime_size
    if end > len(unverified):
        raise EvidenceError(
            f"the HCL report's runtime data of {runtime_size} bytes runs past its end"
        )
    runtime_raw = unverified[RUNTIME_DATA_OFFSET:end]
    hw_size = SNP_REPORT_SIZE if report_type == HclReportType.SNP else TD_REPORT_SIZE
    return HclReport(
        version=version,
        report_type=HclReportType(report_type),
        hw_report=unverified[HEADER_SIZE : HEADER_SIZE + hw_size],
        runtime_data_raw=runtime_raw,
        runtime_data=parse_runtime_data(runtime_raw),
    )


def parse_runtime_data(unverified: bytes) -> RuntimeData:
    try:
        document = json.loads(unverified)
    except (UnicodeDecodeError, ValueError):
        raise EvidenceError("the HCL report's runtime data is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise EvidenceError("the HCL report's runtime data has no `keys` list")
    aks = [k for k in document["keys"] if isinstance(k, dict) and k.get("kid") == AK_KEY_ID]
    if len(aks) != 1:
        raise EvidenceError(
            f"the HCL report's runtime data holds {len(aks)} keys with kid {AK_KEY_ID}, not one"
        )
    user_data = document.get("user-data")
    if user_data is not None and not (isinstance(user_data, str) and _HEX.fullmatch(user_data)):
        raise EvidenceError("the HCL report's `user-data` is not a hex string")
    return RuntimeData(
        attestation_key=_rsa_jwk(aks[0]),
        user_data=bytes.fromhex(user_data) if user_data is not None else None,
    )


def _rsa_jwk(jwk: dict[str, object]) -> rsa.RSAPublicKey:
    """The RSA public key of a JWK (Azure's vTPM attestation key is RSA-2048)."""
    if jwk.get("kty") != "RSA":
        raise EvidenceError(f"the HCL attestation key is of type {jwk.get('kty')!r}, not RSA")
    n, e = (_b64url_int(jwk.get(name), name) for name in ("n", "e"))
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as error:
        raise EvidenceError(f"the HCL attestation key is not an RSA key: {error}") from None


def _b64url_int(value: object, name: str) -> int:
    if not isinstance(value, str) or not _B64URL.fullmatch(value) or not value:
        raise EvidenceError(f"the HCL attestation key's `{name}` is not base64url")
    try:
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")
    except binascii.Error:
        raise EvidenceError(f"the HCL attestation key's `{name}` is not base64url") from None


def check_runtime_data_binding(hcl: HclReport, verified_report_data: bytes, what: str) -> None:
    """Refuse unless SHA-256 of the runtime data is the first 32 bytes of ``what``'s
    REPORT_DATA: only then are the attestation key and user data the CPU's word."""
    if verified_report_data[:32] != hcl.runtime_data_digest():
        raise EvidenceError(
            f"the HCL report's runtime data does not hash to the {what}'s report_data: its "
            "attestation key is not vouched for by the hardware"
        )


def check_user_data(hcl: HclReport, expected: bytes) -> None:
    """Refuse unless the runtime data's ``user-data`` starts with ``expected`` (evidence
    version 2 onwards: the guest asked the paravisor to include the session's digest)."""
    user_data = hcl.runtime_data.user_data
    if user_data is None or not user_data.startswith(expected):
        raise EvidenceError(
            "the HCL report's user-data does not start with the digest of the session's "
            "runtime data"
        )

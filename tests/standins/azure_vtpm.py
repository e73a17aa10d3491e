"""A STAND-IN for an Azure confidential VM's paravisor (HCL) and vTPM, for tests: Azure's
formats, test keys.

Not Azure's keys. It writes what the paravisor writes (an ``HCLA`` report wrapping a hardware
report and JSON runtime data holding the vTPM's attestation key as the ``HCLAkPub`` JWK and the
guest's ``user-data``) and quotes as the vTPM quotes (a ``TPMS_ATTEST`` over the 24 SHA-256
PCRs, signed RSASSA-PKCS1-v1_5 / SHA-256 by the attestation key). The hardware report itself
comes from another stand-in (``amd_pki.build_report``) or from a recording.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keybroker.protocol.models import JsonValue
from keybroker.verifiers.azure.az_hcl import HW_REPORT_SIZE, HclReportType
from keybroker.verifiers.tpm.quote import TPM_ALG_SHA256, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def rsa_jwk(key: rsa.RSAPublicKey, kid: str) -> dict[str, object]:
    numbers = key.public_numbers()

    def encode(value: int) -> str:
        return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip("=")

    return {
        "kid": kid,
        "key_ops": ["sign"],
        "kty": "RSA",
        "e": encode(numbers.e),
        "n": encode(numbers.n),
    }


def attest_message(
    nonce: bytes,
    pcrs: list[bytes],
    *,
    pcr_digest: bytes | None = None,
    kind: int = TPM_ST_ATTEST_QUOTE,
) -> bytes:
    """A marshalled TPMS_ATTEST quoting ``pcrs`` (SHA-256 bank, PCRs 0..len-1)."""
    bitmap = sum(1 << i for i in range(len(pcrs))).to_bytes(3, "little")
    digest = pcr_digest if pcr_digest is not None else hashlib.sha256(b"".join(pcrs)).digest()
    return (
        struct.pack(">IH", TPM_GENERATED_VALUE, kind)
        + struct.pack(">H", 34) + struct.pack(">H", TPM_ALG_SHA256) + bytes(32)  # qualifiedSigner
        + struct.pack(">H", len(nonce)) + nonce
        + struct.pack(">QIIB", 123_456, 2, 0, 1)  # clockInfo
        + struct.pack(">Q", 0x2020031200120003)  # firmwareVersion
        + struct.pack(">IHB", 1, TPM_ALG_SHA256, 3) + bitmap
        + struct.pack(">H", len(digest)) + digest
    )  # fmt: skip


def hcl_report(
    hw_report: bytes, runtime_data: bytes, report_type: HclReportType = HclReportType.SNP
) -> bytes:
    """The paravisor's report: header, hardware report (zero-padded), IGVM request data,
    runtime data, zero-padded to the NV index's 2600 bytes as the vTPM returns it."""
    header = b"HCLA" + struct.pack("<7I", 2, 1236 + len(runtime_data), 2, 0, 0, 0, 0)
    request = struct.pack("<5I", 20 + len(runtime_data), 1, report_type, 1, len(runtime_data))
    body = header + hw_report.ljust(HW_REPORT_SIZE, b"\0") + request + runtime_data
    return body.ljust(2600, b"\0")


class AzureVtpm:
    """One VM's vTPM: its attestation key and its current PCR values."""

    def __init__(self) -> None:
        self.ak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pcrs = [hashlib.sha256(bytes([i])).digest() for i in range(24)]
        self.pcrs[8] = bytes(32)  # the init-data PCR, still at its reset value

    def extend(self, index: int, digest: bytes) -> None:
        self.pcrs[index] = hashlib.sha256(self.pcrs[index] + digest).digest()

    def runtime_data(
        self, user_data: bytes = bytes(64), *, ak: rsa.RSAPublicKey | None = None
    ) -> bytes:
        document = {
            "keys": [rsa_jwk(ak or self.ak.public_key(), "HCLAkPub")],
            "vm-configuration": {"secure-boot": True, "tpm-enabled": True},
            "user-data": user_data.hex().upper(),
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def quote(
        self, nonce: bytes, *, signer: rsa.RSAPrivateKey | None = None
    ) -> dict[str, JsonValue]:
        """The ``tpm_quote`` member of version 1 and 2 evidence (hex)."""
        message = attest_message(nonce, self.pcrs)
        signature = (signer or self.ak).sign(message, padding.PKCS1v15(), hashes.SHA256())
        return {
            "signature": signature.hex(),
            "message": message.hex(),
            "pcrs": [pcr.hex() for pcr in self.pcrs],
        }

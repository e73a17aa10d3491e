"""The Hygon DCU verifier (TEE ``hygondcu``): each accelerator's report, signed by its chip's
CEK, chained HSK → the HRK pinned in this package.

A DCU is a device of a CSV guest: its evidence arrives as ``additional_evidence`` under
``"hygondcu"``, bound to the same runtime data as the guest's. Evidence, as upstream's attester
sends it (``csv-rs`` serde JSON)::

    {"attestation_reports": [{"body": {"version", "chip_id": [16], "user_data": [64],
        "measure": [32], "reserved": [128], "sig_usage", "sig_algo"},
      "sig": {"r": [72], "s": [72]}}, ...]}

For every report, failing closed: its ``user_data`` is the runtime-data digest padded with zeros
to 64 bytes (required: a DCU report without a binding is refused, as upstream); the HSK and CEK
of its ``chip_id`` (fetched: the evidence does not carry them) chain to the pinned HRK; the CEK
signed the 252-byte body. Each report yields one set of upstream's claims, class ``dcu`` (EAR
submods ``dcu0``, ``dcu1``, ...).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.hygon.certs import (
    ECDSA_SIGNATURE,
    CaCertificate,
    Signature,
    Usage,
    pinned_hrk,
    split_hsk_cek,
    verify_chain,
    verify_signed_by,
)
from keybroker.verifiers.hygon.collateral import HskCekFetcher, chip_id_text
from keybroker.verifiers.hygon.csv import bind_report_data
from keybroker.verifiers.hygon.layout import U32, Bytes, Layout, encode

logger = logging.getLogger(__name__)

DCU_CLASS = "dcu"
MAX_REPORTS = 16
BODY: Layout = (
    ("version", U32),
    ("chip_id", Bytes(16)),
    ("user_data", Bytes(64)),
    ("measure", Bytes(32)),
    ("reserved", Bytes(128)),
    ("sig_usage", U32),
    ("sig_algo", U32),
)
REPORT: Layout = (("body", BODY), ("sig", ECDSA_SIGNATURE))
BODY_SIZE = 252


@dataclass(frozen=True)
class DcuReport:
    body: bytes  # the signed bytes
    version: int
    chip_id: bytes
    user_data: bytes
    measure: bytes
    reserved: bytes
    sig_usage: int
    sig_algo: int
    signature: Signature

    @classmethod
    def from_bytes(cls, raw: bytes) -> DcuReport:
        if len(raw) != BODY_SIZE + 144:
            raise EvidenceError(f"a DCU report is {BODY_SIZE + 144} bytes, this one {len(raw)}")
        (version,) = struct.unpack_from("<I", raw, 0)
        sig_usage, sig_algo = struct.unpack_from("<II", raw, 244)
        return cls(
            body=raw[:BODY_SIZE],
            version=version,
            chip_id=raw[4:20],
            user_data=raw[20:84],
            measure=raw[84:116],
            reserved=raw[116:244],
            sig_usage=sig_usage,
            sig_algo=sig_algo,
            signature=Signature.from_bytes(raw[BODY_SIZE:]),
        )

    def claims(self) -> dict[str, JsonValue]:
        """Upstream Trustee's ``hygondcu`` claims (``sig_usage``/``sig_algo`` as bare hex)."""
        return {
            "body": {
                "version": self.version,
                "chip_id": self.chip_id.hex(),
                "user_data": self.user_data.hex(),
                "measure": self.measure.hex(),
                "reserved": self.reserved.hex(),
                "sig_usage": f"{self.sig_usage:x}",
                "sig_algo": f"{self.sig_algo:x}",
            },
            "report_data": self.user_data.hex(),
        }


def parse_reports(unverified: JsonValue) -> list[DcuReport]:
    if not isinstance(unverified, dict) or not isinstance(
        unverified.get("attestation_reports"), list
    ):
        raise EvidenceError("hygondcu evidence must be an object with `attestation_reports`")
    items = unverified["attestation_reports"]
    if not 1 <= len(items) <= MAX_REPORTS:
        raise EvidenceError(f"hygondcu evidence must carry 1 to {MAX_REPORTS} reports")
    return [
        DcuReport.from_bytes(encode(REPORT, item, f"hygondcu report {i}"))
        for i, item in enumerate(items)
    ]


class HygonDcuVerifier(Verifier):
    tee = Tee.HYGON_DCU
    may_block = True  # SM2 in pure Python, and KDS fetches

    def __init__(self, fetcher: HskCekFetcher, *, hrk: CaCertificate | None = None) -> None:
        """``hrk``: the trust anchor; the pinned Hygon root unless a test gives its own."""
        self._fetcher = fetcher
        self._hrk = hrk if hrk is not None else pinned_hrk()

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        reports = parse_reports(unverified_evidence)
        if expected_report_data is None:
            raise EvidenceError("hygondcu evidence must be bound to report data; none was given")
        for report in reports:  # cheap checks first: no fetch for a report of another session
            bind_report_data(report.user_data, expected_report_data, "DCU report's user data as")
        if expected_init_data is not None:
            logger.warning("hygondcu evidence cannot bind init-data (no such field): not checked")
        for report in reports:
            chip = chip_id_text(report.chip_id, "DCU chip id")
            hsk, cek = split_hsk_cek(self._fetcher.hsk_cek(chip))
            verify_chain(self._hrk, hsk, cek, None)
            verify_signed_by(cek, Usage.CEK, report.body, report.signature, "DCU report")
        return [TeeClaims(Tee.HYGON_DCU, DCU_CLASS, report.claims()) for report in reports]

"""The ``sampledevice`` TEE: a software stand-in for an attached device (class ``gpu``).

Evidence ``{"svn": "<string>", "report_data": "<standard base64>"}``; the report data must equal
the digest of the runtime data *without* the additional evidence (the device's evidence is part
of it). No hardware root of trust.
"""

from __future__ import annotations

import base64
import binascii

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier


class SampleDeviceVerifier(Verifier):
    tee = Tee.SAMPLE_DEVICE

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        if not isinstance(unverified_evidence, dict):
            raise EvidenceError("sampledevice evidence must be a JSON object")
        svn, report_data = (
            unverified_evidence.get("svn"),
            unverified_evidence.get("report_data", ""),
        )
        if not isinstance(svn, str) or not isinstance(report_data, str):
            raise EvidenceError("sampledevice evidence needs string fields `svn`, `report_data`")
        if expected_report_data is not None:
            try:
                reported = base64.b64decode(report_data, validate=True)
            except binascii.Error:
                raise EvidenceError("sampledevice `report_data` is not base64") from None
            if reported != expected_report_data:
                raise EvidenceError("sampledevice report_data does not match the runtime data")
        claims: dict[str, JsonValue] = {"svn": svn, "report_data": report_data}
        return [TeeClaims(tee=self.tee, tee_class="gpu", claims=claims)]

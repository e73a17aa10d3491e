"""The ``sampledevice`` TEE: a software stand-in for an attached device (class ``gpu``).

Evidence ``{"svn": "<string>", "report_data": "<standard base64>"}``; the report data must equal
the digest of the runtime data *without* the additional evidence (the device's evidence is part
of it). No hardware root of trust.
"""

from __future__ import annotations

from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.sample import check_sample_evidence


class SampleDeviceVerifier(Verifier):
    tee = Tee.SAMPLE_DEVICE

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        svn, report_data = check_sample_evidence(
            unverified_evidence, expected_report_data, self.tee
        )
        claims: dict[str, JsonValue] = {"svn": svn, "report_data": report_data}
        return [TeeClaims(tee=self.tee, tee_class="gpu", claims=claims)]

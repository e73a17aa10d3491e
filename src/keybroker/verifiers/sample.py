"""The ``sample`` TEE: a software stand-in with no hardware root of trust.

Evidence is ``{"svn": "<string>", "report_data": "<standard base64>"}``. The only check is the
binding: ``report_data`` must equal the expected runtime-data digest exactly. Nothing proves the
evidence came from a TEE, which is why the default resource policy never releases to it.
"""

from __future__ import annotations

import base64
import binascii

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier


def check_sample_evidence(
    unverified_evidence: JsonValue, expected_report_data: bytes | None, tee: Tee
) -> tuple[str, str]:
    """``(svn, report_data)`` of software stand-in evidence whose report data is bound."""
    if not isinstance(unverified_evidence, dict):
        raise EvidenceError(f"{tee.value} evidence must be a JSON object")
    svn = unverified_evidence.get("svn")
    report_data = unverified_evidence.get("report_data", "")
    if not isinstance(svn, str) or not isinstance(report_data, str):
        raise EvidenceError(f"{tee.value} evidence needs string fields `svn` and `report_data`")
    if expected_report_data is not None:
        try:
            reported = base64.b64decode(report_data, validate=True)
        except binascii.Error:
            raise EvidenceError(f"{tee.value} evidence `report_data` is not base64") from None
        if reported != expected_report_data:
            raise EvidenceError(
                f"{tee.value} evidence report_data does not match the digest of the session's "
                "runtime data (nonce, tee-pubkey, additional evidence)"
            )
    return svn, report_data


class SampleVerifier(Verifier):
    tee = Tee.SAMPLE

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
        claims: dict[str, JsonValue] = {
            "svn": svn,
            "report_data": report_data,
            "launch_digest": "abcde",
            "platform_version": {"major": 1, "minor": 4},
            "debug": False,
        }
        if expected_init_data is not None:
            # No hardware field carries it: reported as a claim so policies can use it.
            claims["init_data"] = base64.b64encode(expected_init_data).decode()
        return [TeeClaims(tee=self.tee, tee_class="cpu", claims=claims)]

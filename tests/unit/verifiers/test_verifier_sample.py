"""The sample verifier: binding checks and claims, failures as EvidenceError."""

from __future__ import annotations

import base64

import pytest

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.base import MAX_EVIDENCE_BYTES
from keybroker.verifiers.sample import SampleVerifier

DIGEST = bytes(range(48))


def _evidence(report_data: bytes = DIGEST) -> dict[str, str]:
    return {"svn": "1", "report_data": base64.b64encode(report_data).decode()}


def test_bound_evidence_gives_upstream_claims() -> None:
    [claims] = SampleVerifier().verify(
        _evidence(), expected_report_data=DIGEST, expected_init_data=None
    )
    assert claims.tee_class == "cpu"
    assert claims.claims == {
        "svn": "1",
        "report_data": base64.b64encode(DIGEST).decode(),
        "launch_digest": "abcde",
        "platform_version": {"major": 1, "minor": 4},
        "debug": False,
    }


def test_init_data_reported_as_claim() -> None:
    [claims] = SampleVerifier().verify(
        _evidence(), expected_report_data=DIGEST, expected_init_data=b"\x01" * 32
    )
    assert claims.claims["init_data"] == base64.b64encode(b"\x01" * 32).decode()


@pytest.mark.parametrize(
    "evidence",
    [
        _evidence(b"\x00" * 48),
        _evidence(DIGEST[:32]),
        {"svn": "1", "report_data": "not base64!"},
        {"svn": 1, "report_data": ""},
        ["not", "an", "object"],
        {"svn": "1", "report_data": "A" * (MAX_EVIDENCE_BYTES + 1)},
    ],
    ids=["mismatch", "truncated", "bad-base64", "svn-not-string", "array", "oversized"],
)
def test_report_data_mismatch_and_malformed_rejected(evidence: JsonValue) -> None:
    with pytest.raises(EvidenceError):
        SampleVerifier().verify(evidence, expected_report_data=DIGEST, expected_init_data=None)

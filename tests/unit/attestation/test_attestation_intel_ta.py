"""The ITA client's pure parts: the attest request body it builds from the guest's evidence
(upstream's fields and encodings) and its checks on the token claims."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from conftest import vector
from json_shapes import at
from keybroker.attestation.intel_ta import (
    AZURE_SUFFIX,
    attest_request,
    check_policies,
    check_runtime_data,
)
from keybroker.attestation.service import EvidenceToVerify
from keybroker.client.keys import TeeKey
from keybroker.errors import AttestationError, EvidenceError
from keybroker.protocol.canonical import HashAlgorithm, jcs, runtime_data
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.azure.az_hcl import HclReportType, parse_hcl_report
from keybroker.verifiers.azure.az_tdx_vtpm import parse_evidence

NONCE = base64.b64encode(b"\7" * 32).decode()
KEY = TeeKey.generate().public_jwk()
QUOTE = base64.b64encode(b"quote bytes").decode()


def _item(tee: Tee, evidence: JsonValue, *, additional: str | None = "") -> EvidenceToVerify:
    return EvidenceToVerify(
        tee=tee,
        unverified_evidence=evidence,
        runtime_data=runtime_data(NONCE, KEY, additional),
        hash_algorithm=HashAlgorithm.SHA512,
    )


def test_tdx_request_has_upstreams_fields_and_encodings() -> None:
    item = _item(Tee.TDX, {"quote": QUOTE, "cc_eventlog": "ZXZlbnRz", "aa_eventlog": "x"})
    body, suffix = attest_request([item], ["p1"], True)
    assert suffix == ""
    assert body == {
        "policy_ids": ["p1"],
        "policy_must_match": True,
        "tdx": {
            "quote": QUOTE,
            # the exact bytes the guest hashed into the report data: JCS of the runtime data
            "runtime_data": base64.b64encode(jcs(item.runtime_data or {})).decode(),
            "event_log": "ZXZlbnRz",  # the guest's cc_eventlog, under ITA's name
        },
    }


def test_sgx_request_keeps_user_data() -> None:
    body, _ = attest_request([_item(Tee.SGX, {"quote": QUOTE, "user_data": "dXNlcg=="})], [], False)
    assert set(body) == {"policy_ids", "policy_must_match", "sgx"}
    assert at(body, "sgx", "user_data") == "dXNlcg=="


def test_gpu_evidence_is_composed_as_nvgpu() -> None:
    devices = [
        {"arch": "HOPPER", "evidence": "ZXY=", "certificate": "Y2VydA==", "uuid": "x"},
        {"arch": "LS10", "evidence": "c3c=", "certificate": "Y2VydA=="},  # an NVSwitch: dropped
    ]
    device_item = _item(Tee.NVIDIA, {"device_evidence_list": devices}, additional=None)
    body, _ = attest_request([_item(Tee.TDX, {"quote": QUOTE}), device_item], [], False)
    runtime = jcs(device_item.runtime_data or {})
    assert body["nvgpu"] == {
        "gpu_nonce": hashlib.sha512(runtime).digest()[:32].hex(),
        "arch": "HOPPER",
        "evidence_list": [{"evidence": "ZXY=", "certificate": "Y2VydA=="}],
    }


def test_gpu_evidence_without_an_appraisable_gpu_is_dropped() -> None:
    devices = [{"arch": "LS10", "evidence": "c3c=", "certificate": "Y2VydA=="}]
    body, _ = attest_request(
        [_item(Tee.TDX, {"quote": QUOTE}), _item(Tee.NVIDIA, {"device_evidence_list": devices})],
        [],
        False,
    )
    assert "nvgpu" not in body


def test_azure_td_goes_to_the_azure_endpoint_with_hcl_runtime_data() -> None:
    evidence = json.loads(vector("verifier", "az-tdx-vtpm", "evidence-v1.json").read_text())
    item = _item(Tee.AZ_TDX_VTPM, evidence)
    body, suffix = attest_request([item], [], False)
    assert suffix == AZURE_SUFFIX
    parsed = parse_evidence(evidence)
    hcl = parse_hcl_report(parsed.hcl_report, HclReportType.TDX)
    assert body["tdx"] == {
        "quote": base64.b64encode(parsed.td_quote).decode(),
        "runtime_data": base64.b64encode(hcl.runtime_data_raw).decode(),
        "user_data": base64.b64encode(jcs(item.runtime_data or {})).decode(),
    }


@pytest.mark.parametrize(
    ("tee", "evidence", "message"),
    [
        (Tee.SNP, {"quote": QUOTE}, "does not appraise snp evidence"),
        (Tee.TDX, {"cc_eventlog": "x"}, "has no quote"),
        (Tee.TDX, ["not", "an", "object"], "must be a JSON object"),
        (Tee.SGX, {"quote": 7}, "must be a string"),
    ],
)
def test_evidence_ita_cannot_take_is_refused(tee: Tee, evidence: JsonValue, message: str) -> None:
    with pytest.raises((AttestationError, EvidenceError), match=message):
        attest_request([_item(tee, evidence)], [], False)


def _claims(section: str, member: str, echoed: dict[str, Any]) -> dict[str, JsonValue]:
    return {section: {member: echoed}}


def test_runtime_data_binding_for_each_tee() -> None:
    for tee, section, member in (
        (Tee.TDX, "tdx", "attester_runtime_data"),
        (Tee.SGX, "sgx", "attester_runtime_data"),
        (Tee.AZ_TDX_VTPM, "tdx", "attester_user_data"),
    ):
        item = _item(tee, {})
        echoed = dict(item.runtime_data or {})
        check_runtime_data(_claims(section, member, echoed), item)
        with pytest.raises(AttestationError, match=f"no {section}.{member}"):
            check_runtime_data(_claims("other", member, echoed), item)


def test_runtime_data_with_other_additional_evidence_is_refused() -> None:
    item = _item(Tee.TDX, {})
    echoed = {**(item.runtime_data or {}), "additional-evidence": '{"nvidia":{}}'}
    with pytest.raises(AttestationError, match="not what this session sent"):
        check_runtime_data(_claims("tdx", "attester_runtime_data", echoed), item)


def test_unmatched_policies_anywhere_are_refused_unless_allowed() -> None:
    top = {"policy_ids_unmatched": [{"id": "p1", "version": "v1"}]}
    nested = {"tdx": {"policy_ids_unmatched": ["p2"]}}
    for claims in (top, nested):
        with pytest.raises(AttestationError, match="did not match"):
            check_policies(claims, allow_unmatched=False)
        check_policies(claims, allow_unmatched=True)
    check_policies({"policy_ids_unmatched": None, "policy_ids_matched": []}, allow_unmatched=False)
    with pytest.raises(AttestationError, match="not a list"):
        check_policies({"policy_ids_unmatched": "p1"}, allow_unmatched=True)

"""The az-tdx-vtpm verifier: both recorded Azure TDX vectors verified, upstream's claims, and
one named test per attack.

The TD quotes are really verified: their PCK chain to the pinned Intel root at an injected
time, the QE report and the quote signature. Their collateral (TCB Info, QE Identity, CRLs
with their signing chains) is not in the vectors, so the collateral step is a fixed
:class:`TcbAppraiser` double reporting an up-to-date platform (the collateral layer has its own
tests in test_verifier_dcap_collateral.py).
"""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.azure.az_hcl import (
    HclReportType,
    check_runtime_data_binding,
    parse_hcl_report,
)
from keybroker.verifiers.azure.az_tdx_vtpm import AzTdxVtpmVerifier
from keybroker.verifiers.intel.dcap import Quote, TdReportBody, parse_quote, verify_quote

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)  # the PCK certificate is valid
CHALLENGE = b"challenge"  # the nonce both recordings are bound to
PCR0 = "782b20b10f55cc46e2142cc2145d548698073e5beb82752c8d7f9279f0d8a273"  # upstream's test value


class FixedAppraisal:
    """A TcbAppraiser double that reports an up-to-date platform; it records each call, to
    show the verifier consulted it (and only after every other check passed)."""

    def __init__(self, refusal: str | None = None) -> None:
        self.asked: list[datetime.datetime] = []
        self.refusal = refusal

    def appraise(
        self, quote: Quote, pck: x509.Certificate, now: datetime.datetime
    ) -> dict[str, JsonValue]:
        self.asked.append(now)
        if self.refusal is not None:
            raise EvidenceError(self.refusal)
        return {"tcb_status": "UpToDate", "collateral_expiration_status": "0"}


def _folder() -> Path:
    return vector("verifier", "az-tdx-vtpm")


def _recording(name: str) -> dict[str, Any]:
    document = json.loads((_folder() / name).read_text())
    assert isinstance(document, dict)
    return document


def _verify(
    evidence: JsonValue,
    report_data: bytes | None = CHALLENGE,
    init_data: bytes | None = None,
    appraisal: FixedAppraisal | None = None,
    now: datetime.datetime = NOW,
) -> dict[str, JsonValue]:
    verifier = AzTdxVtpmVerifier(appraisal or FixedAppraisal(), clock=now.timestamp)
    [result] = verifier.verify(
        evidence, expected_report_data=report_data, expected_init_data=init_data
    )
    assert (result.tee, result.tee_class) == (Tee.AZ_TDX_VTPM, "cpu")
    return result.claims


@pytest.mark.parametrize("name", ["evidence-v0.json", "evidence-v1.json"])
def test_recorded_evidence_verifies(name: str) -> None:
    appraisal = FixedAppraisal()
    claims = _verify(_recording(name), appraisal=appraisal)
    assert claims["report_data"] == CHALLENGE.hex()  # the vTPM nonce, not the TD quote's
    tpm = claims["tpm"]
    assert isinstance(tpm, dict) and tpm["pcr00"] == PCR0
    assert claims["tcb_status"] == "UpToDate"
    assert appraisal.asked == [NOW]


def test_claims_have_upstreams_names_and_encodings() -> None:
    claims = _verify(_recording("evidence-v1.json"))
    quote = claims["quote"]
    assert isinstance(quote, dict)
    header, body = quote["header"], quote["body"]
    # what upstream's default policy reads for az-tdx-vtpm
    assert header["tee_type"] == "81000000"
    assert header["vendor_id"] == "939a7233f79c4ca9940a0db3957f0607"
    assert body["mr_td"].startswith("024a32b070383331")
    assert body["xfam"] == "e718060000000000"
    # the TD quote's report_data stays in the quote; the top-level one is the vTPM nonce
    assert body["report_data"].startswith("9734504f161d104c")
    tpm = claims["tpm"]
    assert isinstance(tpm, dict) and sorted(tpm) == [f"pcr{i:02}" for i in range(24)]
    assert claims["init_data"] == tpm["pcr08"]  # PCR 8, not mr_config_id
    assert claims["td_attributes"] == {
        "debug": False,
        "key_locker": False,
        "perfmon": False,
        "protection_keys": False,
        "septve_disable": False,
    }
    assert claims["platform_instance_id"] == "ffa7dfed7d49193bcdcc6868ffdca52c"


def test_v0_and_v1_encodings_of_one_evidence_give_the_same_claims() -> None:
    assert _verify(_recording("evidence-v0.json")) == _verify(_recording("evidence-v1.json"))


def test_recorded_hcl_report_binds_to_the_recorded_td_quote() -> None:
    hcl = parse_hcl_report((_folder() / "hcl-report.bin").read_bytes(), HclReportType.TDX)
    quote = parse_quote((_folder() / "td-quote.bin").read_bytes())
    verify_quote(quote, NOW)
    assert isinstance(quote.body, TdReportBody)
    check_runtime_data_binding(hcl, quote.body.report_data, "TD quote")
    assert len(hcl.hw_report) == 1024  # the TDREPORT


def test_evidence_carries_the_recorded_files() -> None:
    evidence = _recording("evidence-v1.json")
    assert (
        base64.urlsafe_b64decode(evidence["td_quote"]) == (_folder() / "td-quote.bin").read_bytes()
    )
    assert (
        base64.urlsafe_b64decode(evidence["hcl_report"])
        == (_folder() / "hcl-report.bin").read_bytes()
    )


# --- attacks -----------------------------------------------------------------------------------


def test_tpm_quote_with_wrong_nonce_is_refused() -> None:
    appraisal = FixedAppraisal()
    with pytest.raises(EvidenceError, match=r"nonce \(extraData\) does not match"):
        _verify(_recording("evidence-v1.json"), b"CHALLENGE", appraisal=appraisal)
    assert appraisal.asked == []  # no collateral is fetched for evidence of another session


def test_tampered_pcr_value_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    pcr = bytearray.fromhex(evidence["tpm_quote"]["pcrs"][4])
    pcr[31] ^= 1
    evidence["tpm_quote"]["pcrs"][4] = pcr.hex()
    with pytest.raises(EvidenceError, match="PCR values do not hash"):
        _verify(evidence)


def test_flipped_bit_in_tpm_quote_signature_is_refused() -> None:
    evidence = _recording("evidence-v0.json")
    evidence["tpm_quote"]["signature"][100] ^= 1
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(evidence)


def test_tpm_quote_signed_by_an_ak_not_in_the_hcl_runtime_data_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    other = json.loads(vector("verifier", "az-snp-vtpm", "evidence-v1.json").read_text())
    evidence["tpm_quote"] = other["tpm_quote"]  # another VM's quote, same nonce
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(evidence)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


def test_hcl_runtime_data_that_does_not_hash_to_the_td_quote_is_refused() -> None:
    evidence = _recording("evidence-v0.json")
    raw = bytes(evidence["hcl_report"])
    at = raw.index(b'"vmUniqueId":"') + 15
    evidence["hcl_report"] = list(_flip(raw, at))
    with pytest.raises(EvidenceError, match="runtime data does not hash to the TD quote"):
        _verify(evidence)


def test_flipped_bit_in_the_td_quote_is_refused() -> None:
    evidence = _recording("evidence-v0.json")
    evidence["td_quote"] = list(_flip(bytes(evidence["td_quote"]), 48 + 136))  # MRTD
    with pytest.raises(EvidenceError, match="quote signature does not verify"):
        _verify(evidence)


def test_td_quote_verified_after_its_pck_expired_is_refused() -> None:
    later = datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(EvidenceError, match="not valid at"):
        _verify(_recording("evidence-v1.json"), now=later)


def test_sgx_quote_in_place_of_the_td_quote_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    sgx = vector("verifier", "occlum_quote.dat").read_bytes()
    evidence["td_quote"] = base64.urlsafe_b64encode(sgx).decode()
    with pytest.raises(EvidenceError, match="SGX quote"):
        _verify(evidence)


def test_hcl_report_of_an_snp_vm_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    other = json.loads(vector("verifier", "az-snp-vtpm", "evidence-v1.json").read_text())
    evidence["hcl_report"] = other["hcl_report"]
    with pytest.raises(EvidenceError, match="type 2, expected TDX"):
        _verify(evidence)


def test_unknown_evidence_version_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    evidence["version"] = 7
    with pytest.raises(EvidenceError, match="version 7 is not supported"):
        _verify(evidence)


def test_malformed_base64_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    evidence["td_quote"] = evidence["td_quote"][:-4] + "AA*="
    with pytest.raises(EvidenceError, match="not URL-safe base64"):
        _verify(evidence)


def test_version_2_requires_the_report_data_in_the_hcl_user_data() -> None:
    evidence = _recording("evidence-v1.json")
    evidence["version"] = 2
    with pytest.raises(EvidenceError, match="user-data does not start with"):
        _verify(evidence)


def test_evidence_without_runtime_data_is_refused() -> None:
    with pytest.raises(EvidenceError, match="without runtime data"):
        _verify(_recording("evidence-v1.json"), None)


def test_init_data_not_in_pcr8_is_refused() -> None:
    with pytest.raises(EvidenceError, match="PCR 8 does not match the init-data digest"):
        _verify(_recording("evidence-v1.json"), init_data=bytes(32))


def test_init_data_digest_other_than_sha256_is_refused() -> None:
    with pytest.raises(EvidenceError, match="binds a 32-byte"):
        _verify(_recording("evidence-v1.json"), init_data=bytes(64))


def test_collateral_refusal_is_the_verifiers_refusal() -> None:
    appraisal = FixedAppraisal(refusal="the platform's TCB is Revoked")
    with pytest.raises(EvidenceError, match="Revoked"):
        _verify(_recording("evidence-v1.json"), appraisal=appraisal)


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        (None, "must be a JSON object"),
        ({"version": 1}, "has no `tpm_quote`"),
        ({"tpm_quote": {}, "hcl_report": [], "td_quote": []}, "has no `pcrs`"),
        ({**dict.fromkeys(("tpm_quote", "hcl_report", "td_quote"), "")}, "must be an object"),
    ],
    ids=["null", "v1-empty", "v0-empty-quote", "v0-strings"],
)
def test_malformed_evidence_is_refused(evidence: JsonValue, match: str) -> None:
    with pytest.raises(EvidenceError, match=match):
        _verify(evidence)

"""The default CPU attestation policy's TDX and SGX rules, on claims of the recorded quotes."""

from __future__ import annotations

import base64
import copy
import datetime
import json
from typing import Any

import pytest
from default_policy import appraise

from conftest import vector
from keybroker.attestation.ear import status_of
from keybroker.verifiers.intel.dcap import parse_quote, verify_quote
from keybroker.verifiers.intel.sgx_claims import sgx_claims
from keybroker.verifiers.intel.tdx_claims import tdx_claims

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
UP_TO_DATE = {"tcb_status": "UpToDate", "collateral_expiration_status": "0"}


def _tdx() -> dict[str, Any]:
    quote = parse_quote(vector("verifier", "tdx_quote_4.dat").read_bytes())
    return {**tdx_claims(quote, verify_quote(quote, NOW)), **UP_TO_DATE}


def _tdx_references(claims: dict[str, Any]) -> dict[str, list[str]]:
    body = claims["quote"]["body"]
    return {name: [body[name]] for name in ("mr_td", "rtmr_1", "rtmr_2", "xfam")}


def test_debug_td_is_contraindicated_even_with_every_reference_matching() -> None:
    claims = _tdx()
    assert claims["td_attributes"]["debug"] is True
    vector = appraise({"tdx": claims}, _tdx_references(claims))
    assert vector["configuration"] == 96
    assert status_of(vector) == "contraindicated"


def test_production_td_with_matching_references_is_affirming() -> None:
    claims = _tdx()
    claims["td_attributes"] = {**claims["td_attributes"], "debug": False}
    vector = appraise({"tdx": claims}, _tdx_references(claims))
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


@pytest.mark.parametrize(
    ("change", "claim", "value"),
    [
        ({"tcb_status": "OutOfDate"}, "hardware", 97),
        ({"collateral_expiration_status": "1"}, "hardware", 97),
    ],
    ids=["tcb-out-of-date", "collateral-expired"],
)
def test_tdx_platform_not_current_is_not_trusted(
    change: dict[str, str], claim: str, value: int
) -> None:
    claims = _tdx()
    claims["td_attributes"] = {**claims["td_attributes"], "debug": False}
    claims.update(change)
    vector = appraise({"tdx": claims}, _tdx_references(claims))
    assert vector[claim] == value
    assert status_of(vector) == "contraindicated"


def test_tdx_unknown_kernel_is_not_affirmed() -> None:
    claims = _tdx()
    claims["td_attributes"] = {**claims["td_attributes"], "debug": False}
    references = _tdx_references(claims)
    references["rtmr_1"] = ["00" * 48]
    vector = appraise({"tdx": claims}, references)
    assert vector["executables"] == 33


def _sgx() -> dict[str, Any]:
    request = json.loads(vector("attestation-service", "coco-as-request.json").read_text())
    evidence = json.loads(base64.b64decode(request["verification_requests"][0]["evidence"] + "=="))
    quote = parse_quote(base64.b64decode(evidence["quote"]))
    return {**sgx_claims(quote, verify_quote(quote, NOW)), **UP_TO_DATE}


def test_debug_enclave_is_contraindicated() -> None:
    claims = _sgx()  # attributes.flags 07: INIT | DEBUG | MODE64BIT
    body = claims["body"]
    references = {"mr_enclave": [body["mr_enclave"]], "mr_signer": [body["mr_signer"]]}
    vector = appraise({"sgx": claims}, references)
    assert vector["configuration"] == 96 and status_of(vector) == "contraindicated"


def test_production_enclave_with_matching_references_is_affirming() -> None:
    claims = copy.deepcopy(_sgx())
    claims["body"]["attributes.flags"] = "0500000000000000"
    body = claims["body"]
    references = {"mr_enclave": [body["mr_enclave"]], "mr_signer": [body["mr_signer"]]}
    vector = appraise({"sgx": claims}, references)
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"

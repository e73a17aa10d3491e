"""The TDX and SGX verifiers: bindings to the session and refusal without collateral."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest
from cryptography import x509

from conftest import vector
from keybroker.errors import ConfigError, EvidenceError, KeybrokerError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.intel.dcap import Quote, SgxReportBody, parse_quote
from keybroker.verifiers.intel.verifier import SgxVerifier, TdxVerifier

IN_VALIDITY = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC).timestamp()


class FixedAppraisal:
    """A TcbAppraiser that reports an up-to-date platform (the collateral layer is tested
    on its own); it records what it was asked, to show the verifier consulted it."""

    def __init__(self) -> None:
        self.asked: list[datetime.datetime] = []

    def appraise(
        self, quote: Quote, pck: x509.Certificate, now: datetime.datetime
    ) -> dict[str, JsonValue]:
        self.asked.append(now)
        return {"tcb_status": "UpToDate", "collateral_expiration_status": "0"}


def _evidence(name: str) -> tuple[dict[str, JsonValue], Quote]:
    raw = vector("verifier", name).read_bytes()
    return {"quote": base64.b64encode(raw).decode()}, parse_quote(raw)


def test_tdx_quote_bound_to_the_session_verifies() -> None:
    evidence, quote = _evidence("tdx_quote_4.dat")
    appraisal = FixedAppraisal()
    verifier = TdxVerifier(appraisal, clock=lambda: IN_VALIDITY)
    [claims] = verifier.verify(
        evidence,
        expected_report_data=quote.body.report_data,
        expected_init_data=bytes(32),  # a zero digest, padded to mr_config_id's 48 bytes
    )
    assert claims.tee_class == "cpu" and claims.claims["tcb_status"] == "UpToDate"
    assert appraisal.asked == [datetime.datetime.fromtimestamp(IN_VALIDITY, datetime.UTC)]


def test_tdx_report_data_mismatch_is_refused() -> None:
    evidence, _quote = _evidence("tdx_quote_4.dat")
    verifier = TdxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY)
    with pytest.raises(EvidenceError, match="report_data does not match"):
        verifier.verify(evidence, expected_report_data=b"\x01" * 48, expected_init_data=None)


def test_tdx_init_data_mismatch_is_refused() -> None:
    evidence, quote = _evidence("tdx_quote_4.dat")
    verifier = TdxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY)
    with pytest.raises(EvidenceError, match="mr_config_id does not match"):
        verifier.verify(
            evidence, expected_report_data=quote.body.report_data, expected_init_data=b"\x02" * 32
        )


def test_sgx_quote_verifies_and_binds() -> None:
    evidence, quote = _evidence("occlum_quote.dat")
    verifier = SgxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY)
    [claims] = verifier.verify(
        evidence, expected_report_data=quote.body.report_data, expected_init_data=None
    )
    body = claims.claims["body"]
    assert isinstance(body, dict) and body["mr_enclave"] == raw_enclave(quote)
    with pytest.raises(EvidenceError, match="report_data does not match"):
        verifier.verify(evidence, expected_report_data=b"other", expected_init_data=None)


def test_without_collateral_source_nothing_is_vouched_for() -> None:
    evidence, quote = _evidence("tdx_quote_4.dat")
    with pytest.raises(EvidenceError, match="no DCAP collateral source is configured"):
        TdxVerifier(clock=lambda: IN_VALIDITY).verify(
            evidence, expected_report_data=quote.body.report_data, expected_init_data=None
        )


@pytest.mark.parametrize(
    "evidence",
    [{}, {"quote": 5}, {"quote": "not base64!"}, [], "x"],
    ids=["no-quote", "number", "not-base64", "array", "string"],
)
def test_malformed_evidence_is_refused(evidence: JsonValue) -> None:
    with pytest.raises(EvidenceError):
        TdxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY).verify(
            evidence, expected_report_data=None, expected_init_data=None
        )


def raw_enclave(quote: Quote) -> str:
    assert isinstance(quote.body, SgxReportBody)
    return quote.body.mr_enclave.hex()


def test_dcap_settings_typo_is_named() -> None:
    with pytest.raises(ConfigError, match="colateral_service"):
        build_verifiers({"dcap": {"colateral_service": "https://pccs"}})


def test_plain_http_collateral_service_needs_the_insecure_switch() -> None:
    with pytest.raises(ConfigError, match="not HTTPS"):
        build_verifiers({"dcap": {"collateral_service": "http://pccs:8081"}})


def test_tdx_and_sgx_are_registered_without_touching_the_network() -> None:
    verifiers = build_verifiers(None)
    assert isinstance(verifiers[Tee.TDX], TdxVerifier)
    assert isinstance(verifiers[Tee.SGX], SgxVerifier)
    assert verifiers[Tee.TDX].may_block and not verifiers[Tee.SAMPLE].may_block


def test_quote_without_reachable_collateral_fails_closed(tmp_path: Path) -> None:
    """Offline mode with no collateral for this platform: no claims, a clear refusal."""
    evidence, quote = _evidence("tdx_quote_4.dat")
    verifiers = build_verifiers({"dcap": {"offline_dir": str(tmp_path)}}, clock=lambda: IN_VALIDITY)
    with pytest.raises(KeybrokerError):
        verifiers[Tee.TDX].verify(
            evidence, expected_report_data=quote.body.report_data, expected_init_data=None
        )


def test_event_log_that_does_not_replay_to_the_quote_is_refused() -> None:
    """CCEL_data was not recorded with tdx_quote_4.dat: its RTMR0 differs, so it is refused
    rather than reported as the TD's boot (a swapped-in log)."""
    evidence, quote = _evidence("tdx_quote_4.dat")
    log = vector("verifier", "CCEL_data").read_bytes()
    evidence["cc_eventlog"] = base64.b64encode(log).decode()
    verifier = TdxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY)
    with pytest.raises(EvidenceError, match="RTMR0"):
        verifier.verify(
            evidence, expected_report_data=quote.body.report_data, expected_init_data=None
        )


def test_malformed_event_log_is_refused() -> None:
    evidence, quote = _evidence("tdx_quote_4.dat")
    evidence["cc_eventlog"] = "%%%"
    verifier = TdxVerifier(FixedAppraisal(), clock=lambda: IN_VALIDITY)
    with pytest.raises(EvidenceError, match="cc_eventlog"):
        verifier.verify(
            evidence, expected_report_data=quote.body.report_data, expected_init_data=None
        )

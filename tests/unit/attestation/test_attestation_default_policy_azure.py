"""The default CPU attestation policy's az-snp-vtpm and az-tdx-vtpm rules, on the claims the
verifiers produce from the recorded Azure evidence."""

from __future__ import annotations

import datetime
import json
from typing import Any

from cryptography import x509
from default_policy import appraise

from conftest import vector
from keybroker.attestation.ear import status_of
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.amd.snp import SnpAppraiser
from keybroker.verifiers.amd.snp_certs import KeyKind
from keybroker.verifiers.amd.snp_fetcher import SnpCollateralFetcher, VcekRequest
from keybroker.verifiers.amd.snp_report import Product
from keybroker.verifiers.azure.az_snp_vtpm import AzSnpVtpmVerifier
from keybroker.verifiers.azure.az_tdx_vtpm import AzTdxVtpmVerifier
from keybroker.verifiers.intel.dcap import Quote

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)  # the recorded VCEK and PCKs are valid
CHALLENGE = b"challenge"  # the nonce the recordings are bound to


class NoKds(SnpCollateralFetcher):
    """The recorded evidence carries its VCEK: any fetch is a test failure."""

    def _vcek(self, request: VcekRequest) -> bytes:
        raise AssertionError("no VCEK fetch expected")

    def _crl(self, product: Product) -> bytes:
        raise AssertionError("no CRL fetch expected")

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        raise AssertionError("no chain fetch expected")


class UpToDate:
    def appraise(
        self, quote: Quote, pck: x509.Certificate, now: datetime.datetime
    ) -> dict[str, JsonValue]:
        return {"tcb_status": "UpToDate", "collateral_expiration_status": "0"}


def _evidence(tee: str) -> Any:
    return json.loads(vector("verifier", tee, "evidence-v1.json").read_text())


def _az_snp() -> dict[str, Any]:
    appraiser = SnpAppraiser(NoKds(), insecure_skip_crl=True)  # the vectors hold no AMD CRL
    verifier = AzSnpVtpmVerifier(appraiser, clock=NOW.timestamp)
    [result] = verifier.verify(
        _evidence("az-snp-vtpm"), expected_report_data=CHALLENGE, expected_init_data=None
    )
    return dict(result.claims)


def _az_tdx() -> dict[str, Any]:
    verifier = AzTdxVtpmVerifier(UpToDate(), clock=NOW.timestamp)
    [result] = verifier.verify(
        _evidence("az-tdx-vtpm"), expected_report_data=CHALLENGE, expected_init_data=None
    )
    return dict(result.claims)


def _az_snp_references(claims: dict[str, Any]) -> dict[str, Any]:
    names = {
        "measurement": "measurement",
        "tcb_bootloader": "reported_tcb_bootloader",
        "tcb_tee": "reported_tcb_tee",
        "tcb_snp": "reported_tcb_snp",
        "tcb_microcode": "reported_tcb_microcode",
        "smt_enabled": "platform_smt_enabled",
        "tsme_enabled": "platform_tsme_enabled",
        "abi_major": "policy_abi_major",
        "abi_minor": "policy_abi_minor",
        "single_socket": "policy_single_socket",
        "smt_allowed": "policy_smt_allowed",
    }
    return {rv: [claims[claim]] for rv, claim in names.items()} | {
        "snp_pcr11": [claims["tpm"]["pcr11"]]
    }


def test_recorded_azure_snp_guest_with_matching_references_is_affirming() -> None:
    claims = _az_snp()
    assert claims["policy_debug_allowed"] == "false"  # upstream's string encoding
    vector = appraise({"az-snp-vtpm": claims}, _az_snp_references(claims))
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


def test_debuggable_azure_snp_guest_is_contraindicated() -> None:
    claims = {**_az_snp(), "policy_debug_allowed": "true"}
    vector = appraise({"az-snp-vtpm": claims}, _az_snp_references(claims))
    assert vector["configuration"] == 96 and status_of(vector) == "contraindicated"


def test_azure_snp_guest_with_another_boot_chain_is_not_affirmed() -> None:
    claims = _az_snp()
    references = {**_az_snp_references(claims), "snp_pcr11": ["ab" * 32]}
    vector = appraise({"az-snp-vtpm": claims}, references)
    assert vector["executables"] == 33 and status_of(vector) != "affirming"


def _az_tdx_references(claims: dict[str, Any]) -> dict[str, Any]:
    body = claims["quote"]["body"]
    return {
        "tdx_pcr11": [claims["tpm"]["pcr11"]],
        **{name: [body[name]] for name in ("mr_seam", "tcb_svn", "mr_td", "xfam")},
    }


def test_recorded_azure_tdx_guest_with_matching_references_is_affirming() -> None:
    claims = _az_tdx()
    vector = appraise({"az-tdx-vtpm": claims}, _az_tdx_references(claims))
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


def test_azure_tdx_platform_out_of_date_is_not_trusted() -> None:
    claims = {**_az_tdx(), "tcb_status": "OutOfDate"}
    vector = appraise({"az-tdx-vtpm": claims}, _az_tdx_references(claims))
    assert vector["hardware"] == 97 and status_of(vector) == "contraindicated"


def test_debug_azure_td_is_contraindicated() -> None:
    claims = _az_tdx()
    claims["td_attributes"] = {**claims["td_attributes"], "debug": True}
    vector = appraise({"az-tdx-vtpm": claims}, _az_tdx_references(claims))
    assert vector["configuration"] == 96

"""The default CPU attestation policy's SNP rules, on the claims of the recorded Genoa report."""

from __future__ import annotations

import json
from typing import Any

import pytest
from default_policy import appraise

from conftest import vector
from keybroker.attestation.ear import status_of
from keybroker.attestation.policy import _literal_reference_ids, builtin_attestation_policy
from keybroker.verifiers.amd.snp_report import report_from_json, snp_claims


def _snp() -> dict[str, Any]:
    evidence = json.loads(vector("attestation-service", "e2e-evidence.json").read_text())
    return dict(snp_claims(report_from_json(evidence["attestation_report"])))


def _references(claims: dict[str, Any]) -> dict[str, Any]:
    """Upstream's reference value ids, registered as lists (as the RVPS stores them)."""
    return {
        "snp_launch_measurement": [claims["measurement"]],
        "snp_bootloader": [claims["reported_tcb_bootloader"]],
        "snp_tee_svn": [claims["reported_tcb_tee"]],
        "snp_snp_svn": [claims["reported_tcb_snp"]],
        "snp_microcode": [claims["reported_tcb_microcode"]],
        "snp_smt_enabled": [claims["platform_smt_enabled"]],
        "snp_tsme_enabled": [claims["platform_tsme_enabled"]],
        "snp_guest_abi_major": [claims["policy_abi_major"]],
        "snp_guest_abi_minor": [claims["policy_abi_minor"]],
        "snp_single_socket": [claims["policy_single_socket"]],
        "snp_smt_allowed": [claims["policy_smt_allowed"]],
    }


def test_recorded_guest_with_matching_references_is_affirming() -> None:
    claims = _snp()
    assert claims["policy_debug_allowed"] is False and claims["policy_migrate_ma"] is False
    vector = appraise({"snp": claims}, _references(claims))
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


def test_scalar_reference_values_match_too() -> None:
    claims = _snp()
    scalars = {k: v[0] for k, v in _references(claims).items() if k != "snp_launch_measurement"}
    references = {**scalars, "snp_launch_measurement": [claims["measurement"]]}
    vector = appraise({"snp": claims}, references)
    assert status_of(vector) == "affirming"


def test_debuggable_guest_is_contraindicated_even_with_every_reference_matching() -> None:
    claims = {**_snp(), "policy_debug_allowed": True}
    vector = appraise({"snp": claims}, _references(claims))
    assert vector["configuration"] == 96
    assert status_of(vector) == "contraindicated"


def test_guest_without_configuration_references_is_only_safe_not_approved() -> None:
    claims = _snp()
    references = {k: v for k, v in _references(claims).items() if not k.startswith("snp_guest")}
    assert appraise({"snp": claims}, references)["configuration"] == 3


def test_migration_agent_leaves_the_configuration_unknown() -> None:
    claims = {**_snp(), "policy_migrate_ma": True}
    assert appraise({"snp": claims}, _references(claims))["configuration"] == 36


@pytest.mark.parametrize(
    ("reference", "claim"),
    [("snp_launch_measurement", "executables"), ("snp_microcode", "hardware")],
)
def test_unknown_measurement_or_firmware_is_not_trusted(reference: str, claim: str) -> None:
    claims = _snp()
    references = {**_references(claims), reference: ["00"]}
    vector = appraise({"snp": claims}, references)
    assert vector[claim] in (33, 97)
    assert status_of(vector) != "affirming"


def test_default_policy_names_every_reference_value_id_literally() -> None:
    """Otherwise each appraisal would list and read the whole reference value store."""
    ids = _literal_reference_ids(builtin_attestation_policy("default_cpu"))
    assert ids is not None and {"snp_launch_measurement", "snp_pcr11", "mr_td"} <= set(ids)

"""The default attestation policy's Hygon rules: CSV (class cpu) on the claims of upstream's
recorded CSV report, and DCU devices (class dcu)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from default_policy import WORKERS, References, appraise

from conftest import vector
from keybroker.attestation.ear import status_of
from keybroker.attestation.policy import (
    DEFAULT_POLICIES,
    AttestationPolicies,
    _literal_reference_ids,
    builtin_attestation_policy,
)
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.verifiers.hygon.csv import parse_wrapper
from keybroker.verifiers.hygon.csv_report import csv_claims


def _csv() -> dict[str, Any]:
    evidence = json.loads(vector("verifier", "csv_evidence.json").read_text())
    return dict(csv_claims(parse_wrapper(evidence["attestation_report"]), "KPA64911240507"))


def _references(claims: dict[str, Any]) -> dict[str, Any]:
    return {
        "csv_measure": [claims["measure"]],
        "csv_api_major": [claims["policy"]["api_major"]],
        "csv_api_minor": [claims["policy"]["api_minor"]],
    }


def test_recorded_csv_guest_with_matching_references_is_affirming() -> None:
    claims = _csv()
    assert claims["policy"]["nodbg"] == 1
    trust = appraise({"csv": claims}, _references(claims))
    assert (trust["executables"], trust["hardware"], trust["configuration"]) == (3, 2, 3)
    assert status_of(trust) == "affirming"


def test_debug_policy_bit_fails_the_default_policy() -> None:
    claims = _csv()
    claims["policy"] = {**claims["policy"], "nodbg": 0}
    trust = appraise({"csv": claims}, _references(claims))
    assert trust["configuration"] == 96
    assert status_of(trust) == "contraindicated"


def test_unknown_csv_measurement_is_not_trusted() -> None:
    claims = _csv()
    trust = appraise({"csv": claims}, {**_references(claims), "csv_measure": ["00"]})
    assert trust["executables"] == 33
    assert status_of(trust) != "affirming"


def test_csv_guest_without_references_is_contraindicated() -> None:
    assert status_of(appraise({"csv": _csv()}, {})) == "contraindicated"


def test_default_policy_names_the_csv_reference_ids_literally() -> None:
    ids = _literal_reference_ids(builtin_attestation_policy("default_cpu"))
    assert ids is not None and {"csv_measure", "csv_api_major", "csv_api_minor"} <= set(ids)


def _appraise_dcu(evidence: dict[str, Any], references: dict[str, Any]) -> dict[str, int]:
    policies = AttestationPolicies(MemoryKeyValueStorage(), References(references), WORKERS)

    async def run() -> dict[str, int]:
        await policies.initialize()
        return (await policies.appraise("default_dcu", evidence)).trust_vector

    return asyncio.run(run())


DCU = {"body": {"version": 1, "measure": "ab" * 32, "chip_id": "00" * 16}}


def test_dcu_with_matching_references_is_affirmed_in_hardware_and_executables() -> None:
    references: dict[str, Any] = {"hygondcu_version": [1], "hygondcu_measure": ["ab" * 32]}
    trust = _appraise_dcu({"hygondcu": DCU}, references)
    assert (trust["hardware"], trust["executables"], trust["configuration"]) == (2, 3, 36)
    assert status_of(trust) == "warning"


def test_dcu_without_references_is_contraindicated() -> None:
    assert status_of(_appraise_dcu({"hygondcu": DCU}, {})) == "contraindicated"


def test_default_dcu_policy_is_stored_with_the_other_defaults() -> None:
    assert "default_dcu" in DEFAULT_POLICIES
    ids = _literal_reference_ids(builtin_attestation_policy("default_dcu"))
    assert ids is not None and set(ids) == {"hygondcu_version", "hygondcu_measure"}

"""The default device policies' NVIDIA rules: local-mode Hopper claims (from the recorded
upstream report), NRAS claims (upstream's rules), switches, PPCIE and BlueField DPUs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from default_policy import WORKERS, References

from conftest import vector
from keybroker.attestation.ear import status_of
from keybroker.attestation.policy import AttestationPolicies
from keybroker.storage.memory import MemoryKeyValueStorage


def appraise(
    policy_id: str, evidence: dict[str, Any], references: dict[str, Any]
) -> dict[str, int]:
    policies = AttestationPolicies(MemoryKeyValueStorage(), References(references), WORKERS)

    async def run() -> dict[str, int]:
        await policies.initialize()
        return (await policies.appraise(policy_id, evidence)).trust_vector

    return asyncio.run(run())


def _hopper() -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(
        vector("verifier", "nvidia", "hopperAttestationReport-claims.txt").read_text()
    )
    return claims


def _rim(claims: dict[str, Any]) -> dict[str, Any]:
    """References as an RVPS would hold them from the driver and VBIOS RIMs: the non-zero
    measurements of the recorded report, plus its versions."""
    active = {i: m for i, m in claims["measurements"].items() if m.strip("0")}
    return {
        "nvidia_gpu_measurements": [f"{i}:{m}" for i, m in active.items()],
        "allowed_vbios_versions": [claims["config"]["vbios_version"]],
        "allowed_driver_versions": [claims["config"]["driver_version"]],
    }


def test_recorded_hopper_with_matching_rim_references_is_affirming() -> None:
    claims = _hopper()
    vector_ = appraise("default_gpu", {"nvidia": claims}, _rim(claims))
    assert (vector_["hardware"], vector_["executables"], vector_["configuration"]) == (2, 3, 2)
    assert status_of(vector_) == "affirming"


def test_hopper_without_reference_values_is_not_affirming() -> None:
    vector_ = appraise("default_gpu", {"nvidia": _hopper()}, {})
    assert (vector_["executables"], vector_["configuration"]) == (33, 36)
    assert status_of(vector_) != "affirming"


def test_measurement_not_in_rim_references_is_not_trusted() -> None:
    claims = _hopper()
    references = _rim(claims)
    claims["measurements"]["2"] = "ab" * 48  # e.g. a devtools-mode or altered firmware
    assert appraise("default_gpu", {"nvidia": claims}, references)["executables"] == 33


def test_measurement_missing_from_report_is_not_trusted() -> None:
    claims = _hopper()
    references = _rim(claims)
    del claims["measurements"]["2"]
    assert appraise("default_gpu", {"nvidia": claims}, references)["executables"] == 33


def test_unlisted_driver_version_leaves_configuration_unknown() -> None:
    claims = _hopper()
    references = {**_rim(claims), "allowed_driver_versions": ["535.00.00"]}
    assert appraise("default_gpu", {"nvidia": claims}, references)["configuration"] == 36


def _nras(**overrides: Any) -> dict[str, Any]:
    chain = {"x-nvidia-cert-ocsp-status": "good", "x-nvidia-cert-status": "valid"}
    claims: dict[str, Any] = {
        "x-nvidia-gpu-attestation-report-cert-chain": chain,
        "x-nvidia-gpu-attestation-report-cert-chain-fwid-match": True,
        "x-nvidia-gpu-attestation-report-parsed": True,
        "x-nvidia-gpu-attestation-report-signature-verified": True,
        "x-nvidia-gpu-arch-check": True,
        "x-nvidia-gpu-vbios-rim-cert-chain": chain,
        "secboot": True,
        "dbgstat": "disabled",
        "measres": "success",
        "x-nvidia-gpu-vbios-version": "96.00.9F.00.01",
        "x-nvidia-gpu-driver-version": "550.90.07",
    }
    for rim in ("driver", "vbios"):
        for check in (
            "fetched",
            "measurements-available",
            "schema-validated",
            "signature-verified",
            "version-match",
        ):
            claims[f"x-nvidia-gpu-{rim}-rim-{check}"] = True
    claims.update(overrides)
    return claims


NRAS_REFERENCES = {
    "allowed_vbios_versions": ["96.00.9F.00.01"],
    "allowed_driver_versions": ["550.90.07"],
}


def test_nras_appraised_gpu_is_affirming_as_upstream() -> None:
    vector_ = appraise("default_gpu", {"nvidia": _nras()}, NRAS_REFERENCES)
    assert (vector_["hardware"], vector_["executables"], vector_["configuration"]) == (2, 3, 2)


def test_nras_gpu_with_debug_enabled_is_not_affirmed_by_default_policy() -> None:
    vector_ = appraise("default_gpu", {"nvidia": _nras(dbgstat="enabled")}, NRAS_REFERENCES)
    assert vector_["configuration"] == 36
    assert status_of(vector_) != "affirming"


def test_nras_gpu_with_unlisted_versions_is_only_safe() -> None:
    assert appraise("default_gpu", {"nvidia": _nras()}, {})["configuration"] == 3


@pytest.mark.parametrize(
    "failed",
    [
        "x-nvidia-gpu-attestation-report-signature-verified",
        "x-nvidia-gpu-attestation-report-cert-chain-fwid-match",
    ],
)
def test_nras_failed_report_check_is_not_genuine_hardware(failed: str) -> None:
    vector_ = appraise("default_gpu", {"nvidia": _nras(**{failed: False})}, NRAS_REFERENCES)
    assert vector_["hardware"] == 97


def test_nras_revoked_rim_certificate_is_not_trusted_code() -> None:
    revoked = {"x-nvidia-cert-ocsp-status": "revoked", "x-nvidia-cert-status": "valid"}
    claims = _nras(**{"x-nvidia-gpu-vbios-rim-cert-chain": revoked})
    assert appraise("default_gpu", {"nvidia": claims}, NRAS_REFERENCES)["executables"] == 33


def _nras_switch(**overrides: Any) -> dict[str, Any]:
    chain = {"x-nvidia-cert-ocsp-status": "good", "x-nvidia-cert-status": "valid"}
    claims: dict[str, Any] = {
        "x-nvidia-switch-attestation-report-cert-chain": chain,
        "x-nvidia-switch-attestation-report-cert-chain-fwid-match": True,
        "x-nvidia-switch-attestation-report-parsed": True,
        "x-nvidia-switch-attestation-report-signature-verified": True,
        "x-nvidia-switch-arch-check": True,
        "x-nvidia-switch-bios-rim-cert-chain": chain,
        "secboot": True,
        "dbgstat": "disabled",
        "measres": "success",
        "x-nvidia-switch-bios-version": "96.10.6D.00.01",
    }
    for check in (
        "fetched",
        "measurements-available",
        "schema-validated",
        "signature-verified",
        "version-match",
    ):
        claims[f"x-nvidia-switch-bios-rim-{check}"] = True
    claims.update(overrides)
    return claims


def test_nras_switch_is_affirming_with_its_bios_listed() -> None:
    references = {"allowed_switch_bios_versions": ["96.10.6D.00.01"]}
    vector_ = appraise("default_switch", {"nvidia": _nras_switch()}, references)
    assert (vector_["hardware"], vector_["executables"], vector_["configuration"]) == (2, 3, 2)


def test_nras_switch_with_debug_enabled_is_not_affirmed() -> None:
    references = {"allowed_switch_bios_versions": ["96.10.6D.00.01"]}
    vector_ = appraise("default_switch", {"nvidia": _nras_switch(dbgstat="enabled")}, references)
    assert vector_["configuration"] == 36


def test_ppcie_topology_is_an_affirmed_configuration() -> None:
    vector_ = appraise("default_ppcie", {"ppcie": {"switch_count": 4, "gpu_count": 8}}, {})
    assert vector_["configuration"] == 2 and status_of(vector_) == "affirming"


DPU = {
    "device_serial": "1a2b",
    "device_class": "bluefield3",
    "firmware_layers_count": 2,
    "accumulated_fwid": "cd" * 48,
    "alias_timestamp": 1_800_000_000,
    "session_nonce": "00" * 48,
}


def test_dpu_with_listed_firmware_is_affirming() -> None:
    references = {
        "nvidia_dpu_device_class": ["bluefield3"],
        "nvidia_dpu_accumulated_fwid": ["cd" * 48],
    }
    vector_ = appraise("default_nvidia-dpu", {"nvidiadpu": DPU}, references)
    assert (vector_["hardware"], vector_["executables"], vector_["configuration"]) == (2, 3, 2)


def test_dpu_with_unlisted_firmware_is_not_trusted() -> None:
    references = {
        "nvidia_dpu_device_class": ["bluefield3"],
        "nvidia_dpu_accumulated_fwid": ["ef" * 48],
    }
    vector_ = appraise("default_nvidia-dpu", {"nvidiadpu": DPU}, references)
    assert vector_["executables"] == 33 and status_of(vector_) != "affirming"

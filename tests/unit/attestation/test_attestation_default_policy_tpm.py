"""The default CPU attestation policy's tpm rules (upstream's), on the claims the tpm verifier
produces from a quote by an enrolled AK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from default_policy import appraise

from keybroker.attestation.ear import status_of
from keybroker.verifiers.tpm.trusted_aks import TrustedAks
from keybroker.verifiers.tpm.verifier import TpmVerifier
from tpm_quotes import AK, REPORT_DATA, evidence, pem


def _claims(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "ak.pub").write_bytes(pem(AK))
    verifier = TpmVerifier(TrustedAks(tmp_path))
    [result] = verifier.verify(
        evidence(), expected_report_data=REPORT_DATA, expected_init_data=None
    )
    return dict(result.claims)


def _references(claims: dict[str, Any]) -> dict[str, Any]:
    return {"tpm_pcr11": [claims["pcr11"]], "trusted_aks": [claims["ak_public"]]}


def test_tpm_with_registered_pcr11_and_ak_has_affirming_executables(tmp_path: Path) -> None:
    claims = _claims(tmp_path)
    vector = appraise({"tpm": claims}, _references(claims))
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 0)
    assert status_of(vector) == "affirming"


def test_tpm_with_another_pcr11_is_not_affirmed(tmp_path: Path) -> None:
    claims = _claims(tmp_path)
    references = {**_references(claims), "tpm_pcr11": ["ab" * 32]}
    vector = appraise({"tpm": claims}, references)
    assert vector["executables"] == 33 and status_of(vector) == "warning"


def test_tpm_whose_ak_is_not_a_trusted_aks_reference_value_is_not_affirmed(
    tmp_path: Path,
) -> None:
    claims = _claims(tmp_path)
    references = {**_references(claims), "trusted_aks": ["another key"]}
    vector = appraise({"tpm": claims}, references)
    assert vector["executables"] == 33 and status_of(vector) == "warning"

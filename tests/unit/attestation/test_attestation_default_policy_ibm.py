"""The default CPU attestation policy's IBM SE rules (upstream's, plus the dump flag)."""

from __future__ import annotations

from typing import Any

from default_policy import appraise

from keybroker.attestation.ear import status_of


def _se(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "cuid": "00" * 16,
        "report_data": "ab" * 64,
        "version": 256,
        "image_phkh": "11" * 32,
        "attestation_phkh": "11" * 32,
        "tag": "22" * 16,
        "image_dump_allowed": False,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def test_verified_se_guest_of_the_configured_image_is_affirming() -> None:
    vector = appraise({"se": _se()}, {})
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


def test_dump_allowed_guest_is_contraindicated() -> None:
    vector = appraise({"se": _se(image_dump_allowed=True)}, {})
    assert vector["configuration"] == 96
    assert status_of(vector) == "contraindicated"


def test_guest_of_an_unconfigured_image_has_an_unknown_configuration() -> None:
    vector = appraise({"se": _se(image_dump_allowed=None)}, {})
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 36)
    assert status_of(vector) == "warning"

"""The default CPU attestation policy's CCA rules, on the claims of upstream's example token."""

from __future__ import annotations

from typing import Any

import pytest
from default_policy import appraise

from cca_tokens import EXAMPLE_RIM, EXAMPLE_TOKEN, RIM_REFERENCE_ID
from json_shapes import obj
from keybroker.attestation.ear import status_of
from keybroker.verifiers.arm.cca import cca_claims
from keybroker.verifiers.arm.cca_token import parse_token


def _cca(lifecycle: int | None = None) -> dict[str, Any]:
    claims = cca_claims(parse_token(EXAMPLE_TOKEN.read_bytes()))
    claims.pop("report_data")
    claims.pop("init_data")  # the AS lifts both to the top level
    if lifecycle is not None:
        platform = dict(obj(claims["platform"]))
        platform["cca-platform-lifecycle"] = lifecycle
        claims["platform"] = platform
    return claims


def test_secured_realm_with_its_rim_registered_is_affirming() -> None:
    vector = appraise({"cca": _cca()}, {RIM_REFERENCE_ID: [EXAMPLE_RIM]})
    assert (vector["executables"], vector["hardware"], vector["configuration"]) == (3, 2, 2)
    assert status_of(vector) == "affirming"


def test_unknown_rim_leaves_the_executables_unrecognized() -> None:
    vector = appraise({"cca": _cca()}, {RIM_REFERENCE_ID: ["AAAA"]})
    assert vector["executables"] == 33
    assert status_of(vector) == "warning"


@pytest.mark.parametrize(
    "lifecycle",
    [
        0x4000,  # non-PSA-RoT debug
        0x5003,  # recoverable PSA-RoT debug
        0x6000,  # decommissioned
        0x1000,  # assembly and test
        0x2000,  # PSA-RoT provisioning
        0x0000,  # unknown
    ],
)
def test_debug_lifecycle_is_contraindicated_against_the_default_policy(lifecycle: int) -> None:
    vector = appraise({"cca": _cca(lifecycle)}, {RIM_REFERENCE_ID: [EXAMPLE_RIM]})
    assert vector["configuration"] == 96
    assert vector["hardware"] == 97
    assert status_of(vector) == "contraindicated"


@pytest.mark.parametrize("lifecycle", [0x3000, 0x30FF])
def test_every_secured_substate_is_accepted(lifecycle: int) -> None:
    vector = appraise({"cca": _cca(lifecycle)}, {RIM_REFERENCE_ID: [EXAMPLE_RIM]})
    assert status_of(vector) == "affirming"

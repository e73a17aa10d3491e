"""An Arm CCA guest through the real HTTP API, the SDK as its peer: RCAR with a token signed
by upstream's test CPAK and RAK, appraised by the default policy, resources released."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from cca_tokens import (
    EXAMPLE_RIM,
    P_LIFECYCLE,
    RIM_REFERENCE_ID,
    CcaTestAttester,
    example_spec,
    local_config,
)
from conftest import FakeClock, Kbs, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.protocol.jws import decode_unverified

SECRET = b"released to a secured realm"
NOT_CONTRAINDICATED = """
package policy
import rego.v1
default allow := false
allow if input.submods.cpu0["ear.status"] != "contraindicated"
"""


@pytest.fixture
def cca_kbs(clock: FakeClock) -> Iterator[Kbs]:
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": local_config()}
    )
    with TestClient(create_app(config, clock=clock)) as client:
        yield Kbs(client, clock, config)


def _guest(kbs: Kbs, attester: CcaTestAttester | None = None) -> KbsClient:
    kbs.client.cookies.clear()
    return KbsClient("http://testserver", http=kbs.client, attester=attester or CcaTestAttester())


def _cpu0(token: str) -> Any:
    claims: Any = decode_unverified(token)[1]
    return claims["submods"]["cpu0"]


def test_auth_with_cca_answers_200_on_a_default_kbs(kbs: Kbs) -> None:
    reply = kbs.client.post(
        "/kbs/v0/auth", json={"version": "0.4.0", "tee": "cca", "extra-params": {}}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["nonce"]


def test_default_kbs_refuses_cca_evidence_with_a_clear_error(kbs: Kbs) -> None:
    with pytest.raises(KbsRejectedError, match="no CCA platform is trusted") as rejected:
        _guest(kbs).attest()
    assert rejected.value.http_status == 401


def test_cca_guest_attests_and_receives_a_resource(cca_kbs: Kbs) -> None:
    admin = AdminClient("http://testserver", http=cca_kbs.client)
    admin.set_resource("default/key/cca", SECRET)
    admin.set_resource_policy(NOT_CONTRAINDICATED)
    admin.set_sample_reference_value(RIM_REFERENCE_ID, [EXAMPLE_RIM])
    guest = _guest(cca_kbs)
    assert guest.get_resource("default/key/cca") == SECRET
    assert guest.token is not None
    cpu0 = _cpu0(guest.token)
    assert cpu0["ear.status"] == "affirming"
    evidence = cpu0["ear.veraison.annotated-evidence"]
    assert evidence["cca"]["realm"]["cca-realm-initial-measurement"] == EXAMPLE_RIM
    challenge = base64.b64decode(evidence["cca"]["realm"]["cca-realm-challenge"])
    assert bytes.fromhex(evidence["report_data"]) == challenge
    assert set(evidence["runtime_data_claims"]) >= {"nonce", "tee-pubkey"}


def test_debug_platform_is_refused_the_resource(cca_kbs: Kbs) -> None:
    admin = AdminClient("http://testserver", http=cca_kbs.client)
    admin.set_resource("default/key/cca", SECRET)
    admin.set_resource_policy(NOT_CONTRAINDICATED)
    admin.set_sample_reference_value(RIM_REFERENCE_ID, [EXAMPLE_RIM])
    debug = example_spec().with_platform(**{f"k{P_LIFECYCLE}": 0x4000})
    guest = _guest(cca_kbs, CcaTestAttester(debug))
    with pytest.raises(KbsRejectedError) as rejected:
        guest.get_resource("default/key/cca")
    assert rejected.value.http_status == 403
    assert guest.token is not None
    assert _cpu0(guest.token)["ear.status"] == "contraindicated"

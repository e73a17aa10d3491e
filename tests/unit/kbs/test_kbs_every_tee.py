"""Every TEE upstream's verifier crate knows is offered by a KBS with the default config: its
``/auth`` answers 200 with a challenge (issue 19: no TEE is refused as unsupported). IBM SE is
the one TEE whose challenge is built from the operator's material (host-key documents, the
measurement-encryption key), as upstream builds it: until that is installed its ``/auth`` says
what is missing (tests/unit/kbs/test_kbs_se.py and tests/e2e/test_e2e_se.py answer 200 with
it)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.kbs.app import create_app
from keybroker.protocol.models import Tee

# upstream's deps/verifier/src/lib.rs, with the two test TEEs
UPSTREAM_TEES = {
    "sample",
    "sampledevice",
    "tdx",
    "sgx",
    "snp",
    "az-snp-vtpm",
    "az-tdx-vtpm",
    "tpm",
    "cca",
    "se",
    "csv",
    "hygondcu",
    "nvidia",
    "nvidiadpu",
}


def test_keybroker_names_every_upstream_tee() -> None:
    assert {tee.value for tee in Tee} == UPSTREAM_TEES


@pytest.mark.parametrize("tee", sorted(UPSTREAM_TEES - {"se"}))
def test_a_default_kbs_offers_every_tee(tee: str) -> None:
    with TestClient(create_app(kbs_config())) as client:
        reply = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": tee})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["nonce"]) > 0


def test_se_without_its_material_names_what_is_missing() -> None:
    with TestClient(create_app(kbs_config())) as client:
        reply = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "se"})
    assert reply.status_code == 401
    detail = reply.json()["detail"]
    assert "IBM SE is not set up" in detail and "not supported" not in detail

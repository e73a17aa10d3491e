"""The Arm CCA verifier in remote mode: Keybroker's Veraison client against the Veraison
STAND-IN over real HTTPS (tests/standins/veraison.py), and the attacks on that path."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from cca_tokens import (
    EXAMPLE_RIM,
    P_INSTANCE,
    RIM_REFERENCE_ID,
    CcaTestAttester,
    evidence,
    example_spec,
    padded64,
)
from conftest import FakeClock, kbs_config, vector
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.kbs.app import create_app
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import Tee
from keybroker.verifiers import Verifier
from keybroker.verifiers.arm.cca import CcaRemoteVerifier, build_cca_verifier
from ports import free_port
from standins.veraison import VeraisonStandIn, running_veraison_standin

DIGEST = hashlib.sha384(b"runtime data of a remote session").digest()


@dataclass
class Remote:
    stand_in: VeraisonStandIn
    url: str
    ca: Path

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"cca": {"type": "remote", "address": self.url, "ca-cert": str(self.ca), **extra}}

    def verifier(self) -> Verifier:
        return build_cca_verifier(self.config())


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    spec = example_spec()
    stand_in = VeraisonStandIn({spec.platform[P_INSTANCE]: spec.cpak.public_key()})
    with running_veraison_standin(tmp_path, stand_in) as (url, ca):
        yield Remote(stand_in, url, ca)


def _token(report_data: bytes = DIGEST) -> bytes:
    return example_spec().with_realm(k10=padded64(report_data)).build()


def _verify(verifier: Verifier, token: bytes) -> dict[str, Any]:
    [claims] = verifier.verify(
        evidence(token), expected_report_data=DIGEST, expected_init_data=None
    )
    return claims.claims


def test_remote_appraisal_through_the_veraison_api(remote: Remote) -> None:
    verifier = remote.verifier()
    assert isinstance(verifier, CcaRemoteVerifier) and verifier.may_block
    claims = _verify(verifier, _token())
    assert claims["realm"]["cca-realm-initial-measurement"] == EXAMPLE_RIM
    assert claims["report_data"] == padded64(DIGEST).hex()
    assert len(remote.stand_in.deleted) == 1  # the session was cleaned up
    assert not remote.stand_in.sessions


def test_upstream_remote_config_builds_a_remote_verifier_without_network() -> None:
    upstream = json.loads(vector("verifier", "cca", "conf", "cca-config-remote.json").read_text())
    verifier = build_cca_verifier({"cca": upstream["cca-verifier"]})
    assert isinstance(verifier, CcaRemoteVerifier)


def test_plain_http_address_is_refused_unless_insecure() -> None:
    section = {"type": "remote", "address": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="not HTTPS"):
        build_cca_verifier({"cca": section})
    build_cca_verifier({"cca": {**section, "insecure_http": True}})


def test_ear_signed_by_another_key_is_refused(remote: Remote) -> None:
    remote.stand_in.sign_with = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(remote.verifier(), _token())


def test_ear_for_another_nonce_is_refused(remote: Remote) -> None:
    remote.stand_in.ear_nonce = bytes(64)
    with pytest.raises(EvidenceError, match="another nonce"):
        _verify(remote.verifier(), _token())


def test_platform_veraison_does_not_endorse_is_refused(remote: Remote) -> None:
    """A CPAK Veraison has no endorsement for: it answers, but does not affirm."""
    spec = example_spec().with_platform(**{f"k{P_INSTANCE}": b"\x01" + bytes(32)})
    rogue = type(spec)(spec.platform, spec.realm, ec.generate_private_key(ec.SECP384R1()), spec.rak)
    token = rogue.with_realm(k10=padded64(DIGEST)).build()
    with pytest.raises(EvidenceError, match="did not affirm the CCA platform"):
        _verify(remote.verifier(), token)


def test_wrong_challenge_is_refused_before_asking_veraison(remote: Remote) -> None:
    with pytest.raises(EvidenceError, match="realm challenge does not match"):
        _verify(remote.verifier(), _token(hashlib.sha384(b"other session").digest()))
    assert not remote.stand_in.sessions and not remote.stand_in.deleted


def test_flipped_realm_signature_byte_is_refused_locally(remote: Remote) -> None:
    collection = dict(cbor2.loads(_token()).value)
    realm = list(cbor2.loads(collection[44241]).value)
    realm[3] = bytes([realm[3][0] ^ 1]) + realm[3][1:]
    collection[44241] = cbor2.dumps(cbor2.CBORTag(18, realm))
    token = cbor2.dumps(cbor2.CBORTag(399, collection))
    with pytest.raises(EvidenceError, match="realm token signature does not verify"):
        _verify(remote.verifier(), token)
    assert not remote.stand_in.deleted


def test_session_on_another_origin_is_refused(remote: Remote) -> None:
    remote.stand_in.location = "https://attacker.example/challenge-response/v1/session/1"
    with pytest.raises(ServiceUnavailableError, match="another origin"):
        _verify(remote.verifier(), _token())


def test_asynchronous_answer_is_refused(remote: Remote) -> None:
    remote.stand_in.asynchronous = True
    with pytest.raises(ServiceUnavailableError, match="asynchronous"):
        _verify(remote.verifier(), _token())


def test_unreachable_veraison_is_service_unavailable(tmp_path: Path) -> None:
    section = {"type": "remote", "address": f"https://127.0.0.1:{free_port()}", "timeout": 2}
    verifier = build_cca_verifier({"cca": section})
    with pytest.raises(ServiceUnavailableError, match="Veraison service"):
        _verify(verifier, _token())


def test_cca_guest_attests_to_a_kbs_using_remote_veraison(remote: Remote) -> None:
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": remote.config()}
    )
    with TestClient(create_app(config, clock=FakeClock())) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_sample_reference_value(RIM_REFERENCE_ID, [EXAMPLE_RIM])
        token = KbsClient("http://testserver", http=client, attester=CcaTestAttester()).attest()
    claims: Any = decode_unverified(token)[1]
    cpu0 = claims["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming"
    assert Tee.CCA.value in cpu0["ear.veraison.annotated-evidence"]

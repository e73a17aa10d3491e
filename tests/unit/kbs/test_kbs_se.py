"""IBM SE through the real KBS app: /auth answers upstream's SE challenge, /attest verifies the
guest's response (a simulated Ultravisor, tests/se_guest.py) and the token carries `se`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from conftest import FakeClock, kbs_config, vector
from json_shapes import at, obj
from keybroker.client.keys import TeeKey
from keybroker.kbs.app import create_app
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import PROTOCOL_VERSION
from keybroker.verifiers.ibm.se_formats import parse_se_header
from se_guest import SePki, Ultravisor, attest, settings_for, write_material

AUTH = "/kbs/v0/auth"
ATTEST = "/kbs/v0/attest"


@pytest.fixture
def se_kbs(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[TestClient, Ultravisor]]:
    pki = SePki()
    header = vector("verifier", "se", "secure_guest.hdr").read_bytes()
    root = write_material(tmp_path / "ibmse", pki, header, rsa.generate_private_key(65537, 2048))
    config = kbs_config(
        attestation_service={
            "type": "coco_as_builtin",
            "verifier_config": {"se": settings_for(root)},
        }
    )
    uv = Ultravisor(pki.host.key, parse_se_header(header).tags.to_bytes())
    with TestClient(create_app(config, clock=clock)) as client:
        yield client, uv


def _auth(client: TestClient, algorithms: list[str] | None = None) -> httpx.Response:
    extra = {"supported-hash-algorithms": algorithms} if algorithms is not None else {}
    reply: httpx.Response = client.post(
        AUTH, json={"version": PROTOCOL_VERSION, "tee": "se", "extra-params": extra}
    )
    return reply


def _attest(
    client: TestClient, uv: Ultravisor, nonce: str, *, digest: bytes | None = None
) -> httpx.Response:
    pubkey = TeeKey.generate().public_jwk()
    bound = runtime_data_digest(runtime_data(nonce, pubkey, ""), HashAlgorithm.SHA512)
    evidence = attest(nonce, digest or bound, uv)
    reply: httpx.Response = client.post(
        ATTEST,
        json={
            "init-data": None,
            "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
            "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
        },
    )
    return reply


def test_auth_with_tee_se_answers_upstreams_challenge(
    se_kbs: tuple[TestClient, Ultravisor],
) -> None:
    client, _ = se_kbs
    reply = _auth(client, ["sha384", "sha512"])
    assert reply.status_code == 200, reply.text
    challenge = reply.json()
    assert challenge["extra-params"] == {"selected-hash-algorithm": "sha512"}
    request = json.loads(challenge["nonce"])
    assert {"request_blob", "encr_measurement_key", "image_hdr_tags"} <= set(request)


def test_se_guest_attests_and_its_token_carries_se_claims(
    se_kbs: tuple[TestClient, Ultravisor],
) -> None:
    client, uv = se_kbs
    nonce = _auth(client, ["sha512"]).json()["nonce"]
    reply = _attest(client, uv, nonce)
    assert reply.status_code == 200, reply.text
    _, claims = decode_unverified(reply.json()["token"])
    cpu = obj(at(claims, "submods", "cpu0"))
    se = obj(at(cpu, "ear.veraison.annotated-evidence", "se"))
    assert se["version"] == 256 and se["image_dump_allowed"] is False
    assert cpu["ear.status"] == "affirming"


def test_guest_without_sha512_is_refused(se_kbs: tuple[TestClient, Ultravisor]) -> None:
    client, _ = se_kbs
    reply = _auth(client, ["sha384"])
    assert reply.status_code == 401
    assert "sha512" in reply.json()["detail"]


def test_response_bound_to_another_session_is_refused(
    se_kbs: tuple[TestClient, Ultravisor],
) -> None:
    client, uv = se_kbs
    nonce = _auth(client, ["sha512"]).json()["nonce"]
    reply = _attest(client, uv, nonce, digest=hashlib.sha512(b"elsewhere").digest())
    assert reply.status_code == 401
    assert "runtime data" in reply.json()["detail"]


def test_default_kbs_without_se_material_says_so(clock: FakeClock, tmp_path: Path) -> None:
    absent = {"host_key_documents_dir": str(tmp_path / "none")}
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": {"se": absent}}
    )
    with TestClient(create_app(config, clock=clock)) as client:
        reply = _auth(client)
    assert reply.status_code == 401
    assert "IBM SE is not set up" in reply.json()["detail"]

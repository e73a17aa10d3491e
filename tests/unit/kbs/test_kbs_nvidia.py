"""NVIDIA TEEs through the real KBS app: /auth on a default KBS, a BlueField DPU attesting with
a generated DICE chain, the recorded Hopper report refused for a session it does not bind, and
a GPU appraised through the NRAS stand-in."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from conftest import FakeClock, Kbs, kbs_config, vector
from json_shapes import at, obj
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.kbs.app import create_app
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.jws import decode_unverified
from nvidia_pki import dpu_pki, pem
from standins.nras import NrasStandIn
from standins.server import ServedApp


def _auth(client: TestClient, tee: str) -> str:
    reply = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": tee, "extra-params": {}})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["nonce"])


def _attest(client: TestClient, nonce: str, key: TeeKey, evidence: Any) -> Any:
    return client.post(
        "/kbs/v0/attest",
        json={
            "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
            "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
        },
    )


def test_auth_with_nvidia_answers_200_on_a_default_kbs(kbs: Kbs) -> None:
    assert len(base64.b64decode(_auth(kbs.client, "nvidia"))) == 32


def test_auth_with_nvidiadpu_answers_200_on_a_default_kbs(kbs: Kbs) -> None:
    assert len(base64.b64decode(_auth(kbs.client, "nvidiadpu"))) == 32


def test_recorded_hopper_report_does_not_bind_a_new_session(kbs: Kbs) -> None:
    nvidia = ("verifier", "nvidia")
    device = {
        "arch": "HOPPER",
        "evidence": vector(*nvidia, "hopperAttestationReport.txt").read_text(),
        "certificate": base64.b64encode(
            vector(*nvidia, "hopper_cert_chain_case1.txt").read_bytes()
        ).decode(),
    }
    nonce = _auth(kbs.client, "nvidia")
    reply = _attest(kbs.client, nonce, TeeKey.generate(), {"device_evidence_list": [device]})
    assert reply.status_code == 401
    assert "nonce does not bind" in reply.json()["detail"]


def test_dpu_without_a_configured_root_is_refused_with_the_reason(kbs: Kbs) -> None:
    now = datetime.datetime.fromtimestamp(kbs.clock.now, datetime.UTC)
    pki = dpu_pki(now, [hashlib.sha384(b"fw").digest()])
    nonce = _auth(kbs.client, "nvidiadpu")
    reply = _attest(kbs.client, nonce, TeeKey.generate(), pki.evidence(bytes(48)))
    assert reply.status_code == 401
    assert "no DPU root is configured" in reply.json()["detail"]


def test_dpu_attests_through_the_kbs_with_a_configured_root(
    tmp_path: Path, clock: FakeClock
) -> None:
    now = datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
    fwids = [hashlib.sha384(b"bootloader").digest(), hashlib.sha384(b"firmware").digest()]
    pki = dpu_pki(now, fwids)
    (tmp_path / "dpu-root.pem").write_bytes(pem(pki.root))
    verifier_config = {"nvidia_dpu_verifier": {"root_ca_cert_path": str(tmp_path / "dpu-root.pem")}}
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": verifier_config}
    )
    with TestClient(create_app(config, clock=clock)) as client:
        key = TeeKey.generate()
        nonce = _auth(client, "nvidiadpu")
        digest = runtime_data_digest(
            runtime_data(nonce, key.public_jwk(), ""), HashAlgorithm.SHA384
        )
        reply = _attest(client, nonce, key, pki.evidence(digest))
        assert reply.status_code == 200, reply.text
        _, claims = decode_unverified(reply.json()["token"])
        submod = obj(at(claims, "submods", "nvidia-dpu0"))
        dpu = obj(at(submod, "ear.veraison.annotated-evidence", "nvidiadpu"))
        assert dpu["accumulated_fwid"] == hashlib.sha384(b"".join(fwids)).hexdigest()
        assert dpu["session_nonce"] == digest.hex()
        # no reference values registered: the default policy does not vouch for the DPU
        assert submod["ear.status"] == "contraindicated"

        stale = _attest(client, _auth(client, "nvidiadpu"), key, pki.evidence(digest))
        assert stale.status_code == 401  # the previous session's nonce: refused


def test_gpu_appraised_by_nras_through_the_kbs_and_debug_is_not_affirmed(
    clock: FakeClock,
) -> None:
    """Remote mode end to end: KBS → production NRAS client → the NRAS STAND-IN over HTTP →
    default_gpu. The stand-in does not check report signatures, so the recorded report is
    given this session's nonce."""
    stand_in = NrasStandIn(clock=clock)
    server = ServedApp(stand_in.app())
    server.start()
    try:
        nvidia_verifier = {
            "type": "Remote",
            "verifier_url": f"{server.url}/v4/attest",
            "jwks_url": f"{server.url}/.well-known/jwks.json",
            "insecure_http": True,
        }
        config = kbs_config(
            attestation_service={
                "type": "coco_as_builtin",
                "verifier_config": {"nvidia_verifier": nvidia_verifier},
            }
        )
        report = bytes.fromhex(
            vector("verifier", "nvidia", "hopperAttestationReport.txt").read_text().strip()
        )
        with TestClient(create_app(config, clock=clock)) as client:

            def gpu_status() -> str:
                key = TeeKey.generate()
                nonce = _auth(client, "nvidia")
                digest = runtime_data_digest(
                    runtime_data(nonce, key.public_jwk(), ""), HashAlgorithm.SHA384
                )
                device = {
                    "arch": "HOPPER",
                    "evidence": (report[:4] + digest[:32] + report[36:]).hex(),
                    "certificate": base64.b64encode(b"chain").decode(),
                }
                reply = _attest(client, nonce, key, {"device_evidence_list": [device]})
                assert reply.status_code == 200, reply.text
                _, claims = decode_unverified(reply.json()["token"])
                gpu = obj(at(claims, "submods", "gpu0"))
                assert at(gpu, "ear.veraison.annotated-evidence", "nvidia", "secboot") is True
                return str(gpu["ear.status"])

            assert gpu_status() == "affirming"
            stand_in.claims["gpu"]["dbgstat"] = "enabled"
            assert gpu_status() == "warning"  # configuration 36: debug is never trusted
    finally:
        server.stop()


def test_dpu_as_additional_evidence_beside_a_cpu(tmp_path: Path, clock: FakeClock) -> None:
    """Composite evidence as upstream's guest sends it: the CPU binds the runtime data with
    the additional evidence, the DPU binds it without."""
    now = datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
    pki = dpu_pki(now, [hashlib.sha384(b"firmware").digest()])
    (tmp_path / "dpu-root.pem").write_bytes(pem(pki.root))
    verifier_config = {"nvidia_dpu_verifier": {"root_ca_cert_path": str(tmp_path / "dpu-root.pem")}}
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": verifier_config}
    )
    with TestClient(create_app(config, clock=clock)) as client:
        key = TeeKey.generate()
        nonce = _auth(client, "sample")
        device_digest = runtime_data_digest(
            runtime_data(nonce, key.public_jwk(), None), HashAlgorithm.SHA384
        )
        additional = json.dumps({"nvidiadpu": pki.evidence(device_digest)})
        cpu_digest = runtime_data_digest(
            runtime_data(nonce, key.public_jwk(), additional), HashAlgorithm.SHA384
        )
        reply = client.post(
            "/kbs/v0/attest",
            json={
                "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
                "tee-evidence": {
                    "primary_evidence": SampleAttester().evidence(cpu_digest),
                    "additional_evidence": additional,
                },
            },
        )
        assert reply.status_code == 200, reply.text
        _, claims = decode_unverified(reply.json()["token"])
        submods: dict[str, Any] = claims["submods"]  # type: ignore[assignment]
        assert sorted(submods) == ["cpu0", "nvidia-dpu0"]

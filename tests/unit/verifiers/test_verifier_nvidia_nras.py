"""NVIDIA remote mode: the production NRAS client and checks against the NRAS STAND-IN over real
HTTP, with upstream's recorded Hopper report as evidence; and the attacks on NRAS's answer."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import FakeClock, vector
from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.protocol.models import Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.base import Verifier
from keybroker.verifiers.nvidia.nras import ppcie_claims
from standins.nras import NrasStandIn
from standins.server import ServedApp

NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
CLOCK = FakeClock()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[NrasStandIn, ServedApp]]:
    stand_in = NrasStandIn(clock=CLOCK)
    server = ServedApp(stand_in.app())
    server.start()
    yield stand_in, server
    server.stop()


@pytest.fixture
def nras(served: tuple[NrasStandIn, ServedApp]) -> Iterator[tuple[NrasStandIn, Verifier]]:
    stand_in, server = served
    fresh = NrasStandIn(clock=CLOCK)
    stand_in.__dict__.update(fresh.__dict__)  # every test starts from a healthy NRAS
    config = {
        "nvidia_verifier": {
            "type": "Remote",
            "verifier_url": f"{server.url}/v4/attest",
            "jwks_url": f"{server.url}/.well-known/jwks.json",
            "insecure_http": True,
        }
    }
    yield stand_in, build_verifiers(config, clock=CLOCK)[Tee.NVIDIA]


def _device(arch: str = "HOPPER") -> dict[str, Any]:
    return {
        "arch": arch,
        "evidence": vector("verifier", "nvidia", "hopperAttestationReport.txt").read_text(),
        "certificate": base64.b64encode(
            vector("verifier", "nvidia", "hopper_cert_chain_case1.txt").read_bytes()
        ).decode(),
    }


def _verify(verifier: Verifier, *devices: dict[str, Any], report_data: bytes = NONCE) -> Any:
    return verifier.verify(
        {"device_evidence_list": list(devices or [_device()])},
        expected_report_data=report_data,
        expected_init_data=None,
    )


def test_nras_appraised_hopper_yields_nras_claims(nras: tuple[NrasStandIn, Verifier]) -> None:
    stand_in, verifier = nras
    (gpu,) = _verify(verifier)
    assert gpu.tee_class == "gpu"
    assert gpu.claims["x-nvidia-gpu-attestation-report-nonce-match"] is True
    assert gpu.claims["x-nvidia-overall-att-result"] is True
    assert gpu.claims["dbgstat"] == "disabled"
    request = stand_in.requests[-1]
    assert request["nonce"] == NONCE.hex() and request["arch"] == "HOPPER"
    assert request["claims_version"] == "3.0"
    # hex evidence is sent to NRAS as base64, as upstream does
    sent = base64.b64decode(request["evidence_list"][0]["evidence"])
    assert sent.hex() == _device()["evidence"].strip()


def test_wrong_nonce_is_refused(nras: tuple[NrasStandIn, Verifier]) -> None:
    with pytest.raises(EvidenceError, match="nonce does not bind"):
        _verify(nras[1], report_data=bytes(32))


def test_flipped_signature_byte_is_refused(nras: tuple[NrasStandIn, Verifier]) -> None:
    nras[0].flip_eat_signature = True
    with pytest.raises(EvidenceError, match="does not verify"):
        _verify(nras[1])


def test_answer_signed_by_a_key_outside_nras_jwks_is_refused(
    nras: tuple[NrasStandIn, Verifier],
) -> None:
    nras[0].sign_with = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(EvidenceError, match="does not verify"):
        _verify(nras[1])


def test_answer_naming_an_unknown_key_is_refused(nras: tuple[NrasStandIn, Verifier]) -> None:
    stand_in, verifier = nras
    stand_in.token_kid = "not-in-the-set"
    with pytest.raises(EvidenceError, match="not in NRAS's JWK set"):
        _verify(verifier)


def test_truncated_answer_is_refused(nras: tuple[NrasStandIn, Verifier]) -> None:
    nras[0].truncate = True
    with pytest.raises(EvidenceError, match="not JSON"):
        _verify(nras[1])


def test_expired_answer_is_refused(nras: tuple[NrasStandIn, Verifier]) -> None:
    nras[0].lifetime = -1
    with pytest.raises(EvidenceError, match="expired"):
        _verify(nras[1])


def test_nras_refusing_the_evidence_is_an_evidence_error(
    nras: tuple[NrasStandIn, Verifier],
) -> None:
    nras[0].fail_with = 400
    with pytest.raises(EvidenceError, match="HTTP 400"):
        _verify(nras[1])


def test_nras_failing_is_service_unavailable(nras: tuple[NrasStandIn, Verifier]) -> None:
    nras[0].fail_with = 503
    with pytest.raises(ServiceUnavailableError):
        _verify(nras[1])


def test_unreachable_nras_is_service_unavailable() -> None:
    config = {
        "nvidia_verifier": {
            "type": "remote",
            "verifier_url": "http://127.0.0.1:9/v4/attest",
            "jwks_url": "http://127.0.0.1:9/jwks.json",
            "insecure_http": True,
            "timeout": 2,
        }
    }
    verifier = build_verifiers(config, clock=CLOCK)[Tee.NVIDIA]
    with pytest.raises(ServiceUnavailableError, match="cannot be reached"):
        _verify(verifier)


def test_plain_http_nras_is_refused_at_start_up() -> None:
    config = {"nvidia_verifier": {"type": "Remote", "verifier_url": "http://nras.example"}}
    with pytest.raises(ConfigError, match="not HTTPS"):
        build_verifiers(config)


def test_switch_is_appraised_as_a_switch(nras: tuple[NrasStandIn, Verifier]) -> None:
    stand_in, verifier = nras
    (switch,) = _verify(verifier, _device("LS10"))
    assert switch.tee_class == "switch"
    assert switch.claims["x-nvidia-switch-attestation-report-nonce-match"] is True
    assert stand_in.requests[-1]["arch"] == "LS10"


def test_ppcie_topology_adds_a_ppcie_submodule(nras: tuple[NrasStandIn, Verifier]) -> None:
    stand_in, verifier = nras
    switches = [f"{i:016x}" for i in range(1, 5)]
    stand_in.claims["gpu"]["x-nvidia-gpu-switch-pdis"] = [*switches, "0" * 16]
    stand_in.claims["switch"] |= {
        "x-nvidia-switch-pdi": switches[0],
        "x-nvidia-switch-gpu-pdis": [f"{0x100 + i:016x}" for i in range(8)],
    }
    verified = _verify(verifier, *([_device()] * 8 + [_device("LS10")] * 4))
    assert [c.tee_class for c in verified].count("gpu") == 8
    assert verified[-1].tee_class == "ppcie"
    assert verified[-1].claims == {"switch_count": 4, "gpu_count": 8}


def test_incomplete_topology_is_no_ppcie_submodule(nras: tuple[NrasStandIn, Verifier]) -> None:
    verified = _verify(nras[1], _device(), _device())
    assert [c.tee_class for c in verified] == ["gpu", "gpu"]


def test_ppcie_gpu_linked_to_three_switches_is_not_a_topology() -> None:
    gpu = {"x-nvidia-gpu-switch-pdis": ["1" * 16, "2" * 16, "3" * 16, "0" * 16]}
    switch = {"x-nvidia-switch-pdi": "1" * 16, "x-nvidia-switch-gpu-pdis": ["a" * 16] * 8}
    with pytest.raises(EvidenceError, match="4 switches"):
        ppcie_claims([("gpu", gpu)] * 8 + [("switch", switch)] * 4)

"""The AS's SE challenge over its three doors: the KBS's gRPC client against a real gRPC
server (upstream's ``GetAttestationChallenge`` with ``{"tee", "tee_params"}``), and the
restful-as ``/challenge`` (upstream's flat map of strings)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from conftest import vector
from keybroker.attestation.grpc_client import GrpcAttestationService
from keybroker.attestation.grpc_server import build_server
from keybroker.attestation.rest_server import create_as_app
from keybroker.attestation.service import BuiltinAttestationService
from keybroker.cli.grpc_as import build_service
from keybroker.config import AttestationServiceFileConfig, GrpcAsConfig
from keybroker.protocol.models import Tee
from ports import free_port
from se_guest import SePki, settings_for, write_material


@pytest.fixture
def service(tmp_path: Path) -> BuiltinAttestationService:
    header = vector("verifier", "se", "secure_guest.hdr").read_bytes()
    root = write_material(
        tmp_path / "ibmse", SePki(), header, rsa.generate_private_key(65537, 2048)
    )
    config = AttestationServiceFileConfig(verifier_config={"se": settings_for(root)})
    return build_service(config)


def _is_se_request(text: str) -> bool:
    request = json.loads(text)
    return isinstance(request, dict) and "request_blob" in request


def test_grpc_client_gets_an_se_request_from_the_grpc_server(
    service: BuiltinAttestationService,
) -> None:
    port = free_port()

    async def run() -> tuple[str | None, str | None]:
        server = build_server(service, f"127.0.0.1:{port}")
        await server.start()
        try:
            client = GrpcAttestationService(
                GrpcAsConfig(type="coco_as_grpc", as_addr=f"http://127.0.0.1:{port}")
            )
            return await client.challenge(Tee.SE, {}), await client.challenge(Tee.SAMPLE, {})
        finally:
            await server.stop(None)

    se, sample = asyncio.run(run())
    assert se is not None and _is_se_request(se)
    assert sample is None  # the KBS draws its own random nonce, as upstream


def test_restful_as_challenge_for_se_and_for_others(service: BuiltinAttestationService) -> None:
    with TestClient(create_as_app(service)) as client:
        se = client.post("/challenge", json={"tee": "se", "tee_params": "{}"})
        assert se.status_code == 200 and _is_se_request(se.text)
        sample = client.post("/challenge", json={"tee": "sample", "tee_params": "{}"})
        assert len(base64.b64decode(sample.text)) == 32
        assert client.post("/challenge", json={"tee": "z80"}).status_code == 400
        assert client.post("/challenge", json={"tee": ["se"]}).status_code == 400


def test_builtin_service_makes_challenges_for_se_only(service: BuiltinAttestationService) -> None:
    se = asyncio.run(service.challenge(Tee.SE, {}))
    assert se is not None and _is_se_request(se)
    assert asyncio.run(service.challenge(Tee.SAMPLE, {})) is None

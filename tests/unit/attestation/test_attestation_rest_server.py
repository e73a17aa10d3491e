"""restful-as through its HTTP API, and its OpenAPI description matching its routes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.routing import Route
from starlette.testclient import TestClient

from keybroker.attestation.rest_server import create_as_app
from keybroker.cli.grpc_as import build_service
from keybroker.config import AttestationServiceFileConfig

OPENAPI = Path(__file__).resolve().parents[3] / "docs" / "restful-as-openapi.yaml"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_as_app(build_service(AttestationServiceFileConfig()))) as test_client:
        yield test_client


def _request(report_data: bytes, bound: bytes) -> dict[str, object]:
    evidence = json.dumps({"svn": "1", "report_data": base64.b64encode(report_data).decode()})
    return {
        "verification_requests": [
            {
                "tee": "sample",
                "evidence": _b64url(evidence.encode()),
                "runtime_data": {"raw": _b64url(bound)},
            }
        ],
        "policy_ids": [],
    }


def test_attestation_policy_challenge_and_jwks(client: TestClient) -> None:
    report_data = bytes(range(48))
    reply = client.post("/attestation", json=_request(report_data, report_data))
    assert reply.status_code == 200 and reply.text.count(".") == 2
    refused = client.post("/attestation", json=_request(report_data, b"other"))
    assert refused.status_code == 400 and "report_data" in refused.json()["detail"]
    policy = _b64url(b'package policy\ntrust_claims := {"hardware": 2}\n')
    assert (
        client.post("/policy", json={"policy_id": "mine_cpu", "policy": policy}).status_code == 200
    )
    assert {"policy-id": "mine_cpu"} in client.get("/policy").json()
    bad = client.post(
        "/policy", json={"policy_id": "x", "policy": _b64url(b"package policy\na := {")}
    )
    assert bad.status_code == 400
    assert len(base64.b64decode(client.post("/challenge", json={"tee": "sample"}).text)) == 32
    assert client.get("/.well-known/jwks.json").json()["keys"][0]["alg"] == "ES256"
    assert client.post("/attestation", content=b"{").status_code == 400


def test_get_policy_lists_objects_with_policy_id_as_upstream(client: TestClient) -> None:
    listed = client.get("/policy").json()
    assert {"policy-id": "default_cpu"} in listed
    assert all(list(item) == ["policy-id"] for item in listed)


def _preflight(client: TestClient, origin: str) -> httpx.Response:
    reply: httpx.Response = client.options(
        "/attestation",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    return reply


def test_allowed_origin_gets_cors_headers() -> None:
    app = create_as_app(build_service(AttestationServiceFileConfig()), ["https://ui.example"])
    with TestClient(app) as cors_client:
        preflight = _preflight(cors_client, "https://ui.example")
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        assert set(preflight.headers["access-control-allow-methods"].split(", ")) == {
            "GET",
            "POST",
            "OPTIONS",
        }
        assert preflight.headers["access-control-max-age"] == "86400"
        listed = cors_client.get("/policy", headers={"Origin": "https://ui.example"})
        assert listed.headers["access-control-allow-origin"] == "https://ui.example"


def test_other_origin_gets_no_cors_headers() -> None:
    app = create_as_app(build_service(AttestationServiceFileConfig()), ["https://ui.example"])
    with TestClient(app) as cors_client:
        assert _preflight(cors_client, "https://evil.example").status_code == 400
        listed = cors_client.get("/policy", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in listed.headers


def test_no_allowed_origin_means_no_cors_headers(client: TestClient) -> None:
    listed = client.get("/policy", headers={"Origin": "https://ui.example"})
    assert "access-control-allow-origin" not in listed.headers
    assert _preflight(client, "https://ui.example").status_code == 405


def test_openapi_describes_exactly_the_routes(client: TestClient) -> None:
    document = yaml.safe_load(OPENAPI.read_text())
    routes = {
        (route.path, method.lower())
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, Route)
        for method in (route.methods or set())
        if method != "HEAD"
    }
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == routes

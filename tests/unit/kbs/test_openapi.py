"""The OpenAPI document and the code stay in step.

Every endpoint the dispatcher serves is in the document and every operation in the document is
answered by its endpoint (never the "no such endpoint" 404 nor a 405); methods the document does
not list answer 405 with exactly the listed ones in ``Allow``; the schemas of the wire models
agree with the pydantic models that parse them; every status an error can carry is documented.
Plus the regression tests of what schemathesis found (tests/e2e/test_e2e_openapi.py).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker import errors
from keybroker.config import Pkcs11PluginConfig, ResourcePluginConfig, SamplePluginConfig
from keybroker.kbs.admin_api import ADMIN_ENDPOINTS
from keybroker.kbs.app import create_app
from keybroker.kbs.console import CONSOLE
from keybroker.kbs.explain import ExplainRequest
from keybroker.kbs.openapi import SPEC_NAME, document
from keybroker.protocol import models

METHODS = ("get", "post", "put", "delete", "patch")
PREFIX = "/kbs/v0/"
# Plugins configured in the app below; pkcs11 needs an HSM and is exercised by
# tests/e2e/test_e2e_pkcs11.py, so here its operations must answer "plugin not configured".
UNCONFIGURED = {"pkcs11"}


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document()["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "a", path)


@pytest.fixture
def client(tmp_path: Any) -> Iterator[TestClient]:
    config = kbs_config(
        plugins=[
            {"name": "resource", "type": "LocalFs", "dir_path": str(tmp_path / "resources")},
            {"name": "sample", "item": "x"},
        ],
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path / "store")}},
        },
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        yield client


def test_document_is_valid_openapi_3_1() -> None:
    assert document()["openapi"] == "3.1.0"
    validate(document())


def test_served_document_is_the_packaged_one(client: TestClient) -> None:
    reply = client.get(PREFIX + SPEC_NAME)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == document()


def _served_endpoint_names() -> set[str]:
    plugin_names = {
        name
        for model in (ResourcePluginConfig, Pkcs11PluginConfig, SamplePluginConfig)
        for name in typing.get_args(model.model_fields["name"].annotation)
    }
    return {"auth", "attest", SPEC_NAME, CONSOLE} | set(ADMIN_ENDPOINTS) | plugin_names


def test_every_served_endpoint_is_in_the_document_and_nothing_else() -> None:
    documented = {p[len(PREFIX) :].split("/")[0] for p in document()["paths"] if p[:8] == PREFIX}
    assert documented == _served_endpoint_names()


def test_every_router_route_is_in_the_document(client: TestClient) -> None:
    paths = document()["paths"]
    for route in client.app.routes:  # type: ignore[attr-defined]
        assert isinstance(route, Route)
        prefix = route.path.split("{", 1)[0]
        assert any(
            p == route.path or (prefix != route.path and p.startswith(prefix)) for p in paths
        )


@pytest.mark.parametrize(("path", "method"), [(p, m) for p, m, _ in _operations()])
def test_every_documented_operation_is_answered_by_its_endpoint(
    client: TestClient, path: str, method: str
) -> None:
    reply = client.request(method.upper(), _concrete(path), content=b"{}")
    problem_type = reply.json().get("type", "") if reply.status_code >= 400 else ""
    documented = document()["paths"][path][method]["responses"]
    assert str(reply.status_code) in documented, reply.text
    assert reply.status_code != 405, reply.text
    if path.split("/")[3:4] == ["pkcs11"]:
        assert problem_type.endswith("/PluginNotFound")
    else:
        assert not problem_type.endswith(("/PluginNotFound", "/InvalidRequestPath")), reply.text


@pytest.mark.parametrize(
    "path", [p for p in document()["paths"] if p.split("/")[3:4] != list(UNCONFIGURED)]
)
def test_undocumented_methods_answer_405_with_the_documented_ones_in_allow(
    client: TestClient, path: str
) -> None:
    declared = {m.upper() for m in METHODS if m in document()["paths"][path]}
    if "GET" in declared and path in ("/healthz", "/metrics", PREFIX + SPEC_NAME):
        declared.add("HEAD")  # served by the router (healthz, metrics) or with GET (the document)
    for method in sorted({m.upper() for m in METHODS} - declared):
        reply = client.request(method, _concrete(path))
        assert reply.status_code == 405, (method, reply.text)
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["type"].endswith("/MethodNotAllowed")
        allowed = {m.strip() for m in reply.headers["allow"].split(",")}
        assert allowed == declared, (method, path)


SCHEMA_OF_MODEL: list[tuple[type[BaseModel], str]] = [
    (models.Request, "Request"),
    (models.Challenge, "Challenge"),
    (models.Attestation, "Attestation"),
    (models.InitData, "InitData"),
    (models.RuntimeData, "RuntimeData"),
    (models.CompositeEvidence, "CompositeEvidence"),
    (models.AttestationResponse, "AttestationToken"),
    (ExplainRequest, "ExplainRequest"),
]


@pytest.mark.parametrize(("model", "name"), SCHEMA_OF_MODEL, ids=[n for _, n in SCHEMA_OF_MODEL])
def test_wire_model_and_schema_agree(model: type[BaseModel], name: str) -> None:
    generated = model.model_json_schema(by_alias=True)
    written = document()["components"]["schemas"][name]
    assert set(written["properties"]) == set(generated["properties"])
    assert set(written.get("required", [])) == set(generated.get("required", []))
    for field, spec in written["properties"].items():
        if "pattern" in generated["properties"][field]:
            assert spec["pattern"] == generated["properties"][field]["pattern"]


def test_tee_enum_is_the_models() -> None:
    written = document()["components"]["schemas"]["Tee"]["enum"]
    assert written == [tee.value for tee in models.Tee]


def _served_errors() -> set[type[errors.KeybrokerError]]:
    """Every error class the KBS can render (not start-up or client-side ones)."""
    found, todo = set(), [errors.KeybrokerError]
    while todo:
        cls = todo.pop()
        if issubclass(cls, errors.ConfigError | errors.ClientError):
            continue
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_status_is_documented_as_a_problem() -> None:
    documented: set[int] = set()
    responses = document()["components"]["responses"]
    for _path, _method, operation in _operations():
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                documented.add(int(status))
                name = response["$ref"].rsplit("/", 1)[1] if "$ref" in response else None
                body = responses[name] if name else response
                schema = body["content"]["application/problem+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}
    assert {cls.status for cls in _served_errors()} <= documented


def test_problem_schema_accepts_every_variant() -> None:
    schemas = document()["components"]["schemas"]
    pattern = re.compile(schemas["Problem"]["properties"]["type"]["pattern"])
    for cls in _served_errors():
        assert pattern.fullmatch(f"{errors.ERROR_TYPE_PREFIX}/{cls.variant}"), cls


# --- regressions found by schemathesis ----------------------------------------------------------


def test_reference_value_id_outside_the_key_alphabet_is_a_400_not_a_500(
    client: TestClient,
) -> None:
    reply = client.get("/kbs/v0/reference-value/%F0%97%A9%AC%5Cg")
    assert reply.status_code == 400
    assert reply.json()["type"].endswith("/MalformedRequest")


def test_reference_value_id_too_long_for_a_file_name_is_not_found(client: TestClient) -> None:
    reply = client.get("/kbs/v0/reference-value/0%2F" + "0" * 300)
    assert reply.status_code == 404
    assert reply.json()["type"].endswith("/ResourceNotFound")


def test_reference_value_post_with_an_id_is_405(client: TestClient) -> None:
    reply = client.post("/kbs/v0/reference-value/some-id", content=b"{}")
    assert reply.status_code == 405
    assert reply.headers["allow"] == "GET, DELETE"


def test_explain_with_an_invalid_policy_id_is_a_400(client: TestClient) -> None:
    body = {"kind": "attestation", "policy_id": "", "input": {}}
    reply = client.post("/kbs/v0/policy-explain", json=body)
    assert reply.status_code == 400


def test_explain_with_an_unknown_policy_id_is_a_404(client: TestClient) -> None:
    body = {"kind": "attestation", "policy_id": "nobody-set-this", "input": {}}
    reply = client.post("/kbs/v0/policy-explain", json=body)
    assert reply.status_code == 404
    assert "nobody-set-this" in reply.json()["detail"]


def test_options_on_auth_is_405_allow_post(client: TestClient) -> None:
    reply = client.options("/kbs/v0/auth")
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"


def test_unknown_path_outside_kbs_is_a_problem_404(client: TestClient) -> None:
    reply = client.get("/nowhere")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"].endswith("/NotFound")

"""Reading back, listing and deleting policies and reference values, through the real app.

Policies come back in their upload form (``{"policy": "<base64url>"}``), so a read-back can
be posted again; deleting a default attestation policy installs the shipped text again, on
every replica sharing the store; a remote attestation service or RVPS says clearly what it
cannot do; every call is audited.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.attestation.policy import builtin_attestation_policy
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy

CUSTOM_CPU = """package policy
import rego.v1
default trust_claims := {"executables": 77}
"""


def _store(tmp_path: Path) -> dict[str, object]:
    """A file store two apps (two replicas) can share."""
    return {
        "storage_type": "LocalFs",
        "backends": {"local_fs": {"dir_path": str(tmp_path / "store")}},
    }


def _app(tmp_path: Path, **sections: object) -> TestClient:
    config = kbs_config(
        storage_backend=_store(tmp_path),
        audit={"path": str(tmp_path / "audit.log"), "fsync": "never"},
        plugins=[{"name": "resource", "type": "LocalFs", "dir_path": str(tmp_path / "res")}],
        **sections,
    )
    return TestClient(create_app(config))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _app(tmp_path) as client:
        yield client


def _admin(client: TestClient) -> AdminClient:
    return AdminClient("http://testserver", http=client)


def _decoded(reply: dict[str, Any]) -> str:
    encoded = reply["policy"]
    assert "=" not in encoded  # base64url without padding, as uploaded
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


def _vector(token: str) -> dict[str, int]:
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    vector: dict[str, int] = claims["submods"]["cpu0"]["ear.trustworthiness-vector"]
    return vector


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_global_resource_policy_reads_back_in_its_upload_form(client: TestClient) -> None:
    assert _admin(client).get_resource_policy() == builtin_policy("default")
    _admin(client).set_resource_policy(builtin_policy("allow_all"))
    reply = client.get("/kbs/v0/resource-policy/resource-policy")
    assert reply.status_code == 200
    assert _decoded(reply.json()) == builtin_policy("allow_all")
    again = client.post("/kbs/v0/resource-policy", json=reply.json())  # posted back unchanged
    assert again.status_code == 200


def test_resource_policy_list_keeps_upstreams_answer(client: TestClient) -> None:
    _admin(client).set_resource_policy(builtin_policy("allow_all"))
    assert client.get("/kbs/v0/resource-policy").json() == ["resource-policy"]


def test_global_policy_read_path_answers_get_only(client: TestClient) -> None:
    body = {"policy": base64.urlsafe_b64encode(b"package policy").decode()}
    for method in ("POST", "DELETE"):
        reply = client.request(method, "/kbs/v0/resource-policy/resource-policy", json=body)
        assert reply.status_code == 405
        assert reply.headers["allow"] == "GET"
        assert "POST /kbs/v0/resource-policy" in reply.json()["detail"]


def test_attestation_policies_are_listed_read_back_and_deleted(client: TestClient) -> None:
    admin = _admin(client)
    assert {"default_cpu", "default_gpu"} <= set(admin.list_attestation_policies())
    admin.set_attestation_policy(CUSTOM_CPU, policy_id="custom_cpu")
    assert "custom_cpu" in admin.list_attestation_policies()
    reply = client.get("/kbs/v0/attestation-policy/custom_cpu").json()
    assert reply["type"] == "rego" and reply["policy_id"] == "custom_cpu"
    assert _decoded(reply) == CUSTOM_CPU
    assert client.post("/kbs/v0/attestation-policy", json=reply).status_code == 200  # round trip
    assert admin.delete_attestation_policy("custom_cpu") is False  # no shipped default to restore
    assert "custom_cpu" not in admin.list_attestation_policies()
    with pytest.raises(KbsRejectedError) as gone:
        admin.get_attestation_policy("custom_cpu")
    assert gone.value.http_status == 404 and "custom_cpu" in gone.value.detail
    with pytest.raises(KbsRejectedError) as again:
        admin.delete_attestation_policy("custom_cpu")
    assert again.value.http_status == 404


def test_deleting_a_default_attestation_policy_restores_the_shipped_one_on_every_replica(
    tmp_path: Path,
) -> None:
    with _app(tmp_path) as first, _app(tmp_path) as second:
        _admin(first).set_attestation_policy(CUSTOM_CPU, policy_id="default_cpu")
        assert _admin(second).get_attestation_policy("default_cpu") == CUSTOM_CPU
        token = KbsClient("http://testserver", http=second).attest()  # compiled CUSTOM_CPU
        assert _vector(token) == {"executables": 77}
        assert _admin(first).delete_attestation_policy("default_cpu") is True
        shipped = builtin_attestation_policy("default_cpu")
        assert _admin(second).get_attestation_policy("default_cpu") == shipped
        token = KbsClient("http://testserver", http=second).attest()  # the shipped policy again
        assert _vector(token)["executables"] != 77 and "hardware" in _vector(token)


@pytest.mark.parametrize("policy_id", ["..", "a.b", "a%2F..%2Fb", "x" * 129, "a%00"])
def test_attestation_policy_id_with_traversal_or_odd_characters_is_refused(
    client: TestClient, policy_id: str
) -> None:
    for method in ("GET", "DELETE"):
        reply = client.request(method, f"/kbs/v0/attestation-policy/{policy_id}")
        assert reply.status_code in (400, 404), reply.text
        assert reply.status_code == 400 or policy_id == ".."
        if reply.status_code == 400:
            assert "invalid attestation policy id" in reply.json()["detail"]


def test_reference_values_are_listed_and_deleted(client: TestClient) -> None:
    admin = _admin(client)
    admin.set_sample_reference_value("svn", ["1"])
    admin.set_sample_reference_value("launch_digest", ["abc"])
    assert admin.list_reference_values() == ["launch_digest", "svn"]
    admin.delete_reference_value("svn")
    assert admin.list_reference_values() == ["launch_digest"]
    with pytest.raises(KbsRejectedError) as gone:
        admin.get_reference_value("svn")
    assert gone.value.http_status == 404
    with pytest.raises(KbsRejectedError) as again:
        admin.delete_reference_value("svn")
    assert again.value.http_status == 404 and "svn" in again.value.detail


def test_reference_value_delete_with_traversal_is_refused(client: TestClient) -> None:
    _admin(client).set_sample_reference_value("svn", ["1"])
    reply = client.delete("/kbs/v0/reference-value/..%2Fkbs%2Fresource-policy.rego")
    assert reply.status_code == 400
    assert client.get("/kbs/v0/resource-policy/resource-policy").status_code == 200


def test_remote_rvps_cannot_list_or_delete_and_says_so(tmp_path: Path) -> None:
    remote = {
        "type": "coco_as_builtin",
        "rvps_config": {"type": "GrpcRemote", "address": "127.0.0.1:9"},
    }
    with _app(tmp_path, attestation_service=remote) as client:
        for method, path in (("GET", "reference-value"), ("DELETE", "reference-value/svn")):
            reply = client.request(method, f"/kbs/v0/{path}")
            assert reply.status_code == 405, reply.text
            detail = reply.json()["detail"]
            assert "remote RVPS at 127.0.0.1:9" in detail and "only query and register" in detail


def test_remote_attestation_service_policies_cannot_be_read_and_says_so(tmp_path: Path) -> None:
    remote = {"type": "coco_as_grpc", "as_addr": "http://127.0.0.1:9"}
    tokens = {"insecure_header_jwk": True}
    with _app(tmp_path, attestation_service=remote, attestation_token=tokens) as client:
        for method, path in (
            ("GET", "attestation-policy"),
            ("GET", "attestation-policy/default_cpu"),
            ("DELETE", "attestation-policy/default_cpu"),
            ("GET", "reference-value"),
        ):
            reply = client.request(method, f"/kbs/v0/{path}")
            assert reply.status_code == 405, reply.text
            assert "127.0.0.1:9" in reply.json()["detail"] or "rvps_addr" in reply.json()["detail"]


def test_resource_only_kbs_has_no_attestation_policies(tmp_path: Path) -> None:
    passport = {"type": "none"}
    tokens = {"insecure_header_jwk": True}
    with _app(tmp_path, attestation_service=passport, attestation_token=tokens) as client:
        for path in ("attestation-policy", "attestation-policy/default_cpu", "reference-value"):
            reply = client.get(f"/kbs/v0/{path}")
            assert reply.status_code == 404
            assert "no attestation service" in reply.json()["detail"]


def test_every_read_back_and_delete_is_audited(tmp_path: Path, client: TestClient) -> None:
    admin = _admin(client)
    admin.set_sample_reference_value("svn", ["1"])
    admin.list_attestation_policies()
    admin.get_attestation_policy("default_cpu")
    admin.delete_attestation_policy("default_gpu")
    admin.list_reference_values()
    admin.delete_reference_value("svn")
    admin.get_resource_policy()
    client.get("/kbs/v0/attestation-policy/nope")  # a failure is recorded too
    seen = {(r["action"], r["target"], r["decision"]) for r in _audit(tmp_path)}
    assert {
        ("admin GET attestation-policy", "", "allow"),
        ("admin GET attestation-policy", "default_cpu", "allow"),
        ("admin DELETE attestation-policy", "default_gpu", "allow"),
        ("admin GET reference-value", "", "allow"),
        ("admin DELETE reference-value", "svn", "allow"),
        ("admin GET resource-policy", "resource-policy", "allow"),
        ("admin GET attestation-policy", "nope", "failure"),
    } <= seen
    assert "package policy" not in (tmp_path / "audit.log").read_text()  # never a policy body

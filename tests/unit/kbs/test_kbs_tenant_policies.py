"""Tenant resource policies: attached to a repository prefix, the most specific prefix decides,
the global policy decides elsewhere; admins confined to a prefix by the regex ACLs.

Everything goes through the real app (HTTP API, sample guests attesting, the policy workers).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.testclient import TestClient

from admin_tokens import NOW, mint
from admin_tokens import write_public_pem as pem
from conftest import FakeClock, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs import resource_policy
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.plugins.base import PluginRequest
from keybroker.plugins.nebula_ca import NebulaCaPlugin
from keybroker.plugins.pkcs11 import Pkcs11Plugin
from keybroker.plugins.sample import SamplePlugin
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.secrets import KvSecretBackend

ALLOW, DENY = builtin_policy("allow_all"), builtin_policy("deny_all")


def _app(tmp_path: Path, **sections: object) -> TestClient:
    """An app over a file store: two apps on one ``tmp_path`` are two replicas."""
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path / "store")}},
        },
        audit={"path": str(tmp_path / "audit.log"), "fsync": "never"},
        plugins=[{"name": "resource", "type": "LocalFs", "dir_path": str(tmp_path / "res")}],
        **sections,
    )
    return TestClient(create_app(config, clock=FakeClock(NOW)))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _app(tmp_path) as client:
        yield client


def _admin(client: TestClient, token: str | None = None) -> AdminClient:
    return AdminClient("http://testserver", http=client, token=token)


def _guest(client: TestClient) -> KbsClient:
    return KbsClient("http://testserver", http=client)


def _released(client: TestClient, path: str) -> bool:
    try:
        _guest(client).get_resource(path)
    except KbsRejectedError as e:
        assert e.http_status == 403, e.detail
        return False
    return True


def _secrets(client: TestClient, *repositories: str) -> None:
    for repository in repositories:
        _admin(client).set_resource(f"{repository}/key/one", repository.encode())


def _body(rego: str) -> dict[str, str]:
    return {"policy": base64.urlsafe_b64encode(rego.encode()).decode().rstrip("=")}


def test_tenant_policy_is_set_read_back_listed_and_deleted(client: TestClient) -> None:
    admin = _admin(client)
    admin.set_resource_policy(DENY, prefix="tenant-a")
    admin.set_resource_policy(ALLOW, prefix="tenant-a/keys")
    assert admin.get_resource_policy("tenant-a") == DENY
    assert admin.get_resource_policy("tenant-a/keys") == ALLOW
    assert admin.list_resource_policies() == ["resource-policy", "tenant-a", "tenant-a/keys"]
    admin.delete_resource_policy("tenant-a")
    with pytest.raises(KbsRejectedError) as gone:
        admin.get_resource_policy("tenant-a")
    assert gone.value.http_status == 404 and "tenant-a" in gone.value.detail
    with pytest.raises(KbsRejectedError) as again:
        admin.delete_resource_policy("tenant-a")
    assert again.value.http_status == 404
    assert admin.list_resource_policies() == ["resource-policy", "tenant-a/keys"]


def test_guest_denied_by_tenant_policy_is_allowed_by_global_policy_elsewhere(
    tmp_path: Path, client: TestClient
) -> None:
    _secrets(client, "tenant-a", "default")
    _admin(client).set_resource_policy(ALLOW)
    _admin(client).set_resource_policy(DENY, prefix="tenant-a")
    assert _released(client, "default/key/one")
    assert not _released(client, "tenant-a/key/one")
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    denial = next(r for r in records if r["decision"] == "deny" and r["action"].startswith("rel"))
    assert denial["target"] == "tenant-a/key/one"
    assert denial["reason"] == "denied by the resource policy tenant-a"


def test_most_specific_prefix_wins(client: TestClient) -> None:
    admin = _admin(client)
    _secrets(client, "tenant-a")
    admin.set_resource("tenant-a/restricted/one", b"r")
    admin.set_resource_policy(DENY)
    admin.set_resource_policy(ALLOW, prefix="tenant-a")
    admin.set_resource_policy(DENY, prefix="tenant-a/restricted")
    assert _released(client, "tenant-a/key/one")
    assert not _released(client, "tenant-a/restricted/one")  # repo/type beats repo
    admin.delete_resource_policy("tenant-a/restricted")
    assert _released(client, "tenant-a/restricted/one")  # now the repository's policy
    admin.delete_resource_policy("tenant-a")
    assert not _released(client, "tenant-a/key/one")  # and then the global one


def test_tenant_policy_cannot_widen_another_tenant(client: TestClient) -> None:
    admin = _admin(client)
    _secrets(client, "tenant-a", "tenant-b", "tenant-a-evil", "tenant")
    admin.set_resource_policy(DENY)
    admin.set_resource_policy(ALLOW, prefix="tenant-a")
    assert _released(client, "tenant-a/key/one")
    # prefixes match whole segments: "tenant-a" is no prefix of "tenant-a-evil" or "tenant"
    for other in ("tenant-b", "tenant-a-evil", "tenant"):
        assert not _released(client, f"{other}/key/one"), other
    # and a repository/type policy under tenant-a stays under tenant-a
    admin.set_resource_policy(ALLOW, prefix="tenant-b/key")
    admin.set_resource_policy(DENY, prefix="tenant-a/key")
    assert not _released(client, "tenant-a/key/one")
    assert _released(client, "tenant-b/key/one")


@pytest.mark.parametrize(
    "raw_prefix",
    [
        "..%2Ftenant-b",
        "tenant-a%2F..%2Ftenant-b",
        "tenant-a%2Fkeys",
        ".hidden",
        "%2E%2E",
        "a%20b",
        "a%00",
        "a%3Fb",
        "x" * 129,
        "a/b/c",
        "tenant-a/",
        "resource-policy/x",
    ],
)
def test_tenant_prefix_with_traversal_or_odd_characters_is_refused(
    client: TestClient, raw_prefix: str
) -> None:
    reply = client.post(f"/kbs/v0/resource-policy/{raw_prefix}", json=_body(ALLOW))
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert "prefix" in detail or "global policy" in detail
    assert _admin(client).list_resource_policies() == ["resource-policy"]  # nothing stored


def test_tenant_policy_that_does_not_compile_is_refused_before_storing(client: TestClient) -> None:
    reply = client.post(
        "/kbs/v0/resource-policy/tenant-a", json=_body("package policy\nallow if {")
    )
    assert reply.status_code == 400
    assert client.get("/kbs/v0/resource-policy/tenant-a").status_code == 404


def test_tenant_policy_count_is_bounded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource_policy, "MAX_TENANT_POLICIES", 2)
    admin = _admin(client)
    admin.set_resource_policy(ALLOW, prefix="one")
    admin.set_resource_policy(ALLOW, prefix="two")
    with pytest.raises(KbsRejectedError) as refused:
        admin.set_resource_policy(ALLOW, prefix="three")
    assert refused.value.http_status == 400 and "delete one first" in refused.value.detail
    admin.set_resource_policy(DENY, prefix="two")  # replacing one is not a new one
    assert admin.get_resource_policy("two") == DENY


def test_tenant_policy_changes_are_enforced_by_another_replica(tmp_path: Path) -> None:
    with _app(tmp_path) as first, _app(tmp_path) as second:
        _secrets(first, "tenant-a")
        _admin(first).set_resource_policy(ALLOW)
        assert _released(second, "tenant-a/key/one")  # compiled and cached by the second
        _admin(first).set_resource_policy(DENY, prefix="tenant-a")
        assert not _released(second, "tenant-a/key/one")
        _admin(first).set_resource_policy(ALLOW, prefix="tenant-a")
        assert _released(second, "tenant-a/key/one")
        _admin(first).set_resource_policy(DENY)
        _admin(first).delete_resource_policy("tenant-a")
        assert not _released(second, "tenant-a/key/one")


def test_explain_evaluates_the_policy_a_guest_would_meet(client: TestClient) -> None:
    admin = _admin(client)
    admin.set_resource_policy(ALLOW)
    admin.set_resource_policy(DENY, prefix="tenant-a")
    for path, policy_id, allowed in (
        (["tenant-a", "key", "one"], "tenant-a", False),
        (["default", "key", "one"], "resource-policy", True),
        (["tenant-a", "key"], "resource-policy", True),  # no resource path: the global policy
    ):
        result = admin.explain_policy(
            {
                "kind": "resource",
                "input": {},
                "data": {"plugin": "resource", "resource-path": path, "query": {}},
            }
        )
        assert result["policy_id"] == policy_id, path
        assert result["decision"] == {"allow": allowed}, path


def test_only_repository_path_plugins_have_tenant_policies() -> None:
    request = PluginRequest(method="GET", path=("tenant-a", "key", "one"))
    assert SamplePlugin("x").repository_path(request) is None
    assert NebulaCaPlugin.repository_path(None, request) is None  # type: ignore[arg-type]
    pkcs11 = Pkcs11Plugin(KvSecretBackend.in_namespaces(lambda _ns: MemoryKeyValueStorage()))
    wrapped = PluginRequest(method="GET", path=("resource", "tenant-a", "key", "one"))
    assert pkcs11.repository_path(wrapped) == ResourcePath("tenant-a", "key", "one")


def test_tenant_policy_changes_are_audited(tmp_path: Path, client: TestClient) -> None:
    admin = _admin(client)
    admin.set_resource_policy(ALLOW, prefix="tenant-a/keys")
    admin.get_resource_policy("tenant-a/keys")
    admin.delete_resource_policy("tenant-a/keys")
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    seen = [(r["action"], r["target"], r["decision"]) for r in records]
    for method in ("POST", "GET", "DELETE"):
        assert (f"admin {method} resource-policy", "tenant-a/keys", "allow") in seen


# --- an admin confined to a tenant by the regex ACLs (the pattern docs/admin.md gives) --------


def _documented_acl() -> str:
    """The tenant-a pattern exactly as docs/admin.md ("Confining an admin to a tenant") gives it."""
    docs = Path(__file__).parents[3] / "docs" / "admin.md"
    [line] = [line for line in docs.read_text().splitlines() if 'role = "tenant-a-admin"' in line]
    return line.split("allowed_endpoints = '")[1].split("'")[0]


TENANT_A_ACL = _documented_acl()


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    """A KBS with a full admin and a tenant-a admin; yields it with both tokens."""
    key = ed25519.Ed25519PrivateKey.generate()
    admin: dict[str, Any] = {
        "authorization_mode": "AuthenticatedAuthorization",
        "authentication": {
            "bearer_jwt": {
                "identity_providers": [
                    {"issuer": "admin1-issuer", "public_key_uri": str(pem(key, tmp_path / "k"))}
                ]
            }
        },
        "authorization": {
            "regex_acl": {
                "acls": [
                    {"role": "admin", "allowed_endpoints": "^/kbs/v0/.+$"},
                    {"role": "tenant-a-admin", "allowed_endpoints": TENANT_A_ACL},
                ]
            }
        },
    }
    with _app(tmp_path, admin=admin) as client:
        yield client, mint(key), mint(key, role="tenant-a-admin")


def _status(client: TestClient, method: str, path: str, token: str, body: Any = None) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if isinstance(body, bytes):
        reply = client.request(method, path, content=body, headers=headers)
    else:
        reply = client.request(method, path, json=body, headers=headers)
    status: int = reply.status_code
    return status


def test_tenant_admin_reads_and_writes_its_own_secrets_and_policy(
    confined: tuple[TestClient, str, str],
) -> None:
    client, _, tenant_a = confined
    assert _status(client, "POST", "/kbs/v0/resource/tenant-a/key/one", tenant_a, b"a") == 200
    policy = "/kbs/v0/resource-policy/tenant-a"
    assert _status(client, "POST", policy, tenant_a, _body(ALLOW)) == 200
    assert _status(client, "GET", policy, tenant_a) == 200
    assert _status(client, "POST", policy + "/key", tenant_a, _body(ALLOW)) == 200
    assert _status(client, "DELETE", policy + "/key", tenant_a) == 200
    # listing, metadata and version actions under its own repository
    for path in ("/kbs/v0/resources/tenant-a", "/kbs/v0/resources/tenant-a/key?limit=5"):
        assert _status(client, "GET", path, tenant_a) == 200, path
    meta = "/kbs/v0/resource-meta/tenant-a/key/one"
    assert _status(client, "GET", meta, tenant_a) == 200
    assert _status(client, "POST", "/kbs/v0/resource/tenant-a/key/one", tenant_a, b"a2") == 200
    # past the ACL (not 403): this app's directory-tree backend keeps no versions, so 501
    assert _status(client, "POST", meta + "/rollback", tenant_a, {"version": 1}) == 501
    # what tenant-a's policy allows, a tenant-a guest reads (the default global policy would
    # refuse this sample guest)
    assert _guest(client).get_resource("tenant-a/key/one") == b"a2"


def test_tenant_a_admin_writing_tenant_b_policy_or_secrets_is_refused(
    confined: tuple[TestClient, str, str],
) -> None:
    client, full, tenant_a = confined
    assert _status(client, "POST", "/kbs/v0/resource/tenant-b/key/one", full, b"b") == 200
    for method, path, body in (
        ("POST", "/kbs/v0/resource/tenant-b/key/one", b"overwritten"),
        ("DELETE", "/kbs/v0/resource/tenant-b/key/one", None),
        ("POST", "/kbs/v0/resource-policy/tenant-b", _body(ALLOW)),
        ("GET", "/kbs/v0/resource-policy/tenant-b", None),
        ("DELETE", "/kbs/v0/resource-policy/tenant-b", None),
        ("POST", "/kbs/v0/resource-policy/tenant-a-evil", _body(ALLOW)),
        ("POST", "/kbs/v0/resource-policy", _body(ALLOW)),  # the global policy
        ("GET", "/kbs/v0/resource-policy", None),  # the list names every tenant
        ("GET", "/kbs/v0/resource-policy/resource-policy", None),
        ("POST", "/kbs/v0/resource-policy/tenant-a%2F..%2Ftenant-b", _body(ALLOW)),
        ("POST", "/kbs/v0/policy-explain", {"kind": "resource", "input": {}}),
        ("GET", "/kbs/v0/resources", None),  # every repository
        ("GET", "/kbs/v0/resources?prefix=tenant-b", None),
        ("GET", "/kbs/v0/resources/tenant-b", None),
        ("GET", "/kbs/v0/resources/tenant-a-evil", None),
        ("GET", "/kbs/v0/resource-meta/tenant-b/key/one", None),
        ("POST", "/kbs/v0/resource-meta/tenant-b/key/one/purge", {"version": 1}),
    ):
        assert _status(client, method, path, tenant_a, body) == 403, (method, path)
    # paths that smuggle a separator are refused by the path check, whatever the ACL says
    for smuggled in (
        "/kbs/v0/resource/tenant-a/x/..%2F..%2Ftenant-b%2Fkey%2Fone",
        "/kbs/v0/resource/tenant-a/..%2Ftenant-b/key/one",
    ):
        assert _status(client, "POST", smuggled, tenant_a, b"x") == 404
    # tenant-b's secret is untouched, and neither admin token reads a secret as a guest would
    _admin(client, full).set_resource_policy(ALLOW, prefix="tenant-b")
    assert _guest(client).get_resource("tenant-b/key/one") == b"b"
    client.cookies.clear()  # not the guest's attested session: only the admin token
    reply = client.get(
        "/kbs/v0/resource/tenant-b/key/one", headers={"Authorization": f"Bearer {tenant_a}"}
    )
    assert reply.status_code == 401

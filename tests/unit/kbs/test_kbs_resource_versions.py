"""Resource listing, metadata and versions through the real app (admin API, guest release,
resource policy, audit), and the attacks on them, each by name."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.testclient import TestClient

from admin_tokens import NOW, mint
from admin_tokens import write_public_pem as pem
from conftest import FakeClock, kbs_config
from json_shapes import at, obj, objs
from keybroker.client.admin import VERSION_HEADER, AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import ConfigError, KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.kbs.openapi import document
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.plugins import resource as resource_plugin
from softhsm import SoftHsm

SECRET = b"SECRET-never-listed-9f2c"
PIN_VERSION_1 = """package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	data.version == 1
}
"""


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


@pytest.fixture
def client(audit_log: Path) -> Iterator[TestClient]:
    config = kbs_config(audit={"path": str(audit_log)})
    with TestClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient) -> AdminClient:
    return AdminClient("http://testserver", http=client)


def _guest(client: TestClient) -> KbsClient:
    return KbsClient("http://testserver", http=client)


def test_version_header_names_the_same_header_as_the_plugin() -> None:
    assert VERSION_HEADER == resource_plugin.VERSION_HEADER


def test_each_write_answers_its_version(admin: AdminClient) -> None:
    assert [admin.set_resource("a/b/c", f"v{i}".encode()) for i in (1, 2, 3)] == [1, 2, 3]
    meta = admin.resource_meta("a/b/c")
    assert meta["current_version"] == 3 and meta["version_count"] == 3
    assert [v["version"] for v in objs(meta["versions"])] == [1, 2, 3]


def test_guest_gets_current_or_asked_version(admin: AdminClient, client: TestClient) -> None:
    admin.set_resource_policy(builtin_policy("allow_all"))
    admin.set_resource("a/b/c", b"one")
    admin.set_resource("a/b/c", b"two")
    guest = _guest(client)
    assert guest.get_resource("a/b/c") == b"two"
    assert guest.get_resource("a/b/c", version=1) == b"one"
    with pytest.raises(KbsRejectedError) as missing:
        guest.get_resource("a/b/c", version=7)
    assert missing.value.http_status == 404


def test_policy_pinning_a_version_denies_others_with_403(
    admin: AdminClient, client: TestClient
) -> None:
    admin.set_resource("a/b/c", b"one")
    admin.set_resource("a/b/c", b"two")
    admin.set_resource_policy(PIN_VERSION_1)
    guest = _guest(client)
    assert guest.get_resource("a/b/c", version=1) == b"one"
    with pytest.raises(KbsRejectedError) as denied:
        guest.get_resource("a/b/c")  # the current version is 2
    assert denied.value.http_status == 403


def test_release_audit_record_names_the_version(
    admin: AdminClient, client: TestClient, audit_log: Path
) -> None:
    admin.set_resource_policy(builtin_policy("allow_all"))
    admin.set_resource("a/b/c", b"one")
    admin.set_resource("a/b/c", b"two")
    guest = _guest(client)
    guest.get_resource("a/b/c")
    guest.get_resource("a/b/c", version=1)
    releases = [r for r in _records(audit_log) if r["action"] == "release GET resource"]
    assert [(r["decision"], r["reason"]) for r in releases] == [
        ("allow", "version 2"),
        ("allow", "version 1"),
    ]


def test_rollback_delete_undelete_purge_through_the_api(
    admin: AdminClient, client: TestClient
) -> None:
    admin.set_resource_policy(builtin_policy("allow_all"))
    admin.set_resource("a/b/c", b"good")
    admin.set_resource("a/b/c", b"bad")
    guest = _guest(client)
    assert admin.rollback_resource("a/b/c", 1) == 3
    assert guest.get_resource("a/b/c") == b"good"
    admin.delete_resource("a/b/c")  # soft: the current version
    with pytest.raises(KbsRejectedError) as gone:
        guest.get_resource("a/b/c")
    assert gone.value.http_status == 404
    assert admin.resource_meta("a/b/c")["deleted"] is True
    admin.undelete_resource("a/b/c", 3)
    assert guest.get_resource("a/b/c") == b"good"
    admin.delete_resource("a/b/c", version=2)
    with pytest.raises(KbsRejectedError):
        guest.get_resource("a/b/c", version=2)
    admin.purge_resource("a/b/c", 2)
    assert [v["version"] for v in objs(admin.resource_meta("a/b/c")["versions"])] == [1, 3]
    admin.purge_resource("a/b/c")
    with pytest.raises(KbsRejectedError) as purged:
        admin.resource_meta("a/b/c")
    assert purged.value.http_status == 404


def test_retention_from_the_plugin_config(audit_log: Path) -> None:
    config = kbs_config(
        audit={"path": str(audit_log)},
        plugins=[{"name": "resource", "storage_backend_type": "kvstorage", "max_versions": 2}],
    )
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        for i in range(5):
            admin.set_resource("a/b/c", f"v{i}".encode())
        versions = objs(admin.resource_meta("a/b/c")["versions"])
        assert [v["version"] for v in versions] == [4, 5]


def test_pkcs11_backend_versions_with_retention_from_the_plugin_config(
    audit_log: Path, softhsm: SoftHsm
) -> None:
    """The KBS wires the PKCS#11 backend to its own store for the records, with the plugin's
    retention; both plugins on the token see the same versions."""
    hsm = {"module": str(softhsm.module), "pin": softhsm.pin}
    config = kbs_config(
        audit={"path": str(audit_log)},
        plugins=[
            {"name": "resource", "storage_backend_type": "pkcs11", "max_versions": 2, **hsm},
            {"name": "pkcs11", **hsm},
        ],
    )
    path = f"p{uuid.uuid4().hex[:10]}/b/c"
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        assert [admin.set_resource(path, f"v{i}".encode()) for i in range(1, 5)] == [1, 2, 3, 4]
        versions = objs(admin.resource_meta(path)["versions"])
        assert [v["version"] for v in versions] == [3, 4]
        assert _guest(client).get_resource(path, version=3) == b"v3"
        assert admin.rollback_resource(path, 3) == 5
        assert _guest(client).get_resource(path) == b"v3"
        # upstream's plugin path writes the same token, numbered in the same records
        assert client.post(f"/kbs/v0/pkcs11/resource/{path}", content=b"v6").status_code == 200
        assert admin.resource_meta(path)["current_version"] == 6
        assert _guest(client).get_resource(path) == b"v6"


def test_max_versions_is_a_kvstorage_and_pkcs11_key_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_versions"):
        kbs_config(
            plugins=[
                {
                    "name": "resource",
                    "type": "LocalFs",
                    "dir_path": str(tmp_path),
                    "max_versions": 3,
                }
            ]
        )
    with pytest.raises(ConfigError):
        kbs_config(plugins=[{"name": "resource", "max_versions": 0}])


def test_listing_pages_through_a_prefix(admin: AdminClient) -> None:
    for i in range(5):
        admin.set_resource(f"tenant-a/keys/k{i}", SECRET)
    admin.set_resource("tenant-ab/keys/x", SECRET)
    admin.set_resource("tenant-b/keys/x", SECRET)
    first = admin.list_resources("tenant-a", limit=2)
    assert [r["name"] for r in objs(first["resources"])] == [
        "tenant-a/keys/k0",
        "tenant-a/keys/k1",
    ]
    names = [r["name"] for r in objs(admin.list_all_resources("tenant-a"))]
    assert names == [f"tenant-a/keys/k{i}" for i in range(5)]  # not tenant-ab: whole segments
    assert len(admin.list_all_resources()) == 7
    summary = obj(at(admin.list_resources("tenant-a/keys", limit=1), "resources", 0))
    assert summary["current_version"] == 1 and summary["size"] == len(SECRET)


def test_query_prefix_form_lists_the_same(admin: AdminClient, client: TestClient) -> None:
    admin.set_resource("tenant-a/keys/k", SECRET)
    admin.set_resource("tenant-b/keys/k", SECRET)
    reply = client.get("/kbs/v0/resources", params={"prefix": "tenant-a/keys"})
    assert [r["name"] for r in reply.json()["resources"]] == ["tenant-a/keys/k"]


def test_listing_never_returns_values(
    admin: AdminClient, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin.set_resource("a/b/c", SECRET)
    admin.set_resource("a/b/c", SECRET + b"2")
    for url in ("/kbs/v0/resources", "/kbs/v0/resources/a", "/kbs/v0/resource-meta/a/b/c"):
        reply = client.get(url)
        assert reply.status_code == 200
        assert SECRET.decode() not in reply.text
        assert base64.b64encode(SECRET).decode()[:16] not in reply.text
    assert SECRET.decode() not in caplog.text


def test_legacy_resource_is_listed_served_and_migrated(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "repository").mkdir(parents=True)
    (store / "repository" / "old\\x2Fkey\\x2Fone").write_bytes(b"from before")
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(store)}},
        }
    )
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        listed = admin.list_all_resources()
        assert listed == [
            {
                "name": "old/key/one",
                "current_version": 1,
                "version_count": 1,
                "created": None,
                "updated": None,
                "deleted": False,
                "size": None,
                "versioned": False,
            }
        ]
        guest = _guest(client)
        assert guest.get_resource("old/key/one", version=1) == b"from before"
        assert admin.set_resource("old/key/one", b"new") == 2
        assert guest.get_resource("old/key/one", version=1) == b"from before"
        assert guest.get_resource("old/key/one") == b"new"
        assert admin.resource_meta("old/key/one")["versioned"] is True


# --- attacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!not-base64!!!",
        base64.urlsafe_b64encode(b"../../etc/passwd").decode(),
        base64.urlsafe_b64encode(b"tenant-b/keys/x").decode().rstrip("="),  # another prefix
        base64.urlsafe_b64encode(b"tenant-a/keys").decode().rstrip("="),  # not a name
        base64.urlsafe_b64encode(b"tenant-a/keys/k\xff").decode().rstrip("="),
        "A" * 5000,
    ],
)
def test_cursor_tampering_is_refused(admin: AdminClient, client: TestClient, cursor: str) -> None:
    admin.set_resource("tenant-a/keys/k", SECRET)
    reply = client.get("/kbs/v0/resources/tenant-a", params={"cursor": cursor})
    assert reply.status_code == 400
    assert "invalid cursor" in reply.json()["detail"]


def test_cursor_tampering_cannot_leave_the_prefix(admin: AdminClient, client: TestClient) -> None:
    """A well-formed cursor of the caller's choice only moves the start within its prefix."""
    admin.set_resource("tenant-a/keys/k", SECRET)
    admin.set_resource("tenant-b/keys/k", SECRET)
    before_all = base64.urlsafe_b64encode(b"tenant-a/a/a").decode().rstrip("=")
    reply = client.get("/kbs/v0/resources/tenant-a", params={"cursor": before_all})
    assert [r["name"] for r in reply.json()["resources"]] == ["tenant-a/keys/k"]


@pytest.mark.parametrize("limit", ["1001", "1000000000000", "0", "-1", "ten", "1e3"])
def test_oversized_or_malformed_limit_is_refused(client: TestClient, limit: str) -> None:
    reply = client.get("/kbs/v0/resources", params={"limit": limit})
    assert reply.status_code == 400
    assert "limit must be an integer from 1 to 1000" in reply.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "/kbs/v0/resources/..",
        "/kbs/v0/resources/%2E%2E",
        "/kbs/v0/resources/a%2F..",
        "/kbs/v0/resources/.hidden",
        "/kbs/v0/resources/a/b/c",
        "/kbs/v0/resources?prefix=../x",
        "/kbs/v0/resources?prefix=a/../../b",
        "/kbs/v0/resources?prefix=a//b",
        "/kbs/v0/resources/tenant-a?prefix=tenant-b",
    ],
)
def test_prefix_traversal_is_refused(admin: AdminClient, client: TestClient, url: str) -> None:
    admin.set_resource("tenant-b/keys/k", SECRET)
    reply = client.get(url)
    # 400 from the prefix check; 404 where the HTTP client already collapsed the dots
    assert reply.status_code in (400, 404), reply.text
    assert "tenant-b/keys/k" not in reply.text


@pytest.mark.parametrize("version", ["abc", "-1", "0", "1.0", "99999999999", "2147483648", ""])
def test_version_query_non_numeric_negative_or_huge_is_400_before_any_token_work(
    admin: AdminClient, client: TestClient, version: str
) -> None:
    admin.set_resource("a/b/c", SECRET)
    reply = client.get(f"/kbs/v0/resource/a/b/c?version={version}")  # no token at all
    assert reply.status_code == 400
    assert reply.json()["type"].endswith("/MalformedRequest")


def test_resource_meta_path_traversal_is_refused(client: TestClient) -> None:
    for url in ("/kbs/v0/resource-meta/a/../c", "/kbs/v0/resource-meta/a/b%2Fc/d"):
        assert client.get(url).status_code in (400, 404)
    reply = client.post("/kbs/v0/resource-meta/a/b/c/explode", json={})
    assert reply.status_code == 404
    assert reply.json()["type"].endswith("/InvalidRequestPath")


@pytest.mark.parametrize("body", [{"version": "x"}, {"version": -3}, {"version": True}, {}])
def test_rollback_version_body_is_checked(
    admin: AdminClient, client: TestClient, body: dict[str, Any]
) -> None:
    admin.set_resource("a/b/c", SECRET)
    reply = client.post("/kbs/v0/resource-meta/a/b/c/rollback", json=body)
    assert reply.status_code == 400


def test_nonexistent_resource_answers_403_not_404_to_a_denied_guest(
    admin: AdminClient, client: TestClient
) -> None:
    """No existence oracle: the version is resolved before the policy, but a missing one is
    only reported to a guest the policy admits."""
    admin.set_resource_policy(builtin_policy("deny_all"))
    with pytest.raises(KbsRejectedError) as denied:
        _guest(client).get_resource("no/such/thing", version=3)
    assert denied.value.http_status == 403


# --- ACLs by path prefix --------------------------------------------------------------------------

TENANT_A = r"^/kbs/v0/(resource|resources|resource-meta)/tenant-a(/[^?]*)?(\?.*)?$"


@pytest.fixture
def acl_client(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    key = ed25519.Ed25519PrivateKey.generate()
    config = kbs_config(
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {
                "bearer_jwt": {
                    "identity_providers": [
                        {
                            "issuer": "admin1-issuer",
                            "public_key_uri": str(pem(key, tmp_path / "admin.pem")),
                        }
                    ]
                }
            },
            "authorization": {
                "regex_acl": {
                    "acls": [
                        {"role": "admin", "allowed_endpoints": "^/kbs/v0/.+$"},
                        {"role": "tenant-a", "allowed_endpoints": TENANT_A},
                    ]
                }
            },
        }
    )
    with TestClient(create_app(config, clock=FakeClock(NOW))) as client:
        root = AdminClient("http://testserver", http=client, token=mint(key))
        root.set_resource("tenant-a/keys/k", SECRET)
        root.set_resource("tenant-b/keys/k", SECRET)
        yield client, mint(key, role="tenant-a")


def test_tenant_acl_confines_listing_meta_and_writes_to_its_prefix(
    acl_client: tuple[TestClient, str],
) -> None:
    client, token = acl_client
    tenant = AdminClient("http://testserver", http=client, token=token)
    assert [r["name"] for r in objs(tenant.list_all_resources("tenant-a"))] == ["tenant-a/keys/k"]
    assert tenant.resource_meta("tenant-a/keys/k")["current_version"] == 1
    assert tenant.set_resource("tenant-a/keys/k", b"v2") == 2
    assert tenant.rollback_resource("tenant-a/keys/k", 1) == 3
    for attempt in (
        lambda: tenant.list_resources("tenant-b"),
        tenant.list_resources,  # every resource: not allowed
        lambda: tenant.resource_meta("tenant-b/keys/k"),
        lambda: tenant.set_resource("tenant-b/keys/k", b"x"),
        lambda: tenant.purge_resource("tenant-b/keys/k"),
    ):
        with pytest.raises(KbsRejectedError) as denied:
            attempt()
        assert denied.value.http_status == 403
    headers = {"Authorization": f"Bearer {token}"}
    for url in (
        "/kbs/v0/resources?prefix=tenant-b",  # the query form is not under the tenant's path
        "/kbs/v0/resources/tenant-ab",
        "/kbs/v0/resources/tenant-a%2F..%2Ftenant-b",
    ):
        assert client.get(url, headers=headers).status_code in (400, 403), url


# --- backends without versions --------------------------------------------------------------------


def test_unversioned_backend_says_so_with_501_and_keeps_working(tmp_path: Path) -> None:
    """The seed-era directory tree keeps no versions (its files are the truth, edited outside
    the KBS) but lists its files, as unversioned resources."""
    tree = tmp_path / "tree"
    config = kbs_config(plugins=[{"name": "resource", "type": "LocalFs", "dir_path": str(tree)}])
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        assert admin.set_resource("a/b/c", b"plain") is None
        admin.set_resource("a-b/b/c", b"plain")
        (tree / "a" / "b" / "dropped").write_bytes(b"by an operator")
        (tree / "a" / "b" / ".hidden").write_bytes(b"never listed")
        assert _guest(client).get_resource("a/b/c") == b"plain"
        names = [r["name"] for r in objs(admin.list_all_resources())]
        assert names == ["a-b/b/c", "a/b/c", "a/b/dropped"]
        first = admin.list_resources("a", limit=1)
        assert [r["name"] for r in objs(first["resources"])] == ["a/b/c"]
        second = admin.list_resources("a", limit=1, cursor=str(first["next_cursor"]))
        assert [r["name"] for r in objs(second["resources"])] == ["a/b/dropped"]
        meta = admin.resource_meta("a/b/dropped")
        assert meta["versioned"] is False and meta["size"] == len(b"by an operator")
        assert "by an operator" not in json.dumps(admin.list_all_resources())
        for action in ("rollback", "undelete"):
            reply = client.post(f"/kbs/v0/resource-meta/a/b/c/{action}", json={"version": 1})
            assert reply.status_code == 501
            assert "not offered by the DirectoryTree resource backend" in reply.json()["detail"]
        with pytest.raises(KbsRejectedError) as versioned:
            _guest(client).get_resource("a/b/c", version=1)
        assert versioned.value.http_status == 501
        admin.delete_resource("a/b/c")
        assert not (tree / "a" / "b" / "c").exists()


def test_answers_match_the_openapi_schemas(admin: AdminClient) -> None:
    schemas = document()["components"]["schemas"]
    admin.set_resource("a/b/c", SECRET)
    entry = obj(at(admin.list_resources("a"), "resources", 0))
    assert set(entry) == set(schemas["ResourceSummary"]["required"])
    assert set(entry) == set(schemas["ResourceSummary"]["properties"])
    meta = admin.resource_meta("a/b/c")
    versions_schema = schemas["ResourceMeta"]["allOf"][1]["properties"]["versions"]["items"]
    assert set(meta) == set(entry) | {"versions"}
    assert set(obj(at(meta, "versions", 0))) == set(versions_schema["required"])
    page = admin.list_resources("a")
    assert set(page) == set(schemas["ResourceList"]["required"])


def test_name_too_long_for_a_local_fs_store_is_a_400_not_a_500(tmp_path: Path) -> None:
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path / "store")}},
        }
    )
    with TestClient(create_app(config)) as client:
        reply = client.post(f"/kbs/v0/resource/a/b/{'t' * 235}", content=b"x")
        assert reply.status_code == 400
        assert "too long for this store" in reply.json()["detail"]
        assert not list((tmp_path / "store" / "repository_versions").iterdir())

"""Both resource-plugin configuration forms, on disk exactly as operators expect."""

from __future__ import annotations

import base64
from pathlib import Path

from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy


def test_upstream_kvstorage_layout_on_disk(tmp_path: Path) -> None:
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path)}},
        },
        plugins=[{"name": "resource", "storage_backend_type": "kvstorage"}],
    )
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_resource("default/key/one", b"abc")
    stored = tmp_path / "repository" / "default\\x2Fkey\\x2Fone"
    assert stored.read_bytes() == b"abc"
    # the resource policy persists under upstream's key, in the `kbs` namespace
    assert (tmp_path / "kbs" / "resource-policy.rego").is_file()


def test_file_dropped_in_upstream_layout_is_served(tmp_path: Path) -> None:
    (tmp_path / "repository").mkdir()
    (tmp_path / "repository" / "repo\\x2Ftype\\x2Ftag").write_bytes(b"dropped")
    config = kbs_config(
        storage_backend={
            "storage_type": "local_fs",
            "backends": {"local_fs": {"dir_path": str(tmp_path)}},
        },
    )
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_resource_policy(
            builtin_policy("allow_all")
        )
        assert (
            KbsClient("http://testserver", http=client).get_resource("repo/type/tag") == b"dropped"
        )


def test_seed_era_local_fs_plugin(tmp_path: Path) -> None:
    (tmp_path / "repo" / "type").mkdir(parents=True)
    (tmp_path / "repo" / "type" / "tag").write_bytes(b"operator file")
    config = kbs_config(
        plugins=[{"name": "resource", "type": "LocalFs", "dir_path": str(tmp_path)}]
    )
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        admin.set_resource("default/key/new", b"written")
        guest = KbsClient("http://testserver", http=client)
        assert guest.get_resource("repo/type/tag") == b"operator file"
        assert guest.get_resource("default/key/new") == b"written"
    assert (tmp_path / "default" / "key" / "new").read_bytes() == b"written"


def test_stored_operator_policy_survives_restart(tmp_path: Path) -> None:
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path)}},
        },
    )
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_resource_policy(
            builtin_policy("allow_all")
        )
        AdminClient("http://testserver", http=client).set_resource("a/b/c", b"x")
    with TestClient(create_app(config)) as client:
        assert KbsClient("http://testserver", http=client).get_resource("a/b/c") == b"x"


def test_operator_attestation_policy_survives_restart(tmp_path: Path) -> None:
    config = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path)}},
        },
    )
    mine = 'package policy\ntrust_claims := {"hardware": 2}\n'
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_attestation_policy(mine)
    with TestClient(create_app(config)) as client:  # start-up must not reinstall the default
        token = KbsClient("http://testserver", http=client).attest()
    stored = tmp_path / "attestation_service_policy" / "default_cpu.rego"
    assert stored.read_text() == mine
    assert '"ear.trustworthiness-vector":{"hardware":2}' in _payload(token)


def _payload(token: str) -> str:
    body = token.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()

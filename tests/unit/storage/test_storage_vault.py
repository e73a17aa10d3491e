"""The Vault secret backend (hvac) against the Vault stand-in over real HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from conftest import FakeClock, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import (
    ConfigError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.kbs.tls import self_signed_certificate
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.vault import VaultConfig, VaultSecretBackend
from keybroker.storage.vault_versions import vault_record, vault_time
from secret_backend_vault import vault_stand_in

PATH = ResourcePath("default", "vault", "one")


def _config(url: str, **settings: object) -> VaultConfig:
    return VaultConfig.model_validate({"vault_url": url, **settings})


def test_upstream_layout_is_read_and_written(tmp_path: Path) -> None:
    """Upstream keeps the resource base64-encoded in the field `data` of a KV v1 secret."""
    with vault_stand_in(tmp_path) as server:
        token = server.stand_in.root_token
        encoded = base64.b64encode(b"\x00from upstream").decode()
        written = httpx.post(
            f"{server.url}/v1/secret/default/vault/one",
            json={"data": encoded},
            headers={"X-Vault-Token": token},
        )
        assert written.status_code == 204
        backend = VaultSecretBackend.from_config(_config(server.url, token=token))
        assert asyncio.run(backend.read(PATH)) == b"\x00from upstream"
        asyncio.run(backend.write(PATH, b"\xffback"))
        assert server.stand_in.mounts["secret"].v1["default/vault/one"] == {
            "data": base64.b64encode(b"\xffback").decode()
        }


def test_kv2_overwrite_adds_versions_delete_is_soft_and_purge_removes_all(
    tmp_path: Path,
) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = VaultSecretBackend.from_config(
            _config(server.url, token=server.stand_in.root_token, mount_path="kv2", kv_version=2)
        )

        async def scenario() -> None:
            assert [await backend.write(PATH, v) for v in (b"v1", b"v2", b"v3")] == [1, 2, 3]
            assert await backend.read(PATH) == b"v3"
            assert len(server.stand_in.mounts["kv2"].v2["default/vault/one"]) == 3
            await backend.delete(PATH)  # Vault's soft delete of the latest version
            state = server.stand_in.mounts["kv2"].v2_state["default/vault/one"][3]
            assert state.deleted and not state.destroyed
            with pytest.raises(ResourceNotFoundError):
                await backend.read(PATH)
            await backend.purge(PATH, None)
            assert "default/vault/one" not in server.stand_in.mounts["kv2"].v2

        asyncio.run(scenario())


def test_secret_without_data_field_is_refused_by_name(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        server.stand_in.mounts["secret"].v1["default/vault/one"] = {"password": "hunter2"}
        backend = VaultSecretBackend.from_config(
            _config(server.url, token=server.stand_in.root_token)
        )
        with pytest.raises(
            StorageError, match=r"no string field `data` \(fields: \['password'\]\)"
        ):
            asyncio.run(backend.read(PATH))


def test_forged_token_is_denied(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = VaultSecretBackend.from_config(_config(server.url, token="hvs.forged"))
        with pytest.raises(StorageError, match="Vault denied access to secret/default/vault/one"):
            asyncio.run(backend.read(PATH))


def test_expired_token_is_denied(tmp_path: Path) -> None:
    clock = FakeClock()
    with vault_stand_in(tmp_path) as server:
        server.stand_in.clock = clock
        token = server.stand_in.issue_token(ttl=60)
        backend = VaultSecretBackend.from_config(_config(server.url, token=token))
        asyncio.run(backend.write(PATH, b"x"))
        clock.advance(61)
        with pytest.raises(StorageError, match="denied"):
            asyncio.run(backend.read(PATH))


def test_approle_logs_in_and_again_when_the_lease_ends(tmp_path: Path) -> None:
    clock = FakeClock()
    with vault_stand_in(tmp_path) as server:
        stand_in = server.stand_in
        stand_in.clock = clock
        stand_in.add_approle("kbs-role", "kbs-secret-id")
        backend = VaultSecretBackend(
            _config(server.url, role_id="kbs-role", secret_id="kbs-secret-id"), clock=clock
        )
        asyncio.run(backend.write(PATH, b"approle"))
        assert stand_in.logins == 1
        clock.advance(stand_in.approle_ttl - 10)  # inside the renewal margin
        assert asyncio.run(backend.read(PATH)) == b"approle"
        assert stand_in.logins == 2


def test_approle_revoked_token_logs_in_once_more(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        stand_in = server.stand_in
        stand_in.add_approle("kbs-role", "kbs-secret-id")
        backend = VaultSecretBackend.from_config(
            _config(server.url, role_id="kbs-role", secret_id="kbs-secret-id")
        )
        asyncio.run(backend.write(PATH, b"approle"))
        for token in [t for t in stand_in.tokens if t != stand_in.root_token]:
            del stand_in.tokens[token]  # revoked behind our back
        assert asyncio.run(backend.read(PATH)) == b"approle"
        assert stand_in.logins == 2


def test_wrong_approle_secret_id_is_a_clear_error(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        server.stand_in.add_approle("kbs-role", "kbs-secret-id")
        backend = VaultSecretBackend.from_config(
            _config(server.url, role_id="kbs-role", secret_id="guessed")
        )
        with pytest.raises(StorageError, match="AppRole login failed"):
            asyncio.run(backend.read(PATH))


def test_https_with_the_vault_ca(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path, tls=True) as server:
        backend = VaultSecretBackend.from_config(
            _config(
                server.url, token=server.stand_in.root_token, ca_certs=[tmp_path / "vault-ca.crt"]
            )
        )
        asyncio.run(backend.write(PATH, b"over tls"))
        assert asyncio.run(backend.read(PATH)) == b"over tls"


def test_https_with_a_wrong_ca_fails_closed(tmp_path: Path) -> None:
    _key, other_ca = self_signed_certificate(["127.0.0.1"])
    (tmp_path / "other.crt").write_bytes(other_ca)
    with vault_stand_in(tmp_path, tls=True) as server:
        backend = VaultSecretBackend.from_config(
            _config(server.url, token=server.stand_in.root_token, ca_certs=[tmp_path / "other.crt"])
        )
        with pytest.raises(StorageError, match="TLS verification of the Vault server"):
            asyncio.run(backend.read(PATH))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verification_off_is_named_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), vault_stand_in(tmp_path, tls=True) as server:
        backend = VaultSecretBackend.from_config(
            _config(server.url, token=server.stand_in.root_token, verify_ssl=False)
        )
        asyncio.run(backend.write(PATH, b"unverified"))
    assert "verify_ssl = false" in caplog.text and "insecure" in caplog.text


def test_vault_down_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = VaultSecretBackend.from_config(
            _config(server.url, token=server.stand_in.root_token, timeout=1)
        )
        asyncio.run(backend.write(PATH, b"before"))
        server.stop()
        with pytest.raises(ServiceUnavailableError, match="Vault is unavailable"):
            asyncio.run(backend.read(PATH))
        server.start()  # recovery needs no new backend
        assert asyncio.run(backend.read(PATH)) == b"before"


def test_token_never_in_repr_or_errors(tmp_path: Path) -> None:
    config = _config("http://127.0.0.1:1", token="hvs.very-secret-token", timeout=1)
    assert "very-secret-token" not in repr(config)
    backend = VaultSecretBackend.from_config(config)
    with pytest.raises(ServiceUnavailableError) as raised:
        asyncio.run(backend.read(PATH))
    assert "very-secret-token" not in str(raised.value.detail)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "needs `token`, or both `role_id` and `secret_id`"),
        ({"token": "t", "role_id": "r", "secret_id": "s"}, "either `token` or AppRole"),
        ({"token": "t", "client_cert": "/c.pem"}, "`client_cert` and `client_key` go together"),
        ({"token": "t", "kv_version": 3}, "kv_version"),
    ],
)
def test_invalid_settings_are_named(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config("https://vault.example:8200", **settings)


def test_kbs_releases_resources_kept_in_vault(tmp_path: Path) -> None:
    """Configured the upstream way, through the HTTP API: admin writes, a guest reads."""
    with vault_stand_in(tmp_path) as server:
        plugin = {
            "name": "resource",
            "storage_backend_type": "vault",
            "vault_url": server.url,
            "token": server.stand_in.root_token,
            "mount_path": "kv2",
            "kv_version": 2,
        }
        with TestClient(create_app(kbs_config(plugins=[plugin]))) as client:
            admin = AdminClient("http://testserver", http=client)
            admin.set_resource_policy(builtin_policy("allow_all"))
            admin.set_resource("default/vault/one", b"\x00kept in vault")
            guest = KbsClient("http://testserver", http=client)
            assert guest.get_resource("default/vault/one") == b"\x00kept in vault"
        assert len(server.stand_in.mounts["kv2"].v2["default/vault/one"]) == 1


def test_unknown_vault_setting_is_named_at_load() -> None:
    plugin = {
        "name": "resource",
        "storage_backend_type": "vault",
        "vault_url": "https://v",
        "token": "t",
        "mountpath": "kv",
    }
    with pytest.raises(ConfigError, match=r"unknown key `plugins\.0\.mountpath`"):
        kbs_config(plugins=[plugin])


def test_vault_times_with_nanoseconds_read_as_seconds() -> None:
    assert vault_time("2018-03-22T02:24:06.945319214Z") == pytest.approx(1521685446.945319)
    assert vault_time("2018-03-22T02:24:06Z") == 1521685446.0
    assert vault_time("") is None and vault_time("yesterday") is None and vault_time(7) is None


def test_malformed_vault_metadata_fails_closed() -> None:
    with pytest.raises(StorageError, match="is not KV v2 metadata"):
        vault_record({"current_version": "x", "versions": {}}, "kv2/a/b/c")

"""The Vault backend's defences, against the Vault stand-in: nothing taken from the environment,
TLS from the configuration only, a wrong KV version or mount never read as "no such secret",
Vault faults reported as 503 within the timeout, and calls that do not wait for each other."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from keybroker.errors import ConfigError, ServiceUnavailableError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.vault import VaultConfig, VaultSecretBackend
from pki import issue
from secret_backend_vault import issue_leaf, vault_stand_in

PATH = ResourcePath("default", "vault", "one")


def _backend(url: str, **settings: object) -> VaultSecretBackend:
    return VaultSecretBackend.from_config(
        VaultConfig.model_validate({"vault_url": url, **settings})
    )


# --- nothing from the environment ----------------------------------------------------------


def test_ambient_vault_token_is_never_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hvac falls back to VAULT_TOKEN; an AppRole backend must not hand it to the server."""
    monkeypatch.setenv("VAULT_TOKEN", "hvs.ambient-token-of-another-tool")
    with vault_stand_in(tmp_path) as server:
        server.stand_in.add_approle("kbs-role", "kbs-secret-id")
        backend = _backend(server.url, role_id="kbs-role", secret_id="kbs-secret-id")
        asyncio.run(backend.write(PATH, b"approle"))
        assert asyncio.run(backend.read(PATH)) == b"approle"
        assert "hvs.ambient-token-of-another-tool" not in server.stand_in.seen_tokens


def test_ca_bundle_from_the_environment_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUESTS_CA_BUNDLE would silently replace the trust anchors: only ca_certs count."""
    with vault_stand_in(tmp_path, tls=True) as server:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "vault-ca.crt"))
        backend = _backend(server.url, token=server.stand_in.root_token)
        with pytest.raises(StorageError, match="TLS verification of the Vault server"):
            asyncio.run(backend.read(PATH))


def test_proxy_from_the_environment_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens on discard
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token, timeout=2)
        asyncio.run(backend.write(PATH, b"direct"))
        assert asyncio.run(backend.read(PATH)) == b"direct"


# --- TLS from the configuration ------------------------------------------------------------


def test_several_ca_files_are_all_trust_anchors(tmp_path: Path) -> None:
    unrelated = tmp_path / "unrelated-ca.crt"
    unrelated.write_bytes(issue("unrelated CA").pem())
    with vault_stand_in(tmp_path, tls=True) as server:
        backend = _backend(
            server.url,
            token=server.stand_in.root_token,
            ca_certs=[unrelated, tmp_path / "vault-ca.crt"],
        )
        asyncio.run(backend.write(PATH, b"over tls"))
        assert asyncio.run(backend.read(PATH)) == b"over tls"


def test_missing_ca_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca_certs: cannot load .*absent\.crt"):
        _backend("https://vault.example:8200", token="t", ca_certs=[tmp_path / "absent.crt"])


def test_mutual_tls_with_a_client_certificate(tmp_path: Path) -> None:
    client_ca = issue("Vault client CA")
    client = issue_leaf("kbs", client_ca, server=False)
    (tmp_path / "kbs.crt").write_bytes(client.pem())
    (tmp_path / "kbs.key").write_bytes(client.key_pem())
    with vault_stand_in(tmp_path, tls=True, client_ca=client_ca) as server:
        settings = {"token": server.stand_in.root_token, "ca_certs": [tmp_path / "vault-ca.crt"]}
        backend = _backend(
            server.url,
            client_cert=tmp_path / "kbs.crt",
            client_key=tmp_path / "kbs.key",
            **settings,
        )
        asyncio.run(backend.write(PATH, b"mutual"))
        assert asyncio.run(backend.read(PATH)) == b"mutual"
        without = _backend(server.url, timeout=2, **settings)
        with pytest.raises((StorageError, ServiceUnavailableError)):
            asyncio.run(without.read(PATH))


def test_encrypted_client_key_is_refused_at_start_up(tmp_path: Path) -> None:
    """Without a password callback OpenSSL would block start-up on a terminal prompt."""
    client = issue_leaf("kbs", issue("Vault client CA"), server=False)
    (tmp_path / "kbs.crt").write_bytes(client.pem())
    (tmp_path / "kbs.key").write_bytes(
        client.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    with pytest.raises(ConfigError, match="client_key is encrypted"):
        _backend(
            "https://vault.example:8200",
            token="t",
            client_cert=tmp_path / "kbs.crt",
            client_key=tmp_path / "kbs.key",
        )


def test_plain_http_is_named_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _backend("http://vault.example:8200", token="t")
    assert "plain http" in caplog.text and "insecure" in caplog.text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://kbs:hunter2@vault.example", "must not carry credentials"),
        ("ftp://vault.example", "http:// or https:// URL with a host"),
        ("https://", "http:// or https:// URL with a host"),
    ],
)
def test_bad_vault_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VaultConfig(vault_url=url, token="t")


# --- wrong KV version or mount -------------------------------------------------------------


def test_kv1_api_on_a_kv2_mount_is_named_not_missing(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token, mount_path="kv2")
        with pytest.raises(StorageError, match="kv2 is KV version 2, but kv_version = 1"):
            asyncio.run(backend.read(PATH))


def test_kv2_api_on_a_kv1_mount_is_refused_before_writing(tmp_path: Path) -> None:
    """Through the v2 API a v1 mount would keep the secret under data/, unseen by upstream."""
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token, kv_version=2)
        with pytest.raises(StorageError, match="secret is KV version 1, but kv_version = 2"):
            asyncio.run(backend.write(PATH, b"misplaced"))
        assert server.stand_in.mounts["secret"].v1 == {}


def test_version_mismatch_is_named_when_the_preflight_is_denied(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        server.stand_in.preflight_allowed = False
        server.stand_in.mounts["kv2"].v2["default/vault/one"] = [{"data": "eA=="}]
        backend = _backend(server.url, token=server.stand_in.root_token, mount_path="kv2")
        with pytest.raises(StorageError, match="set kv_version = 2"):
            asyncio.run(backend.read(PATH))


def test_wrong_mount_path_is_not_read_as_missing(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token, mount_path="nosuch")
        with pytest.raises(StorageError, match="check mount_path"):
            asyncio.run(backend.read(PATH))


def test_a_secret_without_data_can_still_be_deleted(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        server.stand_in.mounts["secret"].v1["default/vault/one"] = {"password": "x"}
        backend = _backend(server.url, token=server.stand_in.root_token)
        asyncio.run(backend.delete(PATH))
        assert server.stand_in.mounts["secret"].v1 == {}


# --- faults --------------------------------------------------------------------------------


def test_sealed_vault_is_unavailable_until_unsealed(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token)
        asyncio.run(backend.write(PATH, b"kept"))
        server.stand_in.sealed = True
        with pytest.raises(ServiceUnavailableError, match="sealed"):
            asyncio.run(backend.read(PATH))
        server.stand_in.sealed = False
        assert asyncio.run(backend.read(PATH)) == b"kept"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung Vault."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_hung_vault_is_unavailable_within_the_timeout(silent_port: int) -> None:
    backend = _backend(f"http://127.0.0.1:{silent_port}", token="t", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match=r"did not answer within 0\.5 s"):
        asyncio.run(backend.read(PATH))
    # the message names the 0.5 s timeout that fired; the bound only rules out a hang
    assert time.monotonic() - started < 10


# --- concurrency ---------------------------------------------------------------------------


def test_reads_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """The stand-in answers only once two reads are in flight: a serialising client times out."""
    with vault_stand_in(tmp_path) as server:
        backend = _backend(server.url, token=server.stand_in.root_token, timeout=3)
        asyncio.run(backend.write(PATH, b"shared"))
        server.stand_in.hold_reads = 2

        async def two_reads() -> list[bytes]:
            return list(await asyncio.gather(backend.read(PATH), backend.read(PATH)))

        assert asyncio.run(two_reads()) == [b"shared", b"shared"]


def test_revoked_approle_token_is_replaced_once_for_many_callers(tmp_path: Path) -> None:
    with vault_stand_in(tmp_path) as server:
        stand_in = server.stand_in
        stand_in.add_approle("kbs-role", "kbs-secret-id")
        backend = _backend(server.url, role_id="kbs-role", secret_id="kbs-secret-id")
        asyncio.run(backend.write(PATH, b"approle"))
        for token in [t for t in stand_in.tokens if t != stand_in.root_token]:
            del stand_in.tokens[token]

        async def many_reads() -> list[bytes]:
            return await asyncio.gather(*(backend.read(PATH) for _ in range(8)))

        assert asyncio.run(many_reads()) == [b"approle"] * 8
        assert stand_in.logins == 2

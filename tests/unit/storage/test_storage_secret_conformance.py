"""Every writable secret backend of the resource plugin behaves the same: one suite for all.

The key-value backend runs over PostgreSQL here (the key-value suite covers the other stores);
PKCS#11 runs on a real SoftHSM2 token; Vault (KV v1 and v2) is the production hvac client against
the Vault stand-in over HTTP. Aliyun KMS and AWS Secrets Manager are read-only and have their
own modules (test_storage_aliyun_kms.py, test_storage_aws_secrets.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from secret_backend_vault import vault_backend

from databases import fresh_postgres_database
from keybroker.errors import ResourceNotFoundError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.secrets import DirectoryTreeSecretBackend, KvSecretBackend, SecretBackend
from softhsm import SoftHsm

MIB = 1024 * 1024


@pytest.fixture(params=["kv-postgres", "directory-tree", "pkcs11", "vault-kv1", "vault-kv2"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretBackend]:
    if request.param == "kv-postgres":
        with fresh_postgres_database() as db:
            conninfo = f"host=127.0.0.1 user=postgres dbname={db}"
            stores: list[PostgresKeyValueStorage] = []

            def namespace(name: str) -> PostgresKeyValueStorage:
                stores.append(PostgresKeyValueStorage(conninfo, name))
                return stores[-1]

            yield KvSecretBackend.in_namespaces(namespace, "repo")
            for store in stores:
                asyncio.run(store.close())
    elif request.param == "directory-tree":
        yield DirectoryTreeSecretBackend(tmp_path / "repository")
    elif request.param.startswith("vault"):
        with vault_backend(tmp_path, kv_version=int(request.param[-1])) as vault:
            yield vault
    else:
        softhsm: SoftHsm = request.getfixturevalue("softhsm")
        config = Pkcs11Config(module=softhsm.module, pin=softhsm.pin)
        yield Pkcs11SecretBackend.from_config(config)


@pytest.fixture
def path() -> ResourcePath:
    """A resource of this test's own (the SoftHSM token is shared by the session)."""
    return ResourcePath(f"r{uuid.uuid4().hex[:12]}", "conformance", "tag")


def test_write_then_read(backend: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await backend.write(path, b"value")
        assert await backend.read(path) == b"value"

    asyncio.run(scenario())


def test_missing_is_not_found(backend: SecretBackend, path: ResourcePath) -> None:
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(backend.read(path))


def test_overwrite(backend: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await backend.write(path, b"old")
        await backend.write(path, b"new")
        assert await backend.read(path) == b"new"

    asyncio.run(scenario())


def test_delete(backend: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await backend.write(path, b"gone soon")
        await backend.delete(path)
        with pytest.raises(ResourceNotFoundError):
            await backend.read(path)
        with pytest.raises(ResourceNotFoundError):
            await backend.delete(path)

    asyncio.run(scenario())


def test_binary_value(backend: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await backend.write(path, bytes(range(256)) * 4)
        assert await backend.read(path) == bytes(range(256)) * 4

    asyncio.run(scenario())


def test_one_mebibyte(backend: SecretBackend, path: ResourcePath) -> None:
    value = (bytes(range(251)) * (MIB // 251 + 1))[:MIB]

    async def scenario() -> None:
        await backend.write(path, value)
        assert await backend.read(path) == value

    asyncio.run(scenario())


def test_concurrent_writers(backend: SecretBackend, path: ResourcePath) -> None:
    """Writers of distinct resources all land; writers of one resource leave one whole value."""
    others = [ResourcePath(path.repository, "conformance", f"k{i}") for i in range(8)]
    values = [bytes([i]) * 4096 for i in range(8)]

    async def scenario() -> None:
        await asyncio.gather(
            *(backend.write(p, v) for p, v in zip(others, values, strict=True)),
            *(backend.write(path, v) for v in values),
        )
        assert [await backend.read(p) for p in others] == values
        assert await backend.read(path) in values

    asyncio.run(scenario())

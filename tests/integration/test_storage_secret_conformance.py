"""Every writable secret backend of the resource plugin behaves the same: one suite for all.

The key-value backend runs over PostgreSQL here (the key-value suite covers the other stores);
PKCS#11 runs on a real SoftHSM2 token, its version records in PostgreSQL (versions, listing) or
in memory (the rest); Vault (KV v1 and v2) is the production hvac client against
the Vault stand-in over HTTP.

Aliyun KMS, AWS Secrets Manager and GCP Secret Manager are read-only, as upstream: they join the
read part of the suite (the ``read_only`` tests at the end), with their secrets put in place the
way an operator would, through the service (its stand-in) rather than the KBS. Their own modules
cover the rest (test_storage_aliyun_kms.py, test_storage_aws_secrets.py,
test_storage_gcp_secrets.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from databases import fresh_postgres_database
from keybroker.errors import (
    NotImplementedByBackendError,
    ResourceNotFoundError,
    UnsupportedOperationError,
)
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.aws_secrets import AwsSecretsConfig, AwsSecretsSecretBackend
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.secrets import DirectoryTreeSecretBackend, KvSecretBackend, SecretBackend
from keybroker.storage.vault import VaultSecretBackend
from secret_backend_aliyun import aliyun_backend
from secret_backend_gcp import gcp_backend
from secret_backend_vault import vault_backend
from softhsm import SoftHsm
from standins.aws_secrets import REGION, MotoServer, aws_env
from standins.gcp_secrets import gcp_stand_in, use_service_account

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
        yield _pkcs11(softhsm, lambda _name: MemoryKeyValueStorage())


def _pkcs11(softhsm: SoftHsm, namespace: Callable[[str], KeyValueStorage]) -> Pkcs11SecretBackend:
    config = Pkcs11Config(module=softhsm.module, pin=softhsm.pin)
    return Pkcs11SecretBackend.from_config(config, namespace=namespace)


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


# --- versions, listing and metadata: the same on every backend that keeps versions ------------


@pytest.fixture(params=["kv-postgres", "pkcs11-postgres", "vault-kv2"])
def versioned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretBackend]:
    if request.param.endswith("postgres"):
        with fresh_postgres_database() as db:
            conninfo = f"host=127.0.0.1 user=postgres dbname={db}"
            stores: list[PostgresKeyValueStorage] = []

            def namespace(name: str) -> PostgresKeyValueStorage:
                stores.append(PostgresKeyValueStorage(conninfo, name))
                return stores[-1]

            if request.param == "kv-postgres":
                yield KvSecretBackend.in_namespaces(namespace)
            else:
                yield _pkcs11(request.getfixturevalue("softhsm"), namespace)
            for store in stores:
                asyncio.run(store.close())
    else:
        with vault_backend(tmp_path, kv_version=2) as vault:
            yield vault


async def _at(backend: SecretBackend, path: ResourcePath, number: int | None) -> bytes | None:
    version = await backend.resolve(path, number)
    if version is None:
        return None
    try:
        return await backend.read(path, version)
    except ResourceNotFoundError:
        return None


def test_versions_rollback_and_soft_delete(versioned: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        assert [await versioned.write(path, v) for v in (b"v1", b"v2", b"v3")] == [1, 2, 3]
        assert await _at(versioned, path, None) == b"v3"
        assert await _at(versioned, path, 1) == b"v1"
        assert await versioned.rollback(path, 1) == 4
        assert await versioned.read(path) == b"v1"
        await versioned.delete(path)  # soft: the current version
        assert await _at(versioned, path, None) is None
        with pytest.raises(ResourceNotFoundError):
            await versioned.read(path)
        assert await versioned.undelete(path, 4) == 4
        assert await versioned.read(path) == b"v1"
        await versioned.delete(path, 2)
        assert await _at(versioned, path, 2) is None
        record = await versioned.metadata(path)
        assert record.current == 4 and [v.number for v in record.versions] == [1, 2, 3, 4]
        assert record.version(2) is not None and record.version(2).deleted is not None  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_purge_a_version_then_the_resource(versioned: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await versioned.write(path, b"v1")
        await versioned.write(path, b"v2")
        await versioned.purge(path, 1)
        assert await _at(versioned, path, 1) is None
        assert [v.number for v in (await versioned.metadata(path)).versions] == [2]
        assert await versioned.read(path) == b"v2"
        await versioned.purge(path, None)
        with pytest.raises(ResourceNotFoundError):
            await versioned.metadata(path)
        with pytest.raises(ResourceNotFoundError):
            await versioned.read(path)

    asyncio.run(scenario())


def test_listing_by_prefix_in_pages(versioned: SecretBackend, path: ResourcePath) -> None:
    names = [ResourcePath(path.repository, t, g) for t, g in (("a", "x"), ("a", "y"), ("b", "z"))]

    async def scenario() -> None:
        for name in names:
            await versioned.write(name, b"SECRET")
        first, cursor = await versioned.list_resources(f"{path.repository}/", None, 2)
        assert [n for n, _ in first] == [str(names[0]), str(names[1])]
        assert cursor == str(names[1])
        rest, end = await versioned.list_resources(f"{path.repository}/", cursor, 2)
        assert [n for n, _ in rest] == [str(names[2])] and end is None
        only_a, _ = await versioned.list_resources(f"{path.repository}/a/", None, 10)
        assert [n for n, _ in only_a] == [str(names[0]), str(names[1])]
        assert all(record.current == 1 for _, record in first + rest)
        assert "SECRET" not in repr(first + rest)

    asyncio.run(scenario())


def test_backends_without_versions_say_so(backend: SecretBackend, path: ResourcePath) -> None:
    async def scenario() -> None:
        await backend.write(path, b"value")
        if backend.versioned:
            assert (await backend.metadata(path)).current is not None
            return
        with pytest.raises(NotImplementedByBackendError, match="not offered by the"):
            await backend.resolve(path, 1)
        for operation in (backend.rollback(path, 1), backend.undelete(path, 1)):
            with pytest.raises(NotImplementedByBackendError):
                await operation

    asyncio.run(scenario())


def test_listing_and_metadata_where_the_backend_can_list(
    backend: SecretBackend, path: ResourcePath
) -> None:
    """Every writable backend lists, except Vault KV v1 (501); values never appear."""
    others = [ResourcePath(path.repository, "conformance", f"{path.tag}{i}") for i in (1, 2)]

    async def scenario() -> None:
        for name in (path, *others):
            await backend.write(name, b"SECRET-in-listing")
        if isinstance(backend, VaultSecretBackend) and not backend.versioned:
            with pytest.raises(
                NotImplementedByBackendError, match="not offered by the Vault resource backend"
            ):
                await backend.list_resources(f"{path.repository}/", None, 10)
            return
        page, cursor = await backend.list_resources(f"{path.repository}/", None, 2)
        assert [name for name, _ in page] == [str(path), str(others[0])]
        rest, end = await backend.list_resources(f"{path.repository}/", cursor, 2)
        assert [name for name, _ in rest] == [str(others[1])] and end is None
        assert "SECRET-in-listing" not in repr(page + rest)
        assert (await backend.metadata(path)).current is not None
        with pytest.raises(ResourceNotFoundError):
            await backend.metadata(ResourcePath(path.repository, "none", "here"))

    asyncio.run(scenario())


# --- the read part, for the read-only backends -----------------------------------------------

Seed = Callable[[str, bytes], None]  # put a secret named tag in place, as an operator would


@pytest.fixture(params=["aliyun", "aws", "gcp"])
def read_only(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[SecretBackend, Seed]]:
    if request.param == "aliyun":
        with aliyun_backend(tmp_path) as (backend, kms):
            yield backend, kms.put_binary
    elif request.param == "aws":
        for name, value in aws_env(tmp_path).items():
            monkeypatch.setenv(name, value)
        with MotoServer(tmp_path / "moto.log") as moto:
            admin = moto.admin(tmp_path)
            config = AwsSecretsConfig(region=REGION, endpoint_url=moto.url, timeout=2)
            yield (
                AwsSecretsSecretBackend(config),
                lambda tag, value: admin.create_secret(Name=tag, SecretBinary=value),
            )
    else:
        with gcp_stand_in() as gcp:
            use_service_account(gcp, tmp_path, monkeypatch)
            yield gcp_backend(gcp), gcp.state.add_secret


def test_read_only_releases_what_the_service_holds(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    backend, seed = read_only
    seed(path.tag, bytes(range(256)) * 4)
    assert asyncio.run(backend.read(path)) == bytes(range(256)) * 4


def test_read_only_names_the_secret_by_tag_alone(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    """Upstream's mapping for all three: ``repo/type`` is ignored."""
    backend, seed = read_only
    seed(path.tag, b"one secret")
    elsewhere = ResourcePath("other-repo", "other-type", path.tag)
    assert asyncio.run(backend.read(elsewhere)) == b"one secret"


def test_read_only_missing_is_not_found(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    backend, _seed = read_only
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(backend.read(path))


def test_read_only_largest_secret_the_services_hold(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    """64 KiB: the cap of AWS Secrets Manager and GCP Secret Manager."""
    backend, seed = read_only
    value = (bytes(range(251)) * 262)[: 64 * 1024]
    seed(path.tag, value)
    assert asyncio.run(backend.read(path)) == value


def test_read_only_refuses_writes_and_deletes(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    backend, seed = read_only
    seed(path.tag, b"kept")
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.write(path, b"replaced"))
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.delete(path))
    assert asyncio.run(backend.read(path)) == b"kept"


def test_read_only_concurrent_reads(
    read_only: tuple[SecretBackend, Seed], path: ResourcePath
) -> None:
    backend, seed = read_only
    paths = [ResourcePath(path.repository, "conformance", f"{path.tag}-{i}") for i in range(6)]
    for i, each in enumerate(paths):
        seed(each.tag, bytes([i]) * 512)

    async def scenario() -> list[bytes]:
        return list(await asyncio.gather(*(backend.read(p) for p in paths)))

    assert asyncio.run(scenario()) == [bytes([i]) * 512 for i in range(6)]

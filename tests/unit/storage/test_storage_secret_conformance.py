"""Every writable secret backend of the resource plugin behaves the same: one suite for all.

The key-value backend runs over PostgreSQL here (the key-value suite covers the other stores);
PKCS#11 runs on a real SoftHSM2 token; Vault (KV v1 and v2) is the production hvac client against
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
from secret_backend_aliyun import aliyun_backend
from secret_backend_gcp import gcp_backend
from secret_backend_vault import vault_backend

from databases import fresh_postgres_database
from keybroker.errors import ResourceNotFoundError, UnsupportedOperationError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.aws_secrets import AwsSecretsConfig, AwsSecretsSecretBackend
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.secrets import DirectoryTreeSecretBackend, KvSecretBackend, SecretBackend
from softhsm import SoftHsm
from standins.aws_secrets import REGION, MotoServer, aws_env
from standins.gcp_secrets import gcp_stand_in, use_service_account

MIB = 1024 * 1024


@pytest.fixture(params=["kv-postgres", "directory-tree", "pkcs11", "vault-kv1", "vault-kv2"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretBackend]:
    if request.param == "kv-postgres":
        with fresh_postgres_database() as db:
            store = PostgresKeyValueStorage(f"host=127.0.0.1 user=postgres dbname={db}", "repo")
            yield KvSecretBackend(store)
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

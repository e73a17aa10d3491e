"""Secret backends of the resource plugin: the kv store and the seed-era directory tree."""

from __future__ import annotations

import asyncio
import os
import stat
from functools import partial
from pathlib import Path

import pytest

from keybroker.errors import PayloadTooLargeError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.secrets import (
    DEFAULT_MAX_RESOURCE_BYTES,
    DEFAULT_REPOSITORY_DIR,
    DirectoryTreeSecretBackend,
    KvSecretBackend,
    SecretBackend,
)

PATH = ResourcePath("repo", "type", "tag")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(params=["kv", "directory_tree"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SecretBackend:
    if request.param == "kv":
        return KvSecretBackend.in_namespaces(lambda _namespace: MemoryKeyValueStorage())
    return DirectoryTreeSecretBackend(tmp_path / "repository")


# --- both backends ----------------------------------------------------------------------------


def test_write_read_overwrite_delete(backend: SecretBackend) -> None:
    async def scenario() -> None:
        await backend.write(PATH, b"first")
        assert await backend.read(PATH) == b"first"
        await backend.write(PATH, bytes(range(256)))
        assert await backend.read(PATH) == bytes(range(256))
        await backend.delete(PATH)
        with pytest.raises(ResourceNotFoundError, match="resource not found: repo/type/tag"):
            await backend.read(PATH)

    asyncio.run(scenario())


def test_missing_resource_is_not_found(backend: SecretBackend) -> None:
    with pytest.raises(ResourceNotFoundError, match="resource not found: repo/type/tag"):
        asyncio.run(backend.read(PATH))


def test_deleting_a_missing_resource_is_not_found(backend: SecretBackend) -> None:
    with pytest.raises(ResourceNotFoundError, match="resource not found: repo/type/tag"):
        asyncio.run(backend.delete(PATH))


def test_oversized_write_refused(backend: SecretBackend) -> None:
    backend.max_bytes = 8
    with pytest.raises(PayloadTooLargeError, match="at most 8 bytes, found 9"):
        asyncio.run(backend.write(PATH, b"123456789"))
    asyncio.run(backend.write(PATH, b"12345678"))
    assert asyncio.run(backend.read(PATH)) == b"12345678"


def test_default_size_limit_is_16_mib() -> None:
    assert DEFAULT_MAX_RESOURCE_BYTES == 16 * 1024 * 1024
    backend = KvSecretBackend.in_namespaces(lambda _namespace: MemoryKeyValueStorage())
    assert backend.max_bytes == DEFAULT_MAX_RESOURCE_BYTES


# --- kvstorage --------------------------------------------------------------------------------


def test_kv_backend_uses_upstream_key_and_namespace(tmp_path: Path) -> None:
    """The current version is mirrored under upstream's key, so upstream's KBS reads it."""
    backend = KvSecretBackend.in_namespaces(partial(LocalFsKeyValueStorage, tmp_path))
    asyncio.run(backend.write(ResourcePath("default", "key", "one"), b"abc"))
    assert (tmp_path / "repository" / "default\\x2Fkey\\x2Fone").read_bytes() == b"abc"
    asyncio.run(backend.write(ResourcePath("default", "key", "one"), b"def"))
    assert (tmp_path / "repository" / "default\\x2Fkey\\x2Fone").read_bytes() == b"def"


def test_kv_backend_refuses_an_oversized_stored_value() -> None:
    storage = MemoryKeyValueStorage()
    asyncio.run(storage.set(str(PATH), b"123456789"))
    with pytest.raises(StorageError, match="larger than the limit of 8 bytes"):
        backend = KvSecretBackend(
            storage, meta=MemoryKeyValueStorage(), versions=MemoryKeyValueStorage(), max_bytes=8
        )
        asyncio.run(backend.read(PATH))


# --- seed-era directory tree ------------------------------------------------------------------


def test_operator_dropped_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "repo" / "type").mkdir(parents=True)
    (tmp_path / "repo" / "type" / "tag").write_bytes(b"dropped in by the operator")
    backend = DirectoryTreeSecretBackend(tmp_path)
    assert asyncio.run(backend.read(PATH)) == b"dropped in by the operator"


def test_directory_tree_layout_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    asyncio.run(DirectoryTreeSecretBackend(root).write(PATH, b"secret"))

    assert (root / "repo" / "type" / "tag").read_bytes() == b"secret"
    assert [mode(p) for p in (root, root / "repo", root / "repo" / "type")] == [0o700] * 3
    assert mode(root / "repo" / "type" / "tag") == 0o600
    assert os.listdir(root / "repo" / "type") == ["tag"]  # no temp file left


def test_default_repository_dir() -> None:
    assert Path("/opt/confidential-containers/kbs/repository") == DEFAULT_REPOSITORY_DIR


def test_crash_during_write_keeps_the_old_resource(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = DirectoryTreeSecretBackend(tmp_path)
    asyncio.run(backend.write(PATH, b"old"))

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="writing resource repo/type/tag failed"):
        asyncio.run(backend.write(PATH, b"new"))
    monkeypatch.undo()

    assert asyncio.run(backend.read(PATH)) == b"old"
    assert os.listdir(tmp_path / "repo" / "type") == ["tag"]


def test_directory_tree_rejects_symlink_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "repository", tmp_path / "outside"
    outside.mkdir()
    (outside / "host-secret").write_bytes(b"not for guests")
    (root / "repo" / "type").mkdir(parents=True)
    (root / "repo" / "type" / "tag").symlink_to(outside / "host-secret")
    backend = DirectoryTreeSecretBackend(root)

    for operation in (backend.read(PATH), backend.write(PATH, b"x"), backend.delete(PATH)):
        with pytest.raises(StorageError, match="resolves outside the resource directory"):
            asyncio.run(operation)
    assert (outside / "host-secret").read_bytes() == b"not for guests"
    assert (root / "repo" / "type" / "tag").is_symlink()


def test_directory_tree_rejects_symlinked_directory_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "repository", tmp_path / "outside"
    (outside / "type").mkdir(parents=True)
    (outside / "type" / "tag").write_bytes(b"not for guests")
    root.mkdir()
    (root / "repo").symlink_to(outside, target_is_directory=True)
    backend = DirectoryTreeSecretBackend(root)

    with pytest.raises(StorageError, match="resolves outside the resource directory"):
        asyncio.run(backend.read(PATH))


def test_directory_tree_follows_symlinks_inside(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "key").write_bytes(b"shared key")
    (tmp_path / "repo" / "type").mkdir(parents=True)
    (tmp_path / "repo" / "type" / "tag").symlink_to(Path("..", "..", "shared", "key"))
    backend = DirectoryTreeSecretBackend(tmp_path)

    assert asyncio.run(backend.read(PATH)) == b"shared key"
    asyncio.run(backend.write(PATH, b"rotated"))  # writes go to the link's target
    assert (tmp_path / "shared" / "key").read_bytes() == b"rotated"
    asyncio.run(backend.delete(PATH))  # deletes remove the link, not the target
    assert not (tmp_path / "repo" / "type" / "tag").is_symlink()
    assert (tmp_path / "shared" / "key").read_bytes() == b"rotated"


def test_oversized_resource_file_refused(tmp_path: Path) -> None:
    (tmp_path / "repo" / "type").mkdir(parents=True)
    (tmp_path / "repo" / "type" / "tag").write_bytes(b"123456789")
    with pytest.raises(StorageError, match="larger than the limit of 8 bytes"):
        asyncio.run(DirectoryTreeSecretBackend(tmp_path, max_bytes=8).read(PATH))
    assert asyncio.run(DirectoryTreeSecretBackend(tmp_path, max_bytes=9).read(PATH))


def test_planted_fifo_resource_does_not_hang(tmp_path: Path) -> None:
    (tmp_path / "repo" / "type").mkdir(parents=True)
    os.mkfifo(tmp_path / "repo" / "type" / "tag")
    with pytest.raises(StorageError, match="not a regular file"):
        asyncio.run(DirectoryTreeSecretBackend(tmp_path).read(PATH))


def test_file_where_a_directory_belongs_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "repo").write_bytes(b"a file, not a directory")
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(DirectoryTreeSecretBackend(tmp_path).read(PATH))

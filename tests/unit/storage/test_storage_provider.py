"""One store per namespace, from one backend configuration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.provider import StorageProvider, local_fs_provider, memory_provider


class RecordingStorage(MemoryKeyValueStorage):
    """A real store that remembers being closed, or fails to close."""

    def __init__(self, fail_close: bool = False) -> None:
        super().__init__()
        self.closed = False
        self.fail_close = fail_close

    async def _close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise ConnectionError("server went away")


def test_same_instance_per_namespace() -> None:
    provider = memory_provider()
    assert provider.get("repository") is provider.get("repository")
    assert provider.get("repository") is not provider.get("kbs")


def test_namespaces_are_isolated() -> None:
    provider = memory_provider()
    asyncio.run(provider.get("repository").set("k", b"resource"))
    assert asyncio.run(provider.get("kbs").get("k")) is None


@pytest.mark.parametrize("namespace", ["", "../x", "a/b", "a.b", ".", "kbs session"])
def test_namespace_path_traversal_rejected(namespace: str) -> None:
    created: list[str] = []

    def factory(name: str) -> KeyValueStorage:
        created.append(name)
        return MemoryKeyValueStorage()

    with pytest.raises(StorageError, match="namespace"):
        StorageProvider(factory).get(namespace)
    assert created == []


def test_local_fs_provider_uses_one_directory_per_namespace(tmp_path: Path) -> None:
    provider = local_fs_provider(tmp_path)
    store = provider.get("kbs_protocol_session")
    assert isinstance(store, LocalFsKeyValueStorage)
    asyncio.run(store.set("id", b"session"))
    assert (tmp_path / "kbs_protocol_session" / "id").read_bytes() == b"session"


def test_close_closes_every_store_even_after_a_failure() -> None:
    stores = {"a": RecordingStorage(fail_close=True), "b": RecordingStorage()}
    provider = StorageProvider(stores.__getitem__)
    provider.get("a")
    provider.get("b")

    with pytest.raises(StorageError, match="close failed: ConnectionError") as raised:
        asyncio.run(provider.close())
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert stores["a"].closed
    assert stores["b"].closed

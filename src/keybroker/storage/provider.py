"""Mints one key-value storage per namespace from one backend configuration."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage

_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")


class StorageProvider:
    def __init__(self, factory: Callable[[str], KeyValueStorage]) -> None:
        self._factory = factory
        self._instances: dict[str, KeyValueStorage] = {}

    def get(self, namespace: str) -> KeyValueStorage:
        if not _NAMESPACE.fullmatch(namespace):
            raise StorageError(f"invalid storage namespace {namespace[:64]!r}")
        if namespace not in self._instances:
            self._instances[namespace] = self._factory(namespace)
        return self._instances[namespace]

    async def close(self) -> None:
        for storage in self._instances.values():
            await storage.close()


def memory_provider(*, clock: Callable[[], float] = time.time) -> StorageProvider:
    return StorageProvider(lambda _namespace: MemoryKeyValueStorage(clock))


def local_fs_provider(dir_path: Path, *, clock: Callable[[], float] = time.time) -> StorageProvider:
    return StorageProvider(
        lambda namespace: LocalFsKeyValueStorage(dir_path, namespace, clock=clock)
    )

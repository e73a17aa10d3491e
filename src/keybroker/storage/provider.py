"""One key-value store per namespace, all from one backend configuration.

The KBS, the attestation service and the RVPS each ask the provider for their namespace
(``repository``, ``kbs``, ``kbs_protocol_session``, ...) and get the same instance every time.
Which backend serves them is decided once, at start-up, by the factory handed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from keybroker.errors import KeybrokerError
from keybroker.storage.base import KeyValueStorage, validate_namespace
from keybroker.storage.local_fs import DEFAULT_DIR_PATH, LocalFsKeyValueStorage
from keybroker.storage.local_json import DEFAULT_FILE_DIR_PATH, LocalJsonKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.shared_memory import SharedMemoryKeyValueStorage


class StorageProvider:
    def __init__(self, factory: Callable[[str], KeyValueStorage]) -> None:
        self._factory = factory
        self._stores: dict[str, KeyValueStorage] = {}

    def get(self, namespace: str) -> KeyValueStorage:
        """The store of ``namespace`` (``[A-Za-z0-9_-]+``), created on first use."""
        store = self._stores.get(validate_namespace(namespace))
        if store is None:
            store = self._stores[namespace] = self._factory(namespace)
        return store

    async def close(self) -> None:
        """Close every store handed out; the first failure is raised after all were tried."""
        stores, self._stores = list(self._stores.values()), {}
        failure: KeybrokerError | None = None
        for store in stores:
            try:
                await store.close()
            except KeybrokerError as e:  # close() already turned foreign errors into ours
                failure = failure or e
        if failure is not None:
            raise failure


def memory_provider(*, clock: Callable[[], float] = time.monotonic) -> StorageProvider:
    return StorageProvider(lambda _namespace: MemoryKeyValueStorage(clock))


def local_fs_provider(
    dir_path: Path = DEFAULT_DIR_PATH, *, clock: Callable[[], float] = time.time
) -> StorageProvider:
    return StorageProvider(lambda namespace: LocalFsKeyValueStorage(dir_path, namespace, clock))


def shared_memory_provider(
    dir_path: Path, *, clock: Callable[[], float] = time.time
) -> StorageProvider:
    """The worker processes' shared "memory" store (see :mod:`keybroker.storage.shared_memory`)."""
    return StorageProvider(
        lambda namespace: SharedMemoryKeyValueStorage(dir_path, namespace, clock)
    )


def local_json_provider(
    file_dir_path: Path = DEFAULT_FILE_DIR_PATH, *, clock: Callable[[], float] = time.time
) -> StorageProvider:
    return StorageProvider(
        lambda namespace: LocalJsonKeyValueStorage(file_dir_path, namespace, clock)
    )

"""Secret backends of the ``resource`` plugin: where resource bytes live.

- ``KvSecretBackend``: the shared key-value store, key ``repo/type/tag`` (upstream's
  ``kvstorage``; namespace ``repository``).
- ``DirectoryTreeSecretBackend``: the seed-era layout ``<dir>/<repo>/<type>/<tag>``, so an
  operator can drop files in. Symlinks an operator placed are followed only while the target
  stays inside the directory.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from keybroker.errors import KeybrokerError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import write_atomically

DEFAULT_MAX_RESOURCE_BYTES = 16 * 1024 * 1024


class SecretBackend(ABC):
    async def read(self, path: ResourcePath) -> bytes:
        data = await self._guard_read(path)
        if data is None:
            raise ResourceNotFoundError(f"resource not found: {path}")
        return data

    async def write(self, path: ResourcePath, data: bytes) -> None:
        try:
            await self._write(path, data)
        except KeybrokerError:
            raise
        except OSError as e:
            raise StorageError(f"cannot store resource {path}: {e.strerror}") from e

    async def delete(self, path: ResourcePath) -> None:
        try:
            found = await self._delete(path)
        except KeybrokerError:
            raise
        except OSError as e:
            raise StorageError(f"cannot delete resource {path}: {e.strerror}") from e
        if not found:
            raise ResourceNotFoundError(f"resource not found: {path}")

    async def _guard_read(self, path: ResourcePath) -> bytes | None:
        try:
            return await self._read(path)
        except KeybrokerError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read resource {path}: {e.strerror}") from e

    @abstractmethod
    async def _read(self, path: ResourcePath) -> bytes | None: ...

    @abstractmethod
    async def _write(self, path: ResourcePath, data: bytes) -> None: ...

    @abstractmethod
    async def _delete(self, path: ResourcePath) -> bool: ...


class KvSecretBackend(SecretBackend):
    def __init__(self, storage: KeyValueStorage) -> None:
        self._storage = storage

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._storage.get(str(path))

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._storage.set(str(path), data)

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._storage.delete(str(path)) is not None


class DirectoryTreeSecretBackend(SecretBackend):
    def __init__(self, dir_path: Path, *, max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES) -> None:
        self._root = Path(dir_path)
        self._max_bytes = max_bytes
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create resource directory {self._root}: {e.strerror}"
            ) from e

    def _file(self, path: ResourcePath) -> Path:
        candidate = self._root.joinpath(*path.segments())
        # Defence in depth: ResourcePath already forbids traversal, but an operator's symlink
        # could still point out of the repository.
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self._root.resolve()):
            raise StorageError(f"resource {path} resolves outside the resource directory")
        return candidate

    async def _read(self, path: ResourcePath) -> bytes | None:
        file = self._file(path)
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return None
        if size > self._max_bytes:
            raise StorageError(f"resource {path} is larger than {self._max_bytes} bytes")
        return file.read_bytes()

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        file = self._file(path)
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(file, data)

    async def _delete(self, path: ResourcePath) -> bool:
        try:
            os.unlink(self._file(path))
        except FileNotFoundError:
            return False
        return True

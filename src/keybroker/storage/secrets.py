"""Secret backends of the ``resource`` plugin: where the bytes of ``repo/type/tag`` live.

- :class:`KvSecretBackend`: upstream's ``kvstorage`` backend. Resource ``repo/type/tag`` is the
  key ``"repo/type/tag"`` of a key-value store (the KBS binds it to namespace ``repository``).
- :class:`DirectoryTreeSecretBackend`: the seed-era ``type = "LocalFs"`` backend. Resource
  ``repo/type/tag`` is the file ``<dir_path>/<repo>/<type>/<tag>``, so an operator can drop
  files in.

The public methods of :class:`SecretBackend` enforce the size limit, report a missing resource
as :class:`ResourceNotFoundError` and turn a backend's foreign failures into
:class:`StorageError`. No policy here: whether a caller may read a resource is decided before.
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

from keybroker.errors import PayloadTooLargeError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import KeyValueStorage, translate_errors
from keybroker.storage.local_fs import (
    fsync_directory,
    make_private_dirs,
    read_file,
    write_atomically,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_RESOURCE_BYTES = 16 * 1024 * 1024
DEFAULT_REPOSITORY_DIR = Path("/opt/confidential-containers/kbs/repository")


class SecretBackend(ABC):
    def __init__(self, *, max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES) -> None:
        self.max_bytes = max_bytes

    async def read(self, path: ResourcePath) -> bytes:
        data = await translate_errors(f"reading resource {path}", self._read(path))
        if data is None:
            raise ResourceNotFoundError(f"resource not found: {path}")
        if len(data) > self.max_bytes:
            raise StorageError(
                f"resource {path} is larger than the limit of {self.max_bytes} bytes"
            )
        return data

    async def write(self, path: ResourcePath, data: bytes) -> None:
        if len(data) > self.max_bytes:  # it could be stored, but never read back
            raise PayloadTooLargeError(
                f"a resource has at most {self.max_bytes} bytes, found {len(data)}"
            )
        await translate_errors(f"writing resource {path}", self._write(path, bytes(data)))

    async def delete(self, path: ResourcePath) -> None:
        if not await translate_errors(f"deleting resource {path}", self._delete(path)):
            raise ResourceNotFoundError(f"resource not found: {path}")

    @abstractmethod
    async def _read(self, path: ResourcePath) -> bytes | None:
        """The resource's bytes, or None if there is no such resource."""

    @abstractmethod
    async def _write(self, path: ResourcePath, data: bytes) -> None: ...

    @abstractmethod
    async def _delete(self, path: ResourcePath) -> bool:
        """Remove the resource; False if there was none."""


class KvSecretBackend(SecretBackend):
    def __init__(
        self, storage: KeyValueStorage, *, max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self._storage = storage

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._storage.get(str(path))

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._storage.set(str(path), data)

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._storage.delete(str(path)) is not None


class DirectoryTreeSecretBackend(SecretBackend):
    """Resources as files ``<dir_path>/<repo>/<type>/<tag>``.

    Symlinks: an operator may link a resource file, or a repository or type directory, to
    somewhere else *inside* ``dir_path``; such links are followed. A link whose target resolves
    outside ``dir_path`` is refused with :class:`StorageError` (and a warning naming it in the
    log), for reads, writes and deletes alike: whoever can plant a link must not turn the KBS
    into a reader of arbitrary files. ``ResourcePath`` already rules out ``..``; the check on the
    resolved path is defence in depth. Writes go through a link to its target (like ``>``);
    deletes remove the link itself (like ``rm``). The final open refuses a symlink
    (``O_NOFOLLOW``), so swapping the file for a link after the check fails closed.
    """

    def __init__(
        self,
        dir_path: Path = DEFAULT_REPOSITORY_DIR,
        *,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        try:
            make_private_dirs(Path(dir_path))
            self._root = Path(dir_path).resolve(strict=True)
        except OSError as e:
            raise StorageError(f"cannot create resource directory {dir_path}: {e.strerror}") from e

    def _locate(self, path: ResourcePath) -> tuple[Path, Path]:
        """``(entry, target)``: the resource's directory entry, with its parent directories
        resolved, and the file it finally stands for. Both must lie inside the root."""
        parent = self._root.joinpath(path.repository, path.type).resolve()
        entry = parent / path.tag
        target = entry.resolve()
        for resolved in (parent, target):
            if not resolved.is_relative_to(self._root):
                log.warning(
                    "refusing resource %s: it resolves to %s, outside %s",
                    path,
                    resolved,
                    self._root,
                )
                raise StorageError(f"resource {path} resolves outside the resource directory")
        return entry, target

    async def _read(self, path: ResourcePath) -> bytes | None:
        _, target = self._locate(path)
        return await read_file(target, what=f"resource {path}", max_bytes=self.max_bytes)

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        _, target = self._locate(path)

        def write() -> None:
            make_private_dirs(target.parent)
            write_atomically(target, data)

        await asyncio.to_thread(write)  # fsync: keep it off the event loop

    async def _delete(self, path: ResourcePath) -> bool:
        entry, _ = self._locate(path)

        def delete() -> bool:
            try:
                os.unlink(entry)
            except (FileNotFoundError, NotADirectoryError):
                return False
            fsync_directory(entry.parent)  # a deleted secret must not come back after a crash
            return True

        return await asyncio.to_thread(delete)

"""Secret backends of the ``resource`` plugin: where the bytes of ``repo/type/tag`` live.

- :class:`KvSecretBackend`: upstream's ``kvstorage`` backend, versioned. Resource
  ``repo/type/tag``'s current bytes are the key ``"repo/type/tag"`` of a key-value store (the
  KBS binds it to namespace ``repository``), its versions live beside it
  (:mod:`keybroker.storage.versions`).
- :class:`DirectoryTreeSecretBackend`: the seed-era ``type = "LocalFs"`` backend. Resource
  ``repo/type/tag`` is the file ``<dir_path>/<repo>/<type>/<tag>``, so an operator can drop
  files in.

The public methods of :class:`SecretBackend` enforce the size limit, report a missing resource
as :class:`ResourceNotFoundError` and turn a backend's foreign failures into
:class:`StorageError`. No policy here: whether a caller may read a resource is decided before.

Versions, listing and metadata are offered by backends that can keep them (``versioned``); the
others answer :class:`NotImplementedByBackendError` (501) for them, and keep reading, writing
and deleting exactly as before. The directory tree lists its files and reports each as an
unversioned resource (version 1, the file's size and modification time): its files are the
truth, edited by operators outside the KBS, so it keeps no versions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from keybroker.errors import (
    KeybrokerError,
    NotImplementedByBackendError,
    PayloadTooLargeError,
    ResourceNotFoundError,
    StorageError,
)
from keybroker.protocol.resource_path import ResourcePath, is_valid_segment
from keybroker.storage.base import KeyValueStorage, translate_errors
from keybroker.storage.local_fs import (
    fsync_directory,
    make_private_dirs,
    read_file,
    write_atomically,
)
from keybroker.storage.read_cache import AfterChange, no_stamp
from keybroker.storage.versions import (
    DEFAULT_MAX_VERSIONS,
    ResourceRecord,
    Version,
    VersionedResources,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_MAX_RESOURCE_BYTES = 16 * 1024 * 1024
DEFAULT_REPOSITORY_DIR = Path("/opt/confidential-containers/kbs/repository")


def _file_record(info: os.stat_result) -> ResourceRecord:
    """A file of the directory tree as an unversioned resource."""
    version = Version(1, "", info.st_mtime, info.st_size)
    return ResourceRecord(1, 2, info.st_mtime, info.st_mtime, (version,), legacy=True)


class SecretBackend(ABC):
    versioned = False  # whether versions, listing and metadata are offered

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES) -> None:
        self.max_bytes = max_bytes

    async def resolve(self, path: ResourcePath, requested: int | None) -> Version | None:
        """The version a read of ``path`` would release (None if there is none, or the backend
        keeps no versions), for the resource policy to see before anything is read."""
        if requested is not None:
            raise self._unversioned("reading a given version")
        return None

    async def read(self, path: ResourcePath, version: Version | None = None) -> bytes:
        data = await translate_errors(f"reading resource {path}", self._read_at(path, version))
        if data is None:
            raise ResourceNotFoundError(f"resource not found: {path}")
        if len(data) > self.max_bytes:
            raise StorageError(
                f"resource {path} is larger than the limit of {self.max_bytes} bytes"
            )
        return data

    async def write(self, path: ResourcePath, data: bytes) -> int | None:
        """Store ``data``; the version it became (None if the backend keeps no versions)."""
        if len(data) > self.max_bytes:  # it could be stored, but never read back
            raise PayloadTooLargeError(
                f"a resource has at most {self.max_bytes} bytes, found {len(data)}"
            )
        return await translate_errors(f"writing resource {path}", self._store(path, bytes(data)))

    async def delete(self, path: ResourcePath, version: int | None = None) -> None:
        """Delete the resource (versioned backends: soft-delete the current version, or
        ``version``, which can be undeleted until it is purged)."""
        if version is not None and not self.versioned:
            raise self._unversioned("deleting a given version")
        if not await translate_errors(f"deleting resource {path}", self._remove(path, version)):
            raise ResourceNotFoundError(f"resource not found: {path}")

    # --- versions, listing, metadata: versioned backends only ------------------------------

    async def metadata(self, path: ResourcePath) -> ResourceRecord:
        raise self._unversioned("resource metadata")

    async def list_resources(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        raise self._unversioned("listing resources")

    async def rollback(self, path: ResourcePath, version: int) -> int:
        raise self._unversioned("rollback")

    async def undelete(self, path: ResourcePath, version: int) -> int:
        raise self._unversioned("undelete")

    async def purge(self, path: ResourcePath, version: int | None) -> None:
        raise self._unversioned("purge")

    def _unversioned(self, what: str) -> NotImplementedByBackendError:
        return NotImplementedByBackendError(
            f"{what} is not offered by the {self.kind} resource backend (it keeps no "
            'versions); use storage_backend_type = "kvstorage"'
        )

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("SecretBackend") or "this"

    # What the public methods call: versioned backends override these; the others implement
    # only _read, _write and _delete.

    async def _read_at(self, path: ResourcePath, version: Version | None) -> bytes | None:
        return await self._read(path)

    async def _store(self, path: ResourcePath, data: bytes) -> int | None:
        await self._write(path, data)
        return None

    async def _remove(self, path: ResourcePath, version: int | None) -> bool:
        return await self._delete(path)

    @abstractmethod
    async def _read(self, path: ResourcePath) -> bytes | None:
        """The resource's bytes, or None if there is no such resource."""

    @abstractmethod
    async def _write(self, path: ResourcePath, data: bytes) -> None: ...

    @abstractmethod
    async def _delete(self, path: ResourcePath) -> bool:
        """Remove the resource; False if there was none."""


class KvSecretBackend(SecretBackend):
    """Versioned resources on three namespaces of a key-value store: ``storage`` holds the
    current bytes in upstream's layout, ``meta`` the version records, ``versions`` the bytes
    of every version (see :mod:`keybroker.storage.versions`).

    ``after_change`` is awaited after every change (write, delete, rollback, undelete, purge),
    also after one that failed part way (it may have written something): the KBS passes
    :meth:`~keybroker.storage.read_cache.ReadCache.changed`, which writes the generation
    stamp the read caches of every process follow."""

    versioned = True

    def __init__(
        self,
        storage: KeyValueStorage,
        *,
        meta: KeyValueStorage,
        versions: KeyValueStorage,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
        after_change: AfterChange = no_stamp,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self._resources = VersionedResources(storage, meta, versions, max_versions=max_versions)
        self._after_change = after_change

    @classmethod
    def in_namespaces(
        cls,
        namespace: Callable[[str], KeyValueStorage],
        base: str = "repository",
        *,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> KvSecretBackend:
        """The backend on namespaces ``<base>``, ``<base>_meta`` and ``<base>_versions`` of
        one store (``namespace`` is the provider's look-up)."""
        return cls(
            namespace(base),
            meta=namespace(f"{base}_meta"),
            versions=namespace(f"{base}_versions"),
            max_versions=max_versions,
            max_bytes=max_bytes,
        )

    @property
    def kind(self) -> str:
        return "kvstorage"

    async def resolve(self, path: ResourcePath, requested: int | None) -> Version | None:
        return await self._guard(path, self._resources.resolve(path, requested))

    async def _read_at(self, path: ResourcePath, version: Version | None) -> bytes | None:
        if version is None:
            version = await self._resources.resolve(path, None)
            if version is None:
                return None
        return await self._resources.read(path, version)

    async def _store(self, path: ResourcePath, data: bytes) -> int | None:
        return await self._changing(self._resources.write(path, data))

    async def _remove(self, path: ResourcePath, version: int | None) -> bool:
        # a missing one raises, with its reason
        await self._changing(self._resources.delete(path, version))
        return True

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._read_at(path, None)

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._store(path, data)

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._remove(path, None)

    async def metadata(self, path: ResourcePath) -> ResourceRecord:
        record = await self._guard(path, self._resources.record(path))
        if record is None:
            raise ResourceNotFoundError(f"resource not found: {path}")
        return record

    async def list_resources(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        return await translate_errors(
            "listing resources", self._resources.list(prefix, after, limit)
        )

    async def rollback(self, path: ResourcePath, version: int) -> int:
        return await self._guard(path, self._changing(self._resources.rollback(path, version)))

    async def undelete(self, path: ResourcePath, version: int) -> int:
        return await self._guard(path, self._changing(self._resources.undelete(path, version)))

    async def purge(self, path: ResourcePath, version: int | None) -> None:
        await self._guard(path, self._changing(self._resources.purge(path, version)))

    async def _changing(self, change: Awaitable[T]) -> T:
        """``change``, then ``after_change``: data first, stamp second (the order the read
        caches rely on). A failed change is followed by the stamp too; if that fails as well,
        the change's own error is the one raised."""
        try:
            result = await change
        except BaseException:
            try:
                await self._after_change()
            except KeybrokerError as e:
                log.warning("after a failed resource change: %s", e.detail)
            raise
        await self._after_change()
        return result

    @staticmethod
    async def _guard(path: ResourcePath, pending: Awaitable[T]) -> T:
        return await translate_errors(f"resource {path}", pending)


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

    async def metadata(self, path: ResourcePath) -> ResourceRecord:
        _, target = self._locate(path)
        try:
            info = await asyncio.to_thread(os.stat, target)
        except (FileNotFoundError, NotADirectoryError):
            raise ResourceNotFoundError(f"resource not found: {path}") from None
        except OSError as e:
            raise StorageError(f"reading resource {path} failed: {e.strerror}") from None
        return _file_record(info)

    async def list_resources(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        return await translate_errors(
            "listing resources", asyncio.to_thread(self._list_sync, prefix, after, limit)
        )

    def _list_sync(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        """Walk ``<root>/<repo>/<type>/<tag>`` (names that are valid segments only, links
        resolving outside the root skipped): O(files) per page."""
        wanted = [segment for segment in prefix.split("/") if segment]
        found: list[tuple[str, ResourceRecord]] = []
        # sorted as whole names ("a-b/..." before "a/..."), the order cursors continue in
        for name in sorted(self._walk(self._root, wanted, [])):
            if after is not None and name <= after:
                continue
            try:
                _, target = self._locate(ResourcePath.parse(name))
                info = os.stat(target)
            except (StorageError, OSError):
                continue  # outside the root, or gone since
            found.append((name, _file_record(info)))
            if len(found) == limit:
                return found, name
        return found, None

    def _walk(self, directory: Path, wanted: list[str], parents: list[str]) -> Iterator[str]:
        depth = len(parents)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if not is_valid_segment(name) or (depth < len(wanted) and name != wanted[depth]):
                continue
            entry = directory / name
            if depth == 2:
                if entry.is_file():
                    yield "/".join([*parents, name])
            elif entry.is_dir():
                yield from self._walk(entry, wanted, [*parents, name])

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

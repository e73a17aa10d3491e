"""Versioned resources on a key-value store: every write is a new version, none is ever lost.

Three namespaces of one store (the KBS uses ``repository``, ``repository_meta`` and
``repository_versions``):

- ``repository``, key ``repo/type/tag``: the bytes of the current version, in upstream Trustee's
  layout, so an upstream KBS (or an operator's file dropped in) reads the same directory or
  table. Keybroker writes this *mirror* after every change and never serves from it once a
  resource is versioned; a resource found only here (written before versioning, or by upstream)
  is served as version 1, and its first versioned write migrates it: its bytes become version 1,
  the new bytes version 2.
- ``repository_meta``, key ``repo/type/tag``: a small JSON record (current version, the next
  number, and per version its creation time, size, soft-delete time and the id of its bytes).
  The record is the only thing compared: every change reads it and writes the new one with
  :meth:`~keybroker.storage.base.KeyValueStorage.compare_and_set`, so two replicas writing at
  once both get a version (the loser reads again and retries, at most :data:`CAS_ATTEMPTS`
  times, with a short random pause). Version numbers are contiguous; the current version of a
  write is always the last one.
- ``repository_versions``, key ``repo/type/tag/<id>``: the bytes of a version, under a random
  id written *before* the record names it. Writers racing for a number never overwrite each
  other's bytes; a writer that crashes between the two steps leaves an unreferenced entry that
  purging the resource removes (even when no record or current copy is left to show). A
  rollback makes a new version that names the same id. A blob key is written once and never
  overwritten, so its bytes can be cached by key (``_store_blob`` gives the argument).

Reading a version costs two round trips (the record, then the bytes); a resource with no record
costs two as well (the record's absence, then the mirror). The KBS may hand in stores that
answer from its read caches (``keybroker.storage.read_cache``); this module does not know.
No policy here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from keybroker.errors import (
    BadRequestError,
    KeybrokerError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import MAX_PAGE, KeyValueStorage

DEFAULT_MAX_VERSIONS = 10
MAX_VERSIONS_LIMIT = 1000
MAX_VERSION_NUMBER = 2**31 - 1
CAS_ATTEMPTS = 32
_RETRY_PAUSE = 0.01  # seconds, at most, times the attempt number (with jitter)
_MIRROR_ATTEMPTS = 4
_FORMAT = 1
_MAX_RECORD_BYTES = 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Version:
    number: int
    blob: str  # "" for a resource with no record: its bytes are the mirror
    created: float | None
    size: int | None
    deleted: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.number,
            "blob": self.blob,
            "created": self.created,
            "size": self.size,
            "deleted": self.deleted,
        }


@dataclass(frozen=True)
class ResourceRecord:
    """What is known of one resource; ``legacy`` when it has no record yet (version 1 only)."""

    current: int | None
    next: int
    created: float | None
    updated: float | None
    versions: tuple[Version, ...]
    legacy: bool = False

    def version(self, number: int) -> Version | None:
        return next((v for v in self.versions if v.number == number), None)

    def live(self, number: int | None) -> Version | None:
        """The version ``number`` (the current one when None) unless it is soft-deleted."""
        wanted = self.current if number is None else number
        found = None if wanted is None else self.version(wanted)
        return None if found is None or found.deleted is not None else found

    def to_bytes(self) -> bytes:
        document = {
            "format": _FORMAT,
            "current": self.current,
            "next": self.next,
            "created": self.created,
            "updated": self.updated,
            "versions": [v.to_json() for v in self.versions],
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, name: str) -> ResourceRecord:
        """Parse a stored record; anything unexpected is a StorageError (fail closed)."""
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("format") != _FORMAT:
                raise ValueError("unknown format")
            versions = tuple(_version(item) for item in document["versions"])
            current = document["current"]
            if current is not None and not isinstance(current, int):
                raise ValueError("current is not a number")
            return cls(
                current=current,
                next=int(document["next"]),
                created=_time(document["created"]),
                updated=_time(document["updated"]),
                versions=versions,
            )
        except (ValueError, TypeError, KeyError) as e:
            raise StorageError(f"the version record of {name} is malformed ({e})") from None


def _time(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError("a time is a number")
    return float(value)


def _version(item: object) -> Version:
    if not isinstance(item, dict):
        raise TypeError("a version is an object")
    number, blob, size = item["n"], item["blob"], item["size"]
    if not isinstance(number, int) or not isinstance(blob, str) or not isinstance(size, int):
        raise TypeError("a version has a number, a blob id and a size")
    return Version(number, blob, _time(item["created"]), size, _time(item["deleted"]))


def parse_version(text: str) -> int:
    """A version number from a query (``?version=3``): 1 to 2^31-1, plain decimal digits."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or text.startswith("0"):
        raise BadRequestError(f"version must be a positive decimal integer, found {text[:32]!r}")
    number = int(text)
    if number > MAX_VERSION_NUMBER:
        raise BadRequestError(f"version must be at most {MAX_VERSION_NUMBER}")
    return number


@dataclass(frozen=True)
class _Change:
    """The new record (None: remove it) and the number the caller answers with."""

    record: ResourceRecord | None
    answer: int


Edit = Callable[[ResourceRecord | None, float], _Change]


class VersionedResources:
    def __init__(
        self,
        mirror: KeyValueStorage,
        meta: KeyValueStorage,
        versions: KeyValueStorage,
        *,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        clock: Callable[[], float] = time.time,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 1 <= max_versions <= MAX_VERSIONS_LIMIT:
            raise StorageError(f"max_versions is 1 to {MAX_VERSIONS_LIMIT}, found {max_versions}")
        self._mirror = mirror
        self._meta = meta
        self._versions = versions
        self.max_versions = max_versions
        self._clock = clock
        self._pause = pause

    # --- reading ---------------------------------------------------------------------------

    async def record(self, path: ResourcePath) -> ResourceRecord | None:
        """The resource's record; a synthesized one for a resource with no record yet."""
        raw = await self._meta.get(str(path))
        if raw is not None:
            return ResourceRecord.from_bytes(raw, str(path))
        if await self._mirror.get(str(path)) is None:
            return None
        return _legacy_record(None)

    async def resolve(self, path: ResourcePath, requested: int | None) -> Version | None:
        """The version a read of ``path`` gets (the current one unless ``requested``), or None
        if there is no such live version. One round trip when the resource has a record."""
        raw = await self._meta.get(str(path))
        if raw is not None:
            return ResourceRecord.from_bytes(raw, str(path)).live(requested)
        if requested in (None, 1):
            return Version(1, "", None, None)  # the mirror, if any: found (or not) on reading
        return None

    async def read(self, path: ResourcePath, version: Version) -> bytes | None:
        """The bytes of a resolved version; None if it has gone since (purged, retired)."""
        if version.blob:
            return await self._versions.get(f"{path}/{version.blob}")
        data = await self._mirror.get(str(path))
        # a versioned write may have just migrated it: the record decides then
        if data is not None and await self._meta.get(str(path)) is None:
            return data
        again = await self.resolve(path, 1)
        if again is None or not again.blob:
            return None
        return await self._versions.get(f"{path}/{again.blob}")

    async def list(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        """A page of resources whose names start with ``prefix`` (whole segments, ending with
        ``/``, or empty) sorting after ``after``, and the name to continue after (None at the
        end). Values are never read."""
        limit = max(1, min(limit, MAX_PAGE))
        versioned = await self._meta.list_page(prefix, after, limit)
        mirrored = await self._mirror.list_page(prefix, after, limit)
        # Each source is complete up to its last name only when it returned a full page.
        bounds = [page[-1] for page in (versioned, mirrored) if len(page) == limit]
        boundary = min(bounds) if bounds else None
        names = sorted(
            name
            for name in set(versioned) | set(mirrored)
            if (boundary is None or name <= boundary) and _is_resource(name)
        )[:limit]
        records = await self._meta.get_many(names)
        page = [
            (
                name,
                ResourceRecord.from_bytes(records[name], name)
                if name in records
                else _legacy_record(None),
            )
            for name in names
        ]
        cursor = names[-1] if len(names) == limit else boundary
        return page, cursor

    # --- changing --------------------------------------------------------------------------

    async def write(self, path: ResourcePath, data: bytes) -> int:
        """Store ``data`` as a new version, made current; its number."""
        blob = _new_blob()
        keys = (
            (self._mirror, str(path)),
            (self._meta, str(path)),
            (self._versions, f"{path}/{blob}"),
        )
        if not all(store.storable(key) for store, key in keys):
            raise BadRequestError(f"resource name {str(path)[:64]}... is too long for this store")
        blob = await self._store_blob(path, data, blob)
        size = len(data)

        def add(record: ResourceRecord | None, now: float) -> _Change:
            return _Change(*self._added(record, blob, size, now))

        try:
            return await self._update(path, add)
        except BaseException:
            await self._versions.delete(f"{path}/{blob}")
            raise

    async def rollback(self, path: ResourcePath, number: int) -> int:
        """Make version ``number``'s bytes current again, as a new version; its number."""

        def restore(record: ResourceRecord | None, now: float) -> _Change:
            source = None if record is None else record.live(number)
            if record is None or source is None:
                raise ResourceNotFoundError(f"resource {path} has no live version {number}")
            return _Change(*self._added(record, source.blob, source.size or 0, now))

        return await self._update(path, restore)

    async def delete(self, path: ResourcePath, number: int | None) -> int:
        """Soft-delete version ``number`` (the current one when None); its number."""

        def mark(record: ResourceRecord | None, now: float) -> _Change:
            if record is None:
                raise ResourceNotFoundError(f"resource not found: {path}")
            target = record.live(number)
            if target is None:
                which = "current version" if number is None else f"version {number}"
                raise ResourceNotFoundError(f"resource not found: {path} has no live {which}")
            versions = tuple(
                replace(v, deleted=now) if v.number == target.number else v for v in record.versions
            )
            return _Change(replace(record, versions=versions, updated=now), target.number)

        return await self._update(path, mark)

    async def undelete(self, path: ResourcePath, number: int) -> int:
        """Bring back soft-deleted version ``number``."""

        def unmark(record: ResourceRecord | None, now: float) -> _Change:
            target = None if record is None else record.version(number)
            if record is None or target is None:
                raise ResourceNotFoundError(f"resource {path} has no version {number}")
            if target.deleted is None:
                raise BadRequestError(f"version {number} of {path} is not deleted")
            versions = tuple(
                replace(v, deleted=None) if v.number == number else v for v in record.versions
            )
            return _Change(replace(record, versions=versions, updated=now), number)

        return await self._update(path, unmark)

    async def purge(self, path: ResourcePath, number: int | None) -> None:
        """Destroy version ``number``'s bytes for good, or the whole resource when None."""
        if number is not None:

            def drop(record: ResourceRecord | None, now: float) -> _Change:
                if record is None or record.version(number) is None:
                    raise ResourceNotFoundError(f"resource {path} has no version {number}")
                versions = tuple(v for v in record.versions if v.number != number)
                current = None if record.current == number else record.current
                changed = replace(record, versions=versions, current=current, updated=now)
                return _Change(changed, number)

            await self._update(path, drop)
            return
        if await self.record(path) is None:
            # Bytes no record names (a record store that lost its records, a writer that
            # crashed before its record): purging is how they go, even with nothing to show.
            if not await self._remove_unreferenced(path, keep=set()):
                raise ResourceNotFoundError(f"resource not found: {path}")
            return
        # The mirror first: once the record is gone a mirror would be served as version 1.
        await self._mirror.delete(str(path))
        await self._update(path, lambda _record, _now: _Change(None, 0))
        await self._mirror.delete(str(path))
        await self._remove_unreferenced(path, keep=set())

    async def _update(self, path: ResourcePath, edit: Edit) -> int:
        """Read the record, ``edit`` it, compare-and-set it; again if another writer won."""
        name = str(path)
        for attempt in range(CAS_ATTEMPTS):
            raw = await self._meta.get(name)
            record, migrated = await self._current_record(path, raw)
            try:
                change = edit(record, self._clock())
                if change.record is None and raw is None:
                    won = True  # nothing to remove
                else:
                    new = None if change.record is None else change.record.to_bytes()
                    won = await self._meta.compare_and_set(name, raw, new)
            except BaseException:
                if migrated is not None:
                    await self._versions.delete(f"{path}/{migrated}")
                raise
            if won:
                try:
                    await self._settle(path, record, change.record)
                except KeybrokerError as e:  # the change stands; the next one tidies up
                    log.warning("resource %s changed, but tidying up failed: %s", path, e.detail)
                return change.answer
            if migrated is not None:
                await self._versions.delete(f"{path}/{migrated}")
            await self._pause(random.uniform(0, _RETRY_PAUSE * (attempt + 1)))  # noqa: S311
        raise ServiceUnavailableError(
            f"resource {path} is being changed by other writers: gave up after "
            f"{CAS_ATTEMPTS} attempts, retry later"
        )

    async def _current_record(
        self, path: ResourcePath, raw: bytes | None
    ) -> tuple[ResourceRecord | None, str | None]:
        """The stored record; or, for a resource with only a mirror (written before
        versioning), a record whose version 1 is a fresh copy of the mirror (its blob id is
        returned too, to remove if this attempt loses)."""
        if raw is not None:
            return ResourceRecord.from_bytes(raw, str(path)), None
        legacy = await self._mirror.get(str(path))
        if legacy is None:
            return None, None
        blob = await self._store_blob(path, legacy, _new_blob())
        return _legacy_record(Version(1, blob, self._clock(), len(legacy))), blob

    async def _store_blob(self, path: ResourcePath, data: bytes, blob: str) -> str:
        """Write ``data`` under a blob key that did not exist, and return its id.

        Blob keys are immutable, which is what lets a process cache version bytes by key with
        no invalidation (:mod:`keybroker.storage.read_cache`): this is the only place that
        writes ``repository_versions``, and it never overwrites (``overwrite=False``; on a
        clash, a fresh id). Ids are 64 random bits, minted only here (a new version and the
        migration of a legacy mirror, each a new id) and copied only from a version the
        record still names (a rollback: the same bytes under the same key). Retiring and
        purging delete bytes whose id no version names any more, so no record can name that
        id again. The key could only come back if the same 64 random bits were drawn again
        for the same resource after its deletion (a chance of about 2^-64 per write): the one
        case in which a process still holding the old bytes under that key would serve them
        for the new version. A store with no conditional create (a PKCS#11 token, whose
        bytes are never cached) is written plainly, under the fresh id."""
        if not self._versions.creates_conditionally():
            await self._versions.set(f"{path}/{blob}", data)
            return blob
        for _ in range(CAS_ATTEMPTS):
            if await self._versions.set(f"{path}/{blob}", data, overwrite=False):
                return blob
            blob = _new_blob()
        raise StorageError(f"no unused blob id for {path} after {CAS_ATTEMPTS} attempts")

    def _added(
        self, record: ResourceRecord | None, blob: str, size: int, now: float
    ) -> tuple[ResourceRecord, int]:
        """``record`` with a new current version naming ``blob``, oldest versions retired."""
        base = record or ResourceRecord(None, 1, now, now, ())
        number = base.next
        if number > MAX_VERSION_NUMBER:
            raise StorageError(f"resource has reached the last version number {number - 1}")
        versions = (*base.versions, Version(number, blob, now, size))[-self.max_versions :]
        created = base.created if base.created is not None else now
        changed = ResourceRecord(number, number + 1, created, now, versions)
        return changed, number

    async def _settle(
        self, path: ResourcePath, before: ResourceRecord | None, after: ResourceRecord | None
    ) -> None:
        """After a won change: remove bytes no version names any more, refresh the mirror."""
        if before is not None:
            keep = {v.blob for v in after.versions} if after is not None else set()
            for blob in {v.blob for v in before.versions} - keep:
                if blob:
                    await self._versions.delete(f"{path}/{blob}")
        if after is not None:
            await self._refresh_mirror(path)

    async def _refresh_mirror(self, path: ResourcePath) -> None:
        """Make the mirror hold the current live version (or nothing). Each writer checks the
        record again after its own mirror write, so the last one to finish leaves it right."""
        name = str(path)
        for _ in range(_MIRROR_ATTEMPTS):
            raw = await self._meta.get(name)
            if raw is None:
                return
            version = ResourceRecord.from_bytes(raw, name).live(None)
            data = None if version is None else await self._versions.get(f"{name}/{version.blob}")
            if data is None:
                await self._mirror.delete(name)
            else:
                await self._mirror.set(name, data)
            if await self._meta.get(name) == raw:
                return

    async def _remove_unreferenced(self, path: ResourcePath, keep: set[str]) -> int:
        """Delete every stored version of ``path`` (bounded pages) whose id is not kept; how
        many were deleted."""
        prefix, after, removed = f"{path}/", None, 0
        while True:
            keys = await self._versions.list_page(prefix, after, MAX_PAGE)
            for key in keys:
                if key[len(prefix) :] not in keep:
                    await self._versions.delete(key)
                    removed += 1
            if len(keys) < MAX_PAGE:
                return removed
            after = keys[-1]


def _new_blob() -> str:
    return secrets.token_hex(8)


def _legacy_record(version: Version | None) -> ResourceRecord:
    if version is None:  # read-only view of a resource with no record
        return ResourceRecord(1, 2, None, None, (Version(1, "", None, None),), legacy=True)
    return ResourceRecord(1, 2, version.created, version.created, (version,))


def _is_resource(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and all(parts)

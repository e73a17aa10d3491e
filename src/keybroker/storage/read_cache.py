"""In-process caches of a guest release's store reads, kept right across replicas by a stamp.

A guest's ``GET /kbs/v0/resource/<repo>/<type>/<tag>`` reads, besides its session, the
resource's version record (``repository_meta``), the texts of the policies that could govern it
(``kbs``) and the bytes of the version (``repository_versions``). On PostgreSQL or Redis each is
a round trip. Two caches save them, each bounded in entries and bytes (a value above
``max_value_bytes`` is never held), least recently used first out:

- **Version bytes, by key** (:class:`ImmutableReads`). The key ``repo/type/tag/<blob>`` names
  bytes that never change while it exists: :mod:`keybroker.storage.versions` writes a blob key
  once (``overwrite=False``, a fresh random id on a clash) and never writes it again; see
  ``_store_blob`` there for the argument. So these need no invalidation at all. A key read
  after its bytes were purged is only asked for by a release that resolved the version before
  the purge (it is served what its own snapshot named); bytes purged stay in a process's
  memory until evicted, but are never served to a release that starts after the purge.
- **Version records and policy texts, for one generation stamp** (:class:`StampedReads`). The
  stamp is 16 random bytes under ``generation`` in namespace ``kbs_cache`` of the same store.
  Every change the KBS makes to a cached namespace (a resource write, delete, rollback,
  undelete or purge; a global or tenant resource policy set or deleted) writes a fresh stamp
  *after* the data write succeeded (``ReadCache.changed``). A guest release opens a scope
  (:meth:`ReadCache.release`, a context variable); its first cached read reads the stamp,
  once, *before* any data read of the release, and every cached read of that release is
  served from, and stored in, the entries of that stamp only. The cache holds the entries of
  one stamp, the one its latest stamp read returned: a stamp read that returns another drops
  every entry of the old one. Reads outside a release (admin calls, explain) always go to the
  store.

An attestation by the builtin AS reads its policy text (``attestation_service_policy``) and
reference values (``reference_value``) the same way, when they live in the KBS's store:
``kbs.rcar.Handshake`` opens the scope around the AS's verification, and setting or deleting
an attestation policy or reference values writes a fresh stamp.

Why a change acknowledged on replica A is seen by every release that starts later on replica
B: A acknowledged only after it wrote the data and then the stamp S. B's release reads the
stamp after that, so it reads S or a later stamp (the store is linearizable per key, and a
completed write is visible to every later read: one PostgreSQL primary, one Redis server, one
file system). Stamps are random and never repeat, so if B's release finds an entry under the
stamp it read, that entry was stored by a release that read the same stamp, hence after A's
stamp write, and that release read its data *after* its stamp read, hence after A's data
write: the entry reflects A's change. A release whose stamp is no longer the one the cache
holds keeps to the store (it neither reads nor stores entries), so a slow reader never files
its data under a stamp it did not read first. A change in flight (data written, stamp not yet)
is not acknowledged and owes nothing.

The failure path: if the stamp cannot be written after the data was, the change stands but
the admin call answers 503 saying so, and replicas that cached the old value keep serving it
until the entry is ``max_age_seconds`` old (every entry is read again at that age, whatever
the stamp). That is the only case where staleness is bounded by time rather than absent; the
same bound covers writes made outside any Keybroker KBS (a hand-edited LocalFs file, another
program on the database). If the stamp cannot be *read*, the release fails closed with 503:
nothing is served from memory without a stamp.

Used only for stores whose every write goes through a KBS (``registry.STAMPED_CACHE``), never
for the in-process Memory store nor for external secret backends (Vault, AWS, GCP, Aliyun
KMS, PKCS#11), whose secrets change outside the KBS. No policy here, and nothing about what the
cached values mean.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import count
from typing import Generic, TypeVar

from keybroker.errors import KeybrokerError, ServiceUnavailableError
from keybroker.storage.base import KeyValueStorage

log = logging.getLogger(__name__)

STAMP_NAMESPACE = "kbs_cache"
STAMP_KEY = "generation"
_STAMP_BYTES = 16
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_VALUE_BYTES = 256 * 1024
DEFAULT_MAX_AGE = 5.0

K = TypeVar("K")

# What a store of cached data calls after a change it made: the KBS passes
# ``ReadCache.changed`` (a fresh generation stamp); alone, nothing.
AfterChange = Callable[[], Awaitable[None]]


async def no_stamp() -> None:
    """The ``AfterChange`` of a store no read cache serves."""


@dataclass(frozen=True)
class CacheBounds:
    """How much one cache may hold: entries, bytes (keys and values), the largest value."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_age: float = DEFAULT_MAX_AGE


@dataclass(frozen=True, slots=True)
class Entry:
    """A value read (None: the key was absent) and when its read started."""

    value: bytes | None
    read_at: float


class BoundedLru(Generic[K]):
    """Entries by key, least recently used evicted first, within the entry and byte bounds.
    A value larger than ``max_value_bytes`` is not held (and drops what the key held)."""

    def __init__(self, bounds: CacheBounds) -> None:
        self._bounds = bounds
        self._entries: OrderedDict[K, tuple[Entry, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes held, keys and values."""
        return self._bytes

    def get(self, key: K) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: K, entry: Entry, key_size: int) -> None:
        self.discard(key)
        value_size = 0 if entry.value is None else len(entry.value)
        if value_size > self._bounds.max_value_bytes:
            return
        cost = key_size + value_size
        if cost > self._bounds.max_bytes:
            return
        self._entries[key] = (entry, cost)
        self._bytes += cost
        while len(self._entries) > self._bounds.max_entries or self._bytes > self._bounds.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def discard(self, key: K) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


class GenerationStamp:
    """The stamp in the store: read once per release, written after every change."""

    def __init__(self, store: KeyValueStorage) -> None:
        self._store = store

    async def read(self) -> bytes:
        """The current stamp; one is created (``overwrite=False``, so replicas agree) if the
        store has none. A failure is 503: the caller must not serve from memory."""
        try:
            stamp = await self._store.get(STAMP_KEY)
            if stamp is None:
                await self._store.set(STAMP_KEY, secrets.token_bytes(_STAMP_BYTES), overwrite=False)
                stamp = await self._store.get(STAMP_KEY)
        except KeybrokerError as e:
            raise ServiceUnavailableError(
                f"the cache generation stamp could not be read ({e.detail}): refusing to "
                "serve resources or policies from memory; retry later"
            ) from e
        if not stamp:
            raise ServiceUnavailableError(
                "the cache generation stamp vanished while it was read: retry later"
            )
        return stamp

    async def write(self) -> None:
        """A fresh stamp: every process drops what it cached under the previous one."""
        await self._store.set(STAMP_KEY, secrets.token_bytes(_STAMP_BYTES))


class _Release:
    """One guest release's view: the stamp, read at its first cached read."""

    __slots__ = ("stamp",)

    def __init__(self) -> None:
        self.stamp: bytes | None = None


class ReadCache:
    """The two caches of one KBS process and the stamp that keeps the second one right.

    Disabled (:meth:`disabled`, or no stamp store), it wraps nothing and :meth:`changed` does
    nothing."""

    def __init__(
        self,
        stamp_store: KeyValueStorage | None,
        bounds: CacheBounds = CacheBounds(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stamp = None if stamp_store is None else GenerationStamp(stamp_store)
        self._bounds = bounds
        self._clock = clock
        self.blobs: BoundedLru[str] = BoundedLru(bounds)
        self.records: BoundedLru[tuple[int, str]] = BoundedLru(bounds)
        self._generation: bytes | None = None  # the stamp ``records`` belongs to
        # one variable per cache, not a module global: two apps in one process stay apart
        self._scope: ContextVar[_Release | None] = ContextVar(
            f"keybroker-read-cache-{id(self)}", default=None
        )
        self._labels = count()

    @classmethod
    def disabled(cls) -> ReadCache:
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._stamp is not None

    @property
    def max_age(self) -> float:
        return self._bounds.max_age

    @contextlib.contextmanager
    def release(self) -> Iterator[None]:
        """The scope of one guest release: its cached reads share one stamp, read once."""
        token = self._scope.set(_Release() if self.enabled else None)
        try:
            yield
        finally:
            self._scope.reset(token)

    def stamped(self, store: KeyValueStorage) -> KeyValueStorage:
        """``store`` with its reads in a release served for the release's stamp."""
        return StampedReads(store, self, next(self._labels)) if self.enabled else store

    def immutable(self, store: KeyValueStorage) -> KeyValueStorage:
        """``store``, whose keys name bytes that never change, with its reads cached."""
        return ImmutableReads(store, self.blobs) if self.enabled else store

    async def changed(self) -> None:
        """Call after a change to a cached namespace was stored: a fresh stamp. If it cannot
        be written, 503 (the change stands; other processes may serve the old value until
        their entries are ``max_age`` seconds old)."""
        if self._stamp is None:
            return
        self.records.clear()  # this process at once, whatever happens to the stamp
        try:
            await self._stamp.write()
        except KeybrokerError as e:
            raise ServiceUnavailableError(
                f"the change was stored, but the cache generation stamp could not be written "
                f"({e.detail}): other KBS processes may serve the previous value for up to "
                f"{self._bounds.max_age:g} seconds"
            ) from e

    # --- for StampedReads ------------------------------------------------------------------

    async def release_stamp(self) -> bytes | None:
        """The stamp of the release in progress (read now if this is its first cached read),
        or None outside a release."""
        view = self._scope.get()
        if view is None or self._stamp is None:
            return None
        if view.stamp is None:
            view.stamp = await self._stamp.read()
            if view.stamp != self._generation:  # a change since: drop the old generation
                self._generation = view.stamp
                self.records.clear()
        return view.stamp

    def recall(self, stamp: bytes, key: tuple[int, str]) -> Entry | None:
        if stamp != self._generation:  # an older release: keep to the store
            return None
        entry = self.records.get(key)
        if entry is not None and self._clock() - entry.read_at > self._bounds.max_age:
            self.records.discard(key)
            return None
        return entry

    def remember(self, stamp: bytes, key: tuple[int, str], entry: Entry) -> None:
        if stamp == self._generation:  # never file a read under a stamp it did not follow
            self.records.put(key, entry, len(key[1]))

    def forget(self, key: tuple[int, str]) -> None:
        self.records.discard(key)

    def now(self) -> float:
        return self._clock()


class _Wrapper(KeyValueStorage):
    """Writes, listings and key checks go to the store wrapped; subclasses cache reads."""

    def __init__(self, inner: KeyValueStorage) -> None:
        self._inner = inner

    def storable(self, key: str) -> bool:
        return self._inner.storable(key)

    def creates_conditionally(self) -> bool:
        return self._inner.creates_conditionally()

    async def _get(self, key: str) -> bytes | None:
        return await self._inner.get(key)

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        try:
            return await self._inner.set(key, value, overwrite=overwrite, ttl=ttl)
        finally:
            self._forget(key)

    async def _delete(self, key: str) -> bytes | None:
        try:
            return await self._inner.delete(key)
        finally:
            self._forget(key)

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        try:
            return await self._inner.compare_and_set(key, expected, new)
        finally:
            self._forget(key)

    async def _list(self) -> list[str]:
        return await self._inner.list_keys()

    async def _list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self._inner.list_page(prefix, after, limit)

    async def _close(self) -> None:
        return None  # the provider closes the store wrapped

    def _forget(self, key: str) -> None:
        raise NotImplementedError


class StampedReads(_Wrapper):
    """A store whose reads inside a guest release are cached for the release's stamp; a write
    through it drops the key here at once (other processes learn of it from the stamp)."""

    def __init__(self, inner: KeyValueStorage, cache: ReadCache, label: int) -> None:
        super().__init__(inner)
        self._cache = cache
        self._label = label  # which store: two namespaces may hold the same key

    async def _get(self, key: str) -> bytes | None:
        stamp = await self._cache.release_stamp()
        if stamp is None:
            return await self._inner.get(key)
        hit = self._cache.recall(stamp, (self._label, key))
        if hit is not None:
            return hit.value
        started = self._cache.now()
        value = await self._inner.get(key)
        self._cache.remember(stamp, (self._label, key), Entry(value, started))
        return value

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        stamp = await self._cache.release_stamp()
        if stamp is None:
            return await self._inner.get_many(keys)
        found: dict[str, bytes] = {}
        missing: list[str] = []
        for key in keys:
            hit = self._cache.recall(stamp, (self._label, key))
            if hit is None:
                missing.append(key)
            elif hit.value is not None:
                found[key] = hit.value
        if missing:
            started = self._cache.now()
            fresh = await self._inner.get_many(missing)
            for key in missing:  # absent keys too: "no tenant policy" is an answer
                self._cache.remember(stamp, (self._label, key), Entry(fresh.get(key), started))
            found.update(fresh)
        return found

    def _forget(self, key: str) -> None:
        self._cache.forget((self._label, key))


class ImmutableReads(_Wrapper):
    """A store whose keys, once written, name the same bytes until deleted (version blobs):
    values read are kept, with no stamp and no age. Absent keys are not remembered."""

    def __init__(self, inner: KeyValueStorage, blobs: BoundedLru[str]) -> None:
        super().__init__(inner)
        self._blobs = blobs

    async def _get(self, key: str) -> bytes | None:
        hit = self._blobs.get(key)
        if hit is not None:
            return hit.value
        value = await self._inner.get(key)
        if value is not None:
            self._blobs.put(key, Entry(value, 0.0), len(key))
        return value

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        return {key: value for key in keys if (value := await self._get(key)) is not None}

    def _forget(self, key: str) -> None:
        self._blobs.discard(key)

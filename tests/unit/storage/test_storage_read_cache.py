"""The read caches of the release path (``keybroker.storage.read_cache``): their bounds, the
generation stamp, and the orderings of a reader and a writer racing on two "replicas" (two
``ReadCache`` objects over one store), interleaved by gates, never by sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from conftest import FakeClock
from keybroker.errors import ServiceUnavailableError, StorageError
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.read_cache import (
    STAMP_KEY,
    BoundedLru,
    CacheBounds,
    Entry,
    ReadCache,
)

KEY = "repo/type/tag"


class Gated(KeyValueStorage):
    """A memory store whose next ``get`` of a key waits, before or after reading, until the
    test opens its gate; and whose operations fail on demand."""

    def __init__(self) -> None:
        self.inner = MemoryKeyValueStorage()
        self.before: dict[str, asyncio.Event] = {}
        self.after: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()
        self.reads = 0

    def hold(self, key: str, *, after_reading: bool) -> tuple[asyncio.Event, asyncio.Event]:
        """(the gate to open, the event set when the reader is waiting at it)"""
        gate, reached = asyncio.Event(), asyncio.Event()
        (self.after if after_reading else self.before)[key] = gate
        self.reached[key] = reached
        return gate, reached

    async def _get(self, key: str) -> bytes | None:
        if "get" in self.failing:
            raise OSError(5, "Input/output error")
        self.reads += 1
        if (gate := self.before.pop(key, None)) is not None:
            self.reached[key].set()
            await gate.wait()
        value = await self.inner.get(key)
        if (gate := self.after.pop(key, None)) is not None:
            self.reached[key].set()
            await gate.wait()
        return value

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        if "set" in self.failing:
            raise OSError(28, "No space left on device")
        return await self.inner.set(key, value, overwrite=overwrite, ttl=ttl)

    async def _delete(self, key: str) -> bytes | None:
        return await self.inner.delete(key)

    async def _list(self) -> list[str]:
        return await self.inner.list_keys()

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        return await self.inner.compare_and_set(key, expected, new)


class Replica:
    """One process's cache over the shared stores: ``data`` (records) and ``stamps``."""

    def __init__(self, data: Gated, stamps: Gated, clock: FakeClock, max_age: float = 5) -> None:
        self.cache = ReadCache(stamps, CacheBounds(max_age=max_age), clock=clock)
        self.records = self.cache.stamped(data)

    async def read(self, key: str = KEY) -> bytes | None:
        """A guest release's read: in a release scope."""
        with self.cache.release():
            return await self.records.get(key)

    async def write(self, value: bytes, key: str = KEY) -> None:
        """An admin change: the data, then the stamp."""
        await self.records.set(key, value)
        await self.cache.changed()


def _run(test: Callable[[Gated, Gated, FakeClock], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test(Gated(), Gated(), FakeClock()))


# --- bounds ----------------------------------------------------------------------------------


def test_the_cache_evicts_the_least_recently_used_entry_past_max_entries() -> None:
    lru: BoundedLru[str] = BoundedLru(CacheBounds(max_entries=2))
    lru.put("a", Entry(b"1", 0), 1)
    lru.put("b", Entry(b"2", 0), 1)
    assert lru.get("a") is not None  # "a" is now the most recently used
    lru.put("c", Entry(b"3", 0), 1)
    assert len(lru) == 2
    assert lru.get("b") is None
    assert lru.get("a") is not None and lru.get("c") is not None


def test_the_cache_stays_within_max_bytes() -> None:
    lru: BoundedLru[str] = BoundedLru(CacheBounds(max_bytes=100, max_value_bytes=60))
    for name in "abcde":
        lru.put(name, Entry(b"x" * 39, 0), 1)  # 40 bytes each, keys counted
        assert lru.size <= 100
    assert len(lru) == 2
    assert lru.get("d") is not None and lru.get("e") is not None


def test_a_value_above_max_value_bytes_is_never_cached() -> None:
    lru: BoundedLru[str] = BoundedLru(CacheBounds(max_value_bytes=10))
    lru.put("small", Entry(b"x" * 10, 0), 5)
    lru.put("big", Entry(b"x" * 11, 0), 3)
    assert lru.get("small") is not None
    assert lru.get("big") is None
    assert lru.size == 15


def test_a_value_grown_too_big_drops_the_key_s_old_entry() -> None:
    lru: BoundedLru[str] = BoundedLru(CacheBounds(max_value_bytes=10))
    lru.put("k", Entry(b"old", 0), 1)
    lru.put("k", Entry(b"x" * 11, 0), 1)
    assert lru.get("k") is None
    assert lru.size == 0


def test_version_bytes_above_max_value_bytes_are_read_from_the_store_every_time() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        cache = ReadCache(stamps, CacheBounds(max_value_bytes=8))
        blobs = cache.immutable(data)
        await data.inner.set("r/t/g/small", b"12345678")
        await data.inner.set("r/t/g/large", b"123456789")
        for _ in range(3):
            assert await blobs.get("r/t/g/small") == b"12345678"
            assert await blobs.get("r/t/g/large") == b"123456789"
        assert data.reads == 1 + 3  # small once, large every time
        assert await blobs.get("r/t/g/absent") is None
        assert await blobs.get("r/t/g/absent") is None
        assert data.reads == 6  # an absent key is not remembered

    _run(test)


# --- the stamp -------------------------------------------------------------------------------


def test_reads_outside_a_release_always_go_to_the_store() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        replica = Replica(data, stamps, clock)
        await data.inner.set(KEY, b"v1")
        for _ in range(3):
            assert await replica.records.get(KEY) == b"v1"
        assert (data.reads, stamps.reads) == (3, 0)

    _run(test)


def test_a_release_reads_the_stamp_once_and_repeats_are_served_from_memory() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        replica = Replica(data, stamps, clock)
        await data.inner.set(KEY, b"v1")
        with replica.cache.release():
            assert await replica.records.get(KEY) == b"v1"
            assert await replica.records.get_many([KEY, "other/a/b"]) == {KEY: b"v1"}
        # the first read created the stamp (absent, created, read again), one data read each
        assert stamps.reads == 2
        stamp_reads, data_reads = stamps.reads, data.reads
        assert await replica.read() == b"v1"
        assert (stamps.reads - stamp_reads, data.reads - data_reads) == (1, 0)

    _run(test)


def test_a_new_stamp_drops_the_entries_of_the_old_one() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock), Replica(data, stamps, clock)
        await a.write(b"v1")
        await a.write(b"v1", key="other/a/b")
        assert await b.read() == b"v1"
        assert await b.read("other/a/b") == b"v1"
        assert len(b.cache.records) == 2
        await a.write(b"v2")
        assert await b.read() == b"v2"  # replica B sees A's acknowledged change
        assert len(b.cache.records) == 1  # the other key went with the old stamp

    _run(test)


def test_a_writer_s_own_process_sees_its_change_at_once() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a = Replica(data, stamps, clock)
        await a.write(b"v1")
        assert await a.read() == b"v1"
        await a.write(b"v2")
        assert await a.read() == b"v2"

    _run(test)


def test_a_key_found_absent_is_absent_for_its_stamp_only() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock), Replica(data, stamps, clock)
        assert await b.read() is None
        await a.write(b"created")
        assert await b.read() == b"created"

    _run(test)


def test_a_change_to_the_store_made_without_a_stamp_is_seen_after_max_age() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        b = Replica(data, stamps, clock, max_age=5)
        await data.inner.set(KEY, b"v1")
        assert await b.read() == b"v1"
        await data.inner.set(KEY, b"edited by hand")  # no KBS: no stamp
        clock.advance(5)
        assert await b.read() == b"v1"
        clock.advance(0.5)
        assert await b.read() == b"edited by hand"

    _run(test)


# --- the race orderings ----------------------------------------------------------------------


def test_a_write_between_the_stamp_read_and_the_data_read_is_seen() -> None:
    """Reader: stamp S; writer: data, stamp S'; reader: data (new). Nothing stale anywhere."""

    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock), Replica(data, stamps, clock)
        await a.write(b"old")
        gate, waiting = data.hold(KEY, after_reading=False)
        reader = asyncio.create_task(b.read())
        await waiting.wait()  # B has read its stamp and not yet the data
        await a.write(b"new")
        gate.set()
        assert await reader == b"new"
        assert await b.read() == b"new"

    _run(test)


def test_a_write_between_the_data_read_and_caching_it_leaves_no_stale_entry() -> None:
    """Reader: stamp S, data (old); writer: data, stamp S'; another reader: stamp S', data
    (new), cached; the first reader files its old data last: it must not land under S'."""

    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock), Replica(data, stamps, clock)
        await a.write(b"old")
        gate, waiting = data.hold(KEY, after_reading=True)
        slow = asyncio.create_task(b.read())
        await waiting.wait()  # B's first release has read "old" and not filed it yet
        await a.write(b"new")
        assert await b.read() == b"new"  # B's second release: the new stamp
        gate.set()
        assert await slow == b"old"  # it started before the change was acknowledged
        data_reads = data.reads
        assert await b.read() == b"new"
        assert data.reads == data_reads  # served from memory: the entry is the new value

    _run(test)


def test_a_slow_release_with_an_older_stamp_never_files_its_reads_under_the_new_one() -> None:
    """Reader 1 reads stamp S but is slow to go on; writer: data, S'; reader 2: S', data;
    reader 1 goes on: whatever it reads is filed under S, and a later release under S'
    gets the new value."""

    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock), Replica(data, stamps, clock)
        await a.write(b"old")
        gate, waiting = stamps.hold(STAMP_KEY, after_reading=True)
        slow = asyncio.create_task(b.read())
        await waiting.wait()  # B's first release holds the old stamp
        await a.write(b"new")
        assert await b.read() == b"new"
        gate.set()
        assert await slow == b"new"  # its data read came after the change
        assert await b.read() == b"new"

    _run(test)


# --- failures --------------------------------------------------------------------------------


def test_a_stamp_write_failure_fails_the_change_and_staleness_is_bounded_by_max_age() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        a, b = Replica(data, stamps, clock, max_age=3), Replica(data, stamps, clock, max_age=3)
        await a.write(b"v1")
        assert await b.read() == b"v1"
        stamps.failing.add("set")
        with pytest.raises(ServiceUnavailableError) as refused:
            await a.write(b"v2")
        assert refused.value.status == 503
        assert "the change was stored" in refused.value.detail
        assert "up to 3 seconds" in refused.value.detail
        assert await data.inner.get(KEY) == b"v2"  # the change stands
        assert await a.read() == b"v2"  # the writer's own process dropped its entries
        assert await b.read() == b"v1"  # stale on B, but only ...
        clock.advance(3.1)
        assert await b.read() == b"v2"  # ... until the entry is max_age old

    _run(test)


def test_stamp_read_failure_fails_the_release_closed() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        b = Replica(data, stamps, clock)
        await data.inner.set(KEY, b"v1")
        assert await b.read() == b"v1"  # cached now
        stamps.failing.add("get")
        with pytest.raises(ServiceUnavailableError) as refused:
            await b.read()
        assert refused.value.status == 503
        assert "generation stamp could not be read" in refused.value.detail
        assert await b.records.get(KEY) == b"v1"  # outside a release: the store, as ever

    _run(test)


def test_a_data_read_failure_is_the_store_s_error_and_nothing_is_cached() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        b = Replica(data, stamps, clock)
        await data.inner.set(KEY, b"v1")
        data.failing.add("get")
        with pytest.raises(StorageError):
            await b.read()
        assert len(b.cache.records) == 0

    _run(test)


def test_a_disabled_cache_wraps_nothing_and_writes_no_stamp() -> None:
    async def test(data: Gated, stamps: Gated, clock: FakeClock) -> None:
        cache = ReadCache.disabled()
        assert not cache.enabled
        assert cache.stamped(data) is data
        assert cache.immutable(data) is data
        await cache.changed()
        with cache.release():
            assert await data.get(KEY) is None
        assert await stamps.inner.list_keys() == []

    _run(test)

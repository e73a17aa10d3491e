"""Versioned resources (keybroker.storage.versions) behave the same on every key-value store.

Each test runs on memory, LocalFs, the workers' shared memory store, LocalJson, and the real
local PostgreSQL and Redis. Several handles on one store stand for several workers or replicas.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from keybroker.errors import BadRequestError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.redis import RedisKeyValueStorage
from keybroker.storage.secrets import KvSecretBackend
from keybroker.storage.shared_memory import SharedMemoryKeyValueStorage
from keybroker.storage.versions import CAS_ATTEMPTS, VersionedResources, parse_version

T = TypeVar("T")
POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS = "redis://127.0.0.1:6379/0"
PATH = ResourcePath("tenant-a", "key", "one")
NAMESPACES = ("repository", "repository_meta", "repository_versions")
Stores = Callable[[str], KeyValueStorage]  # namespace -> a new handle on it


@pytest.fixture(params=["memory", "local_fs", "shared_memory", "local_json", "postgres", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """A new handle per call (another worker or replica) on this test's own namespaces."""
    run_id = uuid.uuid4().hex[:10]
    memory = {ns: MemoryKeyValueStorage() for ns in NAMESPACES}
    kind = request.param

    def open_store(namespace: str) -> KeyValueStorage:
        if kind == "memory":
            return memory[namespace]
        if kind == "local_fs":
            return LocalFsKeyValueStorage(tmp_path, namespace)
        if kind == "shared_memory":
            return SharedMemoryKeyValueStorage(tmp_path, namespace)
        if kind == "local_json":
            return LocalJsonKeyValueStorage(tmp_path, namespace)
        if kind == "postgres":
            return PostgresKeyValueStorage(POSTGRES, f"v{run_id}_{namespace}")
        return RedisKeyValueStorage(REDIS, f"v{run_id}_{namespace}")

    yield open_store
    if kind == "postgres":
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            for namespace in NAMESPACES:
                connection.execute(f"DROP TABLE IF EXISTS v{run_id}_{namespace}")
    elif kind == "redis":
        client = redis.Redis.from_url(REDIS)
        for name in client.scan_iter(match=f"v{run_id}_*"):
            client.delete(name)
        client.close()


def _run(scenario: Coroutine[Any, Any, T], opened: list[KeyValueStorage]) -> T:
    async def main() -> T:
        try:
            return await scenario
        finally:
            for store in opened:
                await store.close()

    return asyncio.run(main())


class Replica:
    """The versioned resources as one replica sees them (its own handles)."""

    def __init__(self, stores: Stores, opened: list[KeyValueStorage], **options: Any) -> None:
        handles = [stores(ns) for ns in NAMESPACES]
        opened.extend(handles)
        self.mirror, self.meta, self.versions = handles
        self.resources = VersionedResources(*handles, **options)

    async def current(self, path: ResourcePath = PATH) -> bytes | None:
        version = await self.resources.resolve(path, None)
        return None if version is None else await self.resources.read(path, version)

    async def at(self, number: int, path: ResourcePath = PATH) -> bytes | None:
        version = await self.resources.resolve(path, number)
        return None if version is None else await self.resources.read(path, version)


def test_each_write_is_the_next_version_and_current(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        assert [await replica.resources.write(PATH, f"v{i}".encode()) for i in (1, 2, 3)] == [
            1,
            2,
            3,
        ]
        assert await replica.current() == b"v3"
        assert [await replica.at(n) for n in (1, 2, 3)] == [b"v1", b"v2", b"v3"]
        assert await replica.at(4) is None
        record = await replica.resources.record(PATH)
        assert record is not None and record.current == 3
        assert [v.number for v in record.versions] == [1, 2, 3]
        assert [v.size for v in record.versions] == [2, 2, 2]
        # the current bytes stay in upstream's layout, at upstream's key
        assert await replica.mirror.get(str(PATH)) == b"v3"

    _run(scenario(), opened)


def test_two_replicas_racing_writes_lose_no_version(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replicas = [Replica(stores, opened) for _ in range(2)]
    writes = 12

    async def scenario() -> None:
        numbers = await asyncio.gather(
            *(replicas[i % 2].resources.write(PATH, f"w{i}".encode()) for i in range(writes))
        )
        assert sorted(numbers) == list(range(1, writes + 1))  # contiguous, none lost
        record = await replicas[0].resources.record(PATH)
        assert record is not None and record.current == writes  # current = last
        by_number = {n: f"w{i}".encode() for i, n in enumerate(numbers)}
        for number in range(writes - 9, writes + 1):  # the 10 kept by default
            assert await replicas[1].at(number) == by_number[number]
        assert await replicas[0].mirror.get(str(PATH)) == by_number[writes]

    _run(scenario(), opened)


def test_rollback_makes_the_old_bytes_a_new_current_version(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        await replica.resources.write(PATH, b"good")
        await replica.resources.write(PATH, b"bad")
        assert await replica.resources.rollback(PATH, 1) == 3
        assert await replica.current() == b"good"
        assert await replica.at(2) == b"bad"  # history is kept, never rewritten
        assert await replica.mirror.get(str(PATH)) == b"good"
        with pytest.raises(ResourceNotFoundError):
            await replica.resources.rollback(PATH, 9)

    _run(scenario(), opened)


def test_soft_delete_undelete_then_purge(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        await replica.resources.write(PATH, b"one")
        await replica.resources.write(PATH, b"two")
        assert await replica.resources.delete(PATH, None) == 2
        assert await replica.current() is None  # a guest gets 404
        assert await replica.mirror.get(str(PATH)) is None  # and so would upstream's KBS
        assert await replica.at(1) == b"one"
        assert await replica.resources.undelete(PATH, 2) == 2
        assert await replica.current() == b"two"
        assert await replica.mirror.get(str(PATH)) == b"two"
        with pytest.raises(BadRequestError, match="not deleted"):
            await replica.resources.undelete(PATH, 2)
        await replica.resources.purge(PATH, 1)
        assert await replica.at(1) is None
        assert await replica.current() == b"two"
        await replica.resources.purge(PATH, None)
        assert await replica.resources.record(PATH) is None
        assert await replica.mirror.get(str(PATH)) is None
        assert await replica.versions.list_keys() == []  # every version's bytes are gone
        with pytest.raises(ResourceNotFoundError):
            await replica.resources.purge(PATH, None)

    _run(scenario(), opened)


def test_retention_keeps_at_most_max_versions(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened, max_versions=3)

    async def scenario() -> None:
        for i in range(1, 7):
            await replica.resources.write(PATH, f"v{i}".encode())
        record = await replica.resources.record(PATH)
        assert record is not None
        assert [v.number for v in record.versions] == [4, 5, 6]
        assert await replica.at(3) is None
        assert len(await replica.versions.list_keys()) == 3  # retired bytes are deleted

    _run(scenario(), opened)


def test_rollback_shares_bytes_and_purge_keeps_what_another_version_names(
    stores: Stores,
) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        await replica.resources.write(PATH, b"one")
        await replica.resources.write(PATH, b"two")
        await replica.resources.rollback(PATH, 1)  # version 3 names version 1's bytes
        await replica.resources.purge(PATH, 1)
        assert await replica.current() == b"one"

    _run(scenario(), opened)


def test_legacy_resource_is_served_as_version_1_and_migrated_on_write(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        await replica.mirror.set(str(PATH), b"written before versioning")
        assert await replica.current() == b"written before versioning"
        assert await replica.at(1) == b"written before versioning"
        assert await replica.at(2) is None
        record = await replica.resources.record(PATH)
        assert record is not None and record.legacy and record.current == 1
        assert await replica.resources.write(PATH, b"new") == 2
        assert await replica.at(1) == b"written before versioning"
        assert await replica.current() == b"new"
        migrated = await replica.resources.record(PATH)
        assert migrated is not None and not migrated.legacy

    _run(scenario(), opened)


def test_listing_pages_by_prefix_and_never_reads_values(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        names = [ResourcePath("tenant-a", "key", f"k{i:02}") for i in range(7)]
        for path in names[:5]:
            await replica.resources.write(path, b"SECRET-VALUE")
        await replica.mirror.set(str(names[5]), b"SECRET-VALUE")  # legacy
        await replica.resources.write(names[6], b"SECRET-VALUE")
        await replica.resources.delete(names[6], None)  # soft-deleted: still listed
        await replica.resources.write(ResourcePath("tenant-ab", "key", "x"), b"SECRET-VALUE")
        listed: list[str] = []
        after: str | None = None
        for _ in range(10):
            page, after = await replica.resources.list("tenant-a/", after, 3)
            assert len(page) <= 3
            listed.extend(name for name, _record in page)
            assert "SECRET-VALUE" not in repr(page)
            if after is None:
                break
        assert listed == [str(p) for p in names]

    _run(scenario(), opened)


def test_malformed_version_record_fails_closed(stores: Stores) -> None:
    opened: list[KeyValueStorage] = []
    replica = Replica(stores, opened)

    async def scenario() -> None:
        await replica.resources.write(PATH, b"v1")
        raw = await replica.meta.get(str(PATH))
        assert raw is not None
        await replica.meta.compare_and_set(str(PATH), raw, b'{"format": 1, "versions": 7}')
        with pytest.raises(StorageError, match="version record of tenant-a/key/one"):
            await replica.resources.resolve(PATH, None)

    _run(scenario(), opened)


def test_kv_secret_backend_releases_exactly_the_resolved_version(stores: Stores) -> None:
    """The version the policy saw is the one released, even if a write lands in between."""
    opened: list[KeyValueStorage] = []

    def store(namespace: str) -> KeyValueStorage:
        opened.append(stores(namespace))
        return opened[-1]

    backend = KvSecretBackend.in_namespaces(store)

    async def scenario() -> None:
        await backend.write(PATH, b"first")
        resolved = await backend.resolve(PATH, None)
        await backend.write(PATH, b"second")
        assert resolved is not None and resolved.number == 1
        assert await backend.read(PATH, resolved) == b"first"
        assert await backend.read(PATH) == b"second"

    _run(scenario(), opened)


# --- contention and bounds ----------------------------------------------------------------------


class _AlwaysLosing(MemoryKeyValueStorage):
    """A store on which another writer always wins the compare-and-set."""

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        return False


def test_retry_loop_on_conflicts_is_bounded_and_cleans_up() -> None:
    versions = MemoryKeyValueStorage()
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    resources = VersionedResources(MemoryKeyValueStorage(), _AlwaysLosing(), versions, pause=pause)

    async def scenario() -> None:
        with pytest.raises(Exception, match="gave up after 32 attempts"):
            await resources.write(PATH, b"never stored")
        assert await versions.list_keys() == []  # its bytes are removed again

    asyncio.run(scenario())
    assert len(pauses) == CAS_ATTEMPTS
    assert max(pauses) <= 0.01 * CAS_ATTEMPTS


FULLWIDTH_ONE = "\uff11"  # a Unicode digit: str.isdigit() says yes, the parser must not


@pytest.mark.parametrize(
    "text", ["abc", "-1", "0", "01", "1.5", "+3", "2147483648", "9" * 40, FULLWIDTH_ONE, ""]
)
def test_version_query_non_numeric_negative_or_huge_is_refused(text: str) -> None:
    with pytest.raises(BadRequestError):
        parse_version(text)


def test_version_query_in_range_is_accepted() -> None:
    assert parse_version("1") == 1
    assert parse_version("2147483647") == 2**31 - 1


def test_max_versions_is_bounded() -> None:
    for bad in (0, 1001):
        with pytest.raises(StorageError, match="max_versions"):
            VersionedResources(
                MemoryKeyValueStorage(),
                MemoryKeyValueStorage(),
                MemoryKeyValueStorage(),
                max_versions=bad,
            )


@pytest.mark.parametrize("kind", ["local_fs", "shared_memory", "local_json"])
def test_file_stores_compare_and_set_across_threads_loses_no_increment(
    tmp_path: Path, kind: str
) -> None:
    """Threads with their own handles and event loops stand for worker processes: the lock
    each compare-and-set takes (flock on its own descriptor) excludes them all."""
    threads, increments = 4, 10
    factory = {
        "local_fs": LocalFsKeyValueStorage,
        "shared_memory": SharedMemoryKeyValueStorage,
        "local_json": LocalJsonKeyValueStorage,
    }[kind]

    def worker() -> None:
        async def run() -> None:
            store = factory(tmp_path, "counter")
            for _ in range(increments):
                for _attempt in range(1000):
                    raw = await store.get("count")
                    new = str((int(raw) if raw else 0) + 1).encode()
                    if await store.compare_and_set("count", raw, new):
                        break
            await store.close()

        asyncio.run(run())

    started = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    final = asyncio.run(factory(tmp_path, "counter").get("count"))
    assert final == str(threads * increments).encode()


def test_a_blob_key_is_never_overwritten_a_clash_draws_a_new_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What lets a process cache version bytes by key with no invalidation
    (``keybroker.storage.read_cache``): bytes once under a key stay under it."""
    ids = iter(["clash", "clash", "fresh"])
    monkeypatch.setattr("keybroker.storage.versions._new_blob", lambda: next(ids))
    mirror, meta, versions = (MemoryKeyValueStorage() for _ in NAMESPACES)
    resources = VersionedResources(mirror, meta, versions)

    async def scenario() -> None:
        await versions.set(f"{PATH}/clash", b"bytes another version named")
        assert await resources.write(PATH, b"new bytes") == 1
        version = await resources.resolve(PATH, None)
        assert version is not None and version.blob == "fresh"
        assert await resources.read(PATH, version) == b"new bytes"
        assert await versions.get(f"{PATH}/clash") == b"bytes another version named"

    asyncio.run(scenario())


def test_a_rollback_names_the_same_bytes_under_the_same_key_and_writes_no_blob() -> None:
    mirror, meta, versions = (MemoryKeyValueStorage() for _ in NAMESPACES)
    resources = VersionedResources(mirror, meta, versions)

    async def scenario() -> None:
        await resources.write(PATH, b"one")
        await resources.write(PATH, b"two")
        keys = await versions.list_keys()
        assert await resources.rollback(PATH, 1) == 3
        assert await versions.list_keys() == keys
        first, third = await resources.resolve(PATH, 1), await resources.resolve(PATH, 3)
        assert first is not None and third is not None and first.blob == third.blob

    asyncio.run(scenario())

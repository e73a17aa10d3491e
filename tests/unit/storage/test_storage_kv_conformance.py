"""Every key-value backend behaves the same: one suite, run against each of them."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import redis
from storage_clock import SteppedClock

from keybroker.errors import StorageError
from keybroker.storage.base import MAX_KEY_LENGTH, KeyValueStorage
from keybroker.storage.local_fs import INLINE_READ_MAX, LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.redis import RedisKeyValueStorage
from keybroker.storage.shared_memory import SharedMemoryKeyValueStorage

Factory = Callable[[], KeyValueStorage]
T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]
MIB = 1024 * 1024


POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def opened() -> list[KeyValueStorage]:
    return []


def _opened(opened: list[KeyValueStorage], store: KeyValueStorage) -> KeyValueStorage:
    opened.append(store)
    return store


@pytest.fixture
def run(opened: list[KeyValueStorage]) -> Runner[Any]:
    """``asyncio.run`` that closes every handle opened in the test before its loop ends, as a
    server does at shutdown (pools and connections belong to one event loop)."""

    def runner(scenario: Coroutine[Any, Any, T]) -> T:
        async def main() -> T:
            try:
                return await scenario
            finally:
                for store in opened:
                    await store.close()

        return asyncio.run(main())

    return runner


@pytest.fixture(params=["memory", "local_fs", "shared_memory", "local_json", "postgres", "redis"])
def new_storage(
    request: pytest.FixtureRequest, tmp_path: Path, clock: SteppedClock
) -> Iterator[Factory]:
    """A factory, so a test can open a second handle on the same data (a second worker or
    replica). PostgreSQL and Redis are the real local servers; each test gets a fresh
    namespace, removed afterwards."""
    namespace = f"t_{uuid.uuid4().hex[:12]}"
    opened = request.getfixturevalue("opened")
    if request.param == "memory":
        shared = MemoryKeyValueStorage(clock)
        yield lambda: shared
    elif request.param == "local_fs":
        yield lambda: _opened(opened, LocalFsKeyValueStorage(tmp_path, "repository", clock))
    elif request.param == "shared_memory":  # the workers' shared "memory" store
        yield lambda: _opened(opened, SharedMemoryKeyValueStorage(tmp_path, "repository", clock))
    elif request.param == "local_json":
        yield lambda: _opened(opened, LocalJsonKeyValueStorage(tmp_path, "repository", clock))
    elif request.param == "postgres":
        yield lambda: _opened(opened, PostgresKeyValueStorage(POSTGRES, namespace, clock=clock))
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {namespace}")
    else:
        yield lambda: _opened(opened, RedisKeyValueStorage(REDIS, namespace, clock=clock))
        client = redis.Redis.from_url(REDIS)
        for name in client.scan_iter(match=f"{namespace}:*"):
            client.delete(name)
        client.close()


@pytest.fixture
def storage(new_storage: Factory) -> KeyValueStorage:
    return new_storage()


def test_write_then_read(run: Runner[Any], storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        assert await storage.set("default/key/one", b"value") is True
        assert await storage.get("default/key/one") == b"value"

    run(scenario())


def test_missing_key_reads_none(run: Runner[Any], storage: KeyValueStorage) -> None:
    assert run(storage.get("no/such/key")) is None


def test_overwrite_replaces_the_value(run: Runner[Any], storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        await storage.set("k", b"old")
        assert await storage.set("k", b"new") is True
        assert await storage.get("k") == b"new"

    run(scenario())


def test_set_without_overwrite_keeps_the_existing_value(
    run: Runner[Any], storage: KeyValueStorage
) -> None:
    async def scenario() -> None:
        assert await storage.set("k", b"first", overwrite=False) is True
        assert await storage.set("k", b"second", overwrite=False) is False
        assert await storage.get("k") == b"first"

    run(scenario())


def test_concurrent_set_without_overwrite_has_one_winner(
    run: Runner[Any], new_storage: Factory
) -> None:
    """The nonce-replay guard relies on this: two workers, one attestation."""

    async def scenario() -> None:
        handles = [new_storage() for _ in range(4)]
        results = await asyncio.gather(
            *(
                handles[i % 4].set("attempt", f"writer {i}".encode(), overwrite=False)
                for i in range(20)
            )
        )
        assert results.count(True) == 1
        winner = results.index(True)
        assert await handles[0].get("attempt") == f"writer {winner}".encode()

    run(scenario())


def test_delete_returns_the_previous_value(run: Runner[Any], storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        await storage.set("a/b", b"gone soon")
        assert await storage.delete("a/b") == b"gone soon"
        assert await storage.get("a/b") is None
        assert await storage.list_keys() == []

    run(scenario())


def test_delete_missing_returns_none(run: Runner[Any], storage: KeyValueStorage) -> None:
    assert run(storage.delete("never/stored")) is None


def test_binary_value_with_every_byte(run: Runner[Any], storage: KeyValueStorage) -> None:
    value = bytes(range(256)) * 3

    async def scenario() -> None:
        await storage.set("binary", value)
        assert await storage.get("binary") == value
        assert await storage.delete("binary") == value

    run(scenario())


@pytest.mark.parametrize("size", [MIB, INLINE_READ_MAX + 1], ids=["1MiB", "read-in-thread"])
def test_large_value(run: Runner[Any], storage: KeyValueStorage, size: int) -> None:
    value = (bytes(range(256)) * (size // 256 + 1))[:size]

    async def scenario() -> None:
        await storage.set("large", value)
        assert await storage.get("large") == value

    run(scenario())


def test_list_keys_is_sorted_and_complete(run: Runner[Any], storage: KeyValueStorage) -> None:
    keys = ["repo/type/tag", "a", "default/key/one", "x-y_z.1"]

    async def scenario() -> None:
        for key in keys:
            await storage.set(key, key.encode())
        assert await storage.list_keys() == sorted(keys)

    run(scenario())


def test_ttl_expiry(run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock) -> None:
    async def scenario() -> None:
        await storage.set("session", b"s", ttl=10)
        await storage.set("permanent", b"p")
        clock.advance(9.5)
        assert await storage.get("session") == b"s"
        clock.advance(0.5)
        assert await storage.get("session") is None
        assert await storage.list_keys() == ["permanent"]
        assert await storage.delete("session") is None
        # an expired key counts as missing for overwrite=False
        assert await storage.set("session", b"again", overwrite=False, ttl=10) is True
        assert await storage.get("session") == b"again"

    run(scenario())


def test_get_many_returns_the_live_values_only(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("a", b"1")
        await storage.set("b", b"\x00\xff")
        await storage.set("soon", b"s", ttl=5)
        assert await storage.get_many([]) == {}
        assert await storage.get_many(["a", "missing", "b", "a", "soon"]) == {
            "a": b"1",
            "b": b"\x00\xff",
            "soon": b"s",
        }
        clock.advance(5)
        assert await storage.get_many(["a", "soon"]) == {"a": b"1"}
        with pytest.raises(StorageError):
            await storage.get_many(["a", "../etc/passwd"])

    run(scenario())


def test_expired_entry_not_listed_before_it_is_read(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("session", b"s", ttl=1)
        clock.advance(1)
        assert await storage.list_keys() == []
        assert await storage.set("session", b"new", overwrite=False) is True

    run(scenario())


def test_overwrite_without_ttl_makes_the_key_permanent(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("k", b"short-lived", ttl=5)
        await storage.set("k", b"permanent")
        clock.advance(3600)
        assert await storage.get("k") == b"permanent"

    run(scenario())


def test_overwrite_with_ttl_replaces_the_deadline(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("k", b"v1", ttl=5)
        clock.advance(4)
        await storage.set("k", b"v2", ttl=5)
        clock.advance(4)
        assert await storage.get("k") == b"v2"
        clock.advance(1)
        assert await storage.get("k") is None

    run(scenario())


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
def test_invalid_ttl_rejected(run: Runner[Any], storage: KeyValueStorage, ttl: float) -> None:
    with pytest.raises(StorageError, match="TTL"):
        run(storage.set("k", b"v", ttl=ttl))
    assert run(storage.get("k")) is None


INVALID_KEYS = [
    "",
    "../x",
    "a/../b",
    "..",
    ".",
    "./a",
    "a/.",
    "/a",
    "a/",
    "a//b",
    ".hidden",
    "a b",
    "%2F",
    "a%2F..%2Fb",
    "a\\x2Fb",
    "a\x00b",
    "caf\u00e9",
    "x" * (MAX_KEY_LENGTH + 1),
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_path_traversal_and_invalid_keys_rejected(
    run: Runner[Any], storage: KeyValueStorage, key: str
) -> None:
    async def scenario() -> None:
        with pytest.raises(StorageError, match="storage key"):
            await storage.set(key, b"v")
        with pytest.raises(StorageError, match="storage key"):
            await storage.get(key)
        with pytest.raises(StorageError, match="storage key"):
            await storage.delete(key)
        assert await storage.list_keys() == []

    run(scenario())


def test_bytearray_value_is_copied(run: Runner[Any], storage: KeyValueStorage) -> None:
    value = bytearray(b"mutable")

    async def scenario() -> None:
        await storage.set("k", value)  # type: ignore[arg-type]  # callers may pass a buffer
        value[0:7] = b"changed"
        assert await storage.get("k") == b"mutable"

    run(scenario())


def test_concurrent_overwriting_writers_leave_one_whole_value(
    run: Runner[Any], new_storage: Factory
) -> None:
    """Many replicas overwrite one key at once: the result is one writer's value, whole."""
    values = [bytes([i]) * (64 * 1024) for i in range(16)]

    async def scenario() -> None:
        handles = [new_storage() for _ in range(4)]
        written = await asyncio.gather(
            *(handles[i % 4].set("shared", value) for i, value in enumerate(values))
        )
        assert written == [True] * len(values)
        final = await handles[1].get("shared")
        assert final in values
        assert await handles[2].list_keys() == ["shared"]

    run(scenario())


# --- compare-and-set and pages (the versioned resources build on them) -------------------------


def test_compare_and_set_creates_only_an_absent_key(
    run: Runner[Any], storage: KeyValueStorage
) -> None:
    async def scenario() -> None:
        assert await storage.compare_and_set("meta/a", None, b"one") is True
        assert await storage.compare_and_set("meta/a", None, b"two") is False
        assert await storage.get("meta/a") == b"one"

    run(scenario())


def test_compare_and_set_replaces_only_the_expected_value(
    run: Runner[Any], storage: KeyValueStorage
) -> None:
    async def scenario() -> None:
        await storage.compare_and_set("meta/a", None, b"one")
        assert await storage.compare_and_set("meta/a", b"stale", b"two") is False
        assert await storage.get("meta/a") == b"one"
        assert await storage.compare_and_set("meta/a", b"one", b"two") is True
        assert await storage.get("meta/a") == b"two"
        assert await storage.compare_and_set("meta/missing", b"one", b"x") is False
        assert await storage.get("meta/missing") is None

    run(scenario())


def test_compare_and_set_deletes_only_the_expected_value(
    run: Runner[Any], storage: KeyValueStorage
) -> None:
    async def scenario() -> None:
        await storage.compare_and_set("meta/a", None, b"one")
        assert await storage.compare_and_set("meta/a", b"other", None) is False
        assert await storage.get("meta/a") == b"one"
        assert await storage.compare_and_set("meta/a", b"one", None) is True
        assert await storage.get("meta/a") is None
        assert await storage.compare_and_set("meta/a", None, None) is True  # still absent
        await storage.set("meta/b", b"x")
        assert await storage.compare_and_set("meta/b", None, None) is False

    run(scenario())


def test_compare_and_set_treats_an_expired_value_as_absent(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("meta/a", b"old", ttl=5)
        clock.advance(6)
        assert await storage.compare_and_set("meta/a", b"old", b"new") is False
        assert await storage.compare_and_set("meta/a", None, b"new") is True
        clock.advance(3600)  # what compare-and-set writes is permanent
        assert await storage.get("meta/a") == b"new"

    run(scenario())


def test_concurrent_compare_and_set_increments_lose_nothing(
    run: Runner[Any], new_storage: Factory
) -> None:
    """Writers on several handles (workers, replicas) increment one counter with a
    read-compare-retry loop: every increment lands exactly once."""
    writers, increments = 6, 8

    async def increment(handle: KeyValueStorage) -> int:
        conflicts = 0
        for _ in range(increments):
            while True:
                raw = await handle.get("counter")
                value = int(raw) if raw is not None else 0
                if await handle.compare_and_set("counter", raw, str(value + 1).encode()):
                    break
                conflicts += 1
        return conflicts

    async def scenario() -> None:
        handles = [new_storage() for _ in range(3)]
        await asyncio.gather(*(increment(handles[i % 3]) for i in range(writers)))
        assert await handles[0].get("counter") == str(writers * increments).encode()

    run(scenario())


def test_list_page_is_bounded_sorted_and_resumable(
    run: Runner[Any], storage: KeyValueStorage
) -> None:
    async def scenario() -> None:
        names = [f"tenant-a/type/{i:03}" for i in range(25)] + ["tenant-ab/type/x", "b/c/d"]
        for name in names:
            await storage.set(name, b"v")
        seen: list[str] = []
        after: str | None = None
        while True:
            page = await storage.list_page("tenant-a/", after, 10)
            assert len(page) <= 10 and page == sorted(page)
            seen.extend(page)
            if len(page) < 10:
                break
            after = page[-1]
        assert seen == sorted(n for n in names if n.startswith("tenant-a/"))
        assert await storage.list_page("", None, 1000) == sorted(names)

    run(scenario())


def test_list_page_skips_expired_keys(
    run: Runner[Any], storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("p/a", b"1", ttl=5)
        await storage.set("p/b", b"2")
        clock.advance(6)
        assert await storage.list_page("p/", None, 10) == ["p/b"]

    run(scenario())


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_list_page_refuses_an_unbounded_limit(
    run: Runner[Any], storage: KeyValueStorage, limit: int
) -> None:
    with pytest.raises(StorageError, match="a page has 1 to 1000 keys"):
        run(storage.list_page("", None, limit))


@pytest.mark.parametrize("prefix", ["a b", "a%2F", "x" * 513])
def test_list_page_refuses_a_prefix_outside_the_key_alphabet(
    run: Runner[Any], storage: KeyValueStorage, prefix: str
) -> None:
    with pytest.raises(StorageError, match="invalid key prefix"):
        run(storage.list_page(prefix, None, 10))

"""Every key-value backend behaves the same: one suite, run against each of them."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from storage_clock import SteppedClock

from keybroker.errors import StorageError
from keybroker.storage.base import MAX_KEY_LENGTH, KeyValueStorage
from keybroker.storage.local_fs import INLINE_READ_MAX, LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage

Factory = Callable[[], KeyValueStorage]
MIB = 1024 * 1024


@pytest.fixture(params=["memory", "local_fs"])
def new_storage(request: pytest.FixtureRequest, tmp_path: Path, clock: SteppedClock) -> Factory:
    """A factory, so a test can open a second handle on the same data (a second worker)."""
    if request.param == "memory":
        shared = MemoryKeyValueStorage(clock)
        return lambda: shared
    return lambda: LocalFsKeyValueStorage(tmp_path, "repository", clock)


@pytest.fixture
def storage(new_storage: Factory) -> KeyValueStorage:
    return new_storage()


def test_write_then_read(storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        assert await storage.set("default/key/one", b"value") is True
        assert await storage.get("default/key/one") == b"value"

    asyncio.run(scenario())


def test_missing_key_reads_none(storage: KeyValueStorage) -> None:
    assert asyncio.run(storage.get("no/such/key")) is None


def test_overwrite_replaces_the_value(storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        await storage.set("k", b"old")
        assert await storage.set("k", b"new") is True
        assert await storage.get("k") == b"new"

    asyncio.run(scenario())


def test_set_without_overwrite_keeps_the_existing_value(storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        assert await storage.set("k", b"first", overwrite=False) is True
        assert await storage.set("k", b"second", overwrite=False) is False
        assert await storage.get("k") == b"first"

    asyncio.run(scenario())


def test_concurrent_set_without_overwrite_has_one_winner(new_storage: Factory) -> None:
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

    asyncio.run(scenario())


def test_delete_returns_the_previous_value(storage: KeyValueStorage) -> None:
    async def scenario() -> None:
        await storage.set("a/b", b"gone soon")
        assert await storage.delete("a/b") == b"gone soon"
        assert await storage.get("a/b") is None
        assert await storage.list_keys() == []

    asyncio.run(scenario())


def test_delete_missing_returns_none(storage: KeyValueStorage) -> None:
    assert asyncio.run(storage.delete("never/stored")) is None


def test_binary_value_with_every_byte(storage: KeyValueStorage) -> None:
    value = bytes(range(256)) * 3

    async def scenario() -> None:
        await storage.set("binary", value)
        assert await storage.get("binary") == value
        assert await storage.delete("binary") == value

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [MIB, INLINE_READ_MAX + 1], ids=["1MiB", "read-in-thread"])
def test_large_value(storage: KeyValueStorage, size: int) -> None:
    value = (bytes(range(256)) * (size // 256 + 1))[:size]

    async def scenario() -> None:
        await storage.set("large", value)
        assert await storage.get("large") == value

    asyncio.run(scenario())


def test_list_keys_is_sorted_and_complete(storage: KeyValueStorage) -> None:
    keys = ["repo/type/tag", "a", "default/key/one", "x-y_z.1"]

    async def scenario() -> None:
        for key in keys:
            await storage.set(key, key.encode())
        assert await storage.list_keys() == sorted(keys)

    asyncio.run(scenario())


def test_ttl_expiry(storage: KeyValueStorage, clock: SteppedClock) -> None:
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

    asyncio.run(scenario())


def test_expired_entry_not_listed_before_it_is_read(
    storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("session", b"s", ttl=1)
        clock.advance(1)
        assert await storage.list_keys() == []
        assert await storage.set("session", b"new", overwrite=False) is True

    asyncio.run(scenario())


def test_overwrite_without_ttl_makes_the_key_permanent(
    storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("k", b"short-lived", ttl=5)
        await storage.set("k", b"permanent")
        clock.advance(3600)
        assert await storage.get("k") == b"permanent"

    asyncio.run(scenario())


def test_overwrite_with_ttl_replaces_the_deadline(
    storage: KeyValueStorage, clock: SteppedClock
) -> None:
    async def scenario() -> None:
        await storage.set("k", b"v1", ttl=5)
        clock.advance(4)
        await storage.set("k", b"v2", ttl=5)
        clock.advance(4)
        assert await storage.get("k") == b"v2"
        clock.advance(1)
        assert await storage.get("k") is None

    asyncio.run(scenario())


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
def test_invalid_ttl_rejected(storage: KeyValueStorage, ttl: float) -> None:
    with pytest.raises(StorageError, match="TTL"):
        asyncio.run(storage.set("k", b"v", ttl=ttl))
    assert asyncio.run(storage.get("k")) is None


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
def test_path_traversal_and_invalid_keys_rejected(storage: KeyValueStorage, key: str) -> None:
    async def scenario() -> None:
        with pytest.raises(StorageError, match="storage key"):
            await storage.set(key, b"v")
        with pytest.raises(StorageError, match="storage key"):
            await storage.get(key)
        with pytest.raises(StorageError, match="storage key"):
            await storage.delete(key)
        assert await storage.list_keys() == []

    asyncio.run(scenario())


def test_bytearray_value_is_copied(storage: KeyValueStorage) -> None:
    value = bytearray(b"mutable")

    async def scenario() -> None:
        await storage.set("k", value)  # type: ignore[arg-type]  # callers may pass a buffer
        value[0:7] = b"changed"
        assert await storage.get("k") == b"mutable"

    asyncio.run(scenario())

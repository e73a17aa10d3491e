"""The reference-value store remembers parsed values by their stored bytes: a repeat read
costs no parsing, a changed value is parsed anew, and expiry is checked on every query."""

from __future__ import annotations

import asyncio

import pytest

from conftest import FakeClock
from keybroker.errors import StorageError
from keybroker.rvps import store as rvps_store
from keybroker.rvps.reference_value import ReferenceValue
from keybroker.rvps.store import ReferenceValueStore
from keybroker.storage.memory import MemoryKeyValueStorage

NOW = 1_800_000_000.0


def _value(name: str, value: list[str], expires: float = NOW + 3600) -> bytes:
    return ReferenceValue(name=name, expiration=expires, value=value, version="0.1.0").to_bytes()


class _CountedParse:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        parse = ReferenceValue.from_bytes

        def counted(raw: bytes) -> ReferenceValue:
            self.calls += 1
            return parse(raw)

        monkeypatch.setattr(ReferenceValue, "from_bytes", staticmethod(counted))


def test_a_stored_value_is_parsed_once_and_a_changed_one_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted = _CountedParse(monkeypatch)
    storage = MemoryKeyValueStorage()
    store = ReferenceValueStore(storage, clock=FakeClock(NOW))

    async def main() -> None:
        await storage.set("svn", _value("svn", ["1"]))
        for _ in range(3):
            assert await store.query_many(["svn"]) == {"svn": ["1"]}
        assert counted.calls == 1
        await storage.set("svn", _value("svn", ["2"]))
        assert await store.query("svn") == ["2"]
        assert counted.calls == 2

    asyncio.run(main())


def test_a_remembered_value_still_expires() -> None:
    clock = FakeClock(NOW)
    storage = MemoryKeyValueStorage()
    store = ReferenceValueStore(storage, clock=clock)

    async def main() -> None:
        await storage.set("svn", _value("svn", ["1"], expires=NOW + 60))
        assert await store.query_many(["svn"]) == {"svn": ["1"]}
        clock.advance(61)
        assert await store.query_many(["svn"]) == {}
        assert await store.query("svn") is None

    asyncio.run(main())


def test_remembered_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rvps_store, "PARSED_REMEMBERED", 4)
    storage = MemoryKeyValueStorage()
    store = ReferenceValueStore(storage, clock=FakeClock(NOW))

    async def main() -> None:
        for index in range(10):
            await storage.set(f"v{index}", _value(f"v{index}", [str(index)]))
        found = await store.query_many([f"v{index}" for index in range(10)])
        assert len(found) == 10
        assert len(store._parsed_values) == 4

    asyncio.run(main())


def test_a_corrupt_stored_value_is_refused_every_time() -> None:
    storage = MemoryKeyValueStorage()
    store = ReferenceValueStore(storage, clock=FakeClock(NOW))

    async def main() -> None:
        await storage.set("svn", b"{not json")
        for _ in range(2):
            with pytest.raises(StorageError, match="corrupt"):
                await store.query_many(["svn"])

    asyncio.run(main())

"""The in-memory store: expiry on an injected clock, and memory that stays bounded."""

from __future__ import annotations

import asyncio

from storage_clock import SteppedClock

from keybroker.storage.memory import (
    SWEEP_MAX_INTERVAL,
    SWEEP_MIN_WRITES,
    MemoryKeyValueStorage,
)


def test_abandoned_expired_entries_do_not_pile_up(clock: SteppedClock) -> None:
    """A flood of handshakes nobody finishes: memory stays bounded by the live set."""
    storage = MemoryKeyValueStorage(clock)

    async def scenario() -> int:
        largest = 0
        for i in range(10 * SWEEP_MIN_WRITES):
            await storage.set(f"session{i}", b"s", ttl=5)
            clock.advance(1)  # about five sessions are live at any time
            largest = max(largest, storage.stored_entries)
        return largest

    assert asyncio.run(scenario()) <= SWEEP_MIN_WRITES + 5


def test_sweep_keeps_live_and_permanent_entries(clock: SteppedClock) -> None:
    storage = MemoryKeyValueStorage(clock)

    async def scenario() -> None:
        await storage.set("permanent", b"p")
        await storage.set("long", b"l", ttl=1e9)
        for i in range(SWEEP_MIN_WRITES):
            await storage.set(f"short{i}", b"s", ttl=1)
        clock.advance(2)
        for i in range(SWEEP_MIN_WRITES):
            await storage.set(f"later{i}", b"s")
        assert storage.stored_entries == 2 + SWEEP_MIN_WRITES
        assert await storage.get("permanent") == b"p"
        assert await storage.get("long") == b"l"

    asyncio.run(scenario())


def test_burst_of_expired_entries_goes_with_the_first_write_a_minute_later(
    clock: SteppedClock,
) -> None:
    """10,000 sessions of a burst expire; the next write after the sweep interval drops them
    all, instead of waiting for another 10,000 writes."""
    storage = MemoryKeyValueStorage(clock)

    async def scenario() -> None:
        for i in range(10 * SWEEP_MIN_WRITES):
            await storage.set(f"burst{i}", b"s", ttl=30)
        clock.advance(SWEEP_MAX_INTERVAL)
        await storage.set("next", b"n", ttl=30)
        assert storage.stored_entries == 1

    asyncio.run(scenario())


def test_instances_do_not_share_data() -> None:
    first, second = MemoryKeyValueStorage(), MemoryKeyValueStorage()
    asyncio.run(first.set("k", b"v"))
    assert asyncio.run(second.get("k")) is None

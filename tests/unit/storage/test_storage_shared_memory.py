"""The worker processes' shared "memory" store: lock-free, atomic across processes, no links.

The contract every store keeps is in test_storage_kv_conformance.py; these tests cover what is
particular to this one: races between processes, the expiry purge, sweeps and planted links.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from storage_clock import SteppedClock

from keybroker.errors import StorageError
from keybroker.storage import shared_memory
from keybroker.storage.shared_memory import SharedMemoryKeyValueStorage

KEYS = 200


def _claim_all(directory: str, worker: int, start: Any, results: Any) -> None:
    """One worker process: claim every key with create-if-absent, report which it won."""
    store = SharedMemoryKeyValueStorage(Path(directory), "sessions")
    start.wait()

    async def claim() -> list[int]:
        return [i for i in range(KEYS) if await store.set(f"k{i}", b"%d" % worker, overwrite=False)]

    results.put((worker, asyncio.run(claim())))


def _take_all(directory: str, start: Any, results: Any) -> None:
    store = SharedMemoryKeyValueStorage(Path(directory), "sessions")
    start.wait()

    async def take() -> list[int]:
        return [i for i in range(KEYS) if await store.delete(f"k{i}") is not None]

    results.put(asyncio.run(take()))


def _race(target: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=target, args=(*a, start, results)) for a in args]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


def test_create_if_absent_has_exactly_one_winner_across_processes(tmp_path: Path) -> None:
    """Four workers claim the same 200 nonces at once (``set(overwrite=False)``, how a
    session's attestation attempt is claimed): each key has one winner, and its value is the
    winner's."""
    outcomes = _race(_claim_all, [(str(tmp_path), worker) for worker in range(4)])
    winners: dict[int, int] = {}
    for worker, won in outcomes:
        for key in won:
            assert key not in winners, f"k{key} won twice"
            winners[key] = worker
    assert sorted(winners) == list(range(KEYS))
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions")
    for key, worker in winners.items():
        assert asyncio.run(store.get(f"k{key}")) == b"%d" % worker


def test_concurrent_deletes_hand_each_value_to_exactly_one_caller(tmp_path: Path) -> None:
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions")

    async def fill() -> None:
        for i in range(KEYS):
            await store.set(f"k{i}", b"v")

    asyncio.run(fill())
    outcomes = _race(_take_all, [(str(tmp_path),) for _ in range(3)])
    taken = sorted(key for won in outcomes for key in won)
    assert taken == list(range(KEYS))


def test_operations_stay_on_the_event_loop_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmpfs: a write needs no fsync, and a thread hop would cost more than the write."""
    synced: list[int] = []
    threads: set[str] = set()
    loop_thread = threading.get_ident()
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    def placed(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            threads.add("loop" if threading.get_ident() == loop_thread else "worker")
            real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", placed(real_replace))
    monkeypatch.setattr(os, "link", placed(real_link))
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions")

    async def scenario() -> None:
        assert await store.set("s", b"one", ttl=60) is True
        assert await store.set("s", b"two", overwrite=False) is False
        assert await store.set("t", b"three", overwrite=False) is True
        assert await store.delete("s") == b"one"

    asyncio.run(scenario())
    assert synced == [] and threads == {"loop"}
    assert sorted(os.listdir(tmp_path / "sessions")) == ["t"]  # no temp file left behind


def test_purge_keeps_a_value_written_after_the_expired_one_was_read(
    tmp_path: Path, clock: SteppedClock
) -> None:
    """A reader found the entry expired and purges it; meanwhile another worker wrote a live
    value under that key. The purge must put the live value back, not delete it."""
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions", clock)
    asyncio.run(store.set("s", b"fresh", ttl=60))  # the value the other worker just wrote
    store._purge("s")  # the purge of the expired value that was there before
    assert asyncio.run(store.get("s")) == b"fresh"
    assert os.listdir(tmp_path / "sessions") == ["s"]


def test_expired_entry_reads_as_missing_and_is_removed(tmp_path: Path, clock: SteppedClock) -> None:
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions", clock)

    async def scenario() -> None:
        await store.set("s", b"v", ttl=30)
        clock.advance(30)
        assert await store.get("s") is None
        assert await store.set("s", b"new", overwrite=False) is True  # the name is free

    asyncio.run(scenario())
    assert (tmp_path / "sessions" / "s").read_bytes() == b"-\nnew"


@pytest.mark.parametrize("header", [b"garbage", b"nan", b"-inf", b"", b"1e999"])
def test_corrupt_deadline_fails_closed(tmp_path: Path, header: bytes) -> None:
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions")
    (tmp_path / "sessions" / "s").write_bytes(header + b"\nsession")
    assert asyncio.run(store.list_keys()) == []
    assert asyncio.run(store.get("s")) is None


def test_record_without_a_header_line_fails_closed(tmp_path: Path) -> None:
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions")
    (tmp_path / "sessions" / "s").write_bytes(b"x" * 200)
    assert asyncio.run(store.get("s")) is None


def test_sweep_removes_abandoned_entries_and_crashed_writers_temp_files_off_the_loop(
    tmp_path: Path, clock: SteppedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_memory, "SWEEP_MIN_WRITES", 8)
    store = SharedMemoryKeyValueStorage(tmp_path, "sessions", clock)
    directory = tmp_path / "sessions"
    crashed = directory / ".tmp-0123456789abcdef"
    crashed.write_bytes(b"half a value")
    old = time.time() - shared_memory.STALE_SECONDS - 1
    os.utime(crashed, (old, old))
    in_flight = directory / ".tmp-fedcba9876543210"  # another writer, right now
    in_flight.write_bytes(b"being written")
    loop_thread = threading.get_ident()
    sweeps: list[bool] = []
    sweep = store._sweep

    def watched_sweep() -> None:
        sweeps.append(threading.get_ident() == loop_thread)
        sweep()

    monkeypatch.setattr(store, "_sweep", watched_sweep)

    async def scenario() -> None:
        for i in range(7):
            await store.set(f"abandoned{i}", b"s", ttl=60)
        clock.advance(61)
        await store.set("fresh", b"s", ttl=60)  # the 8th write sweeps

    asyncio.run(scenario())
    assert sorted(os.listdir(directory)) == [in_flight.name, "fresh"]
    assert sweeps == [False]  # swept once, not on the loop's thread


def test_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    """A link in the store (``s`` pointing at a host file) is refused on read, never listed,
    replaced rather than written through, and removed by a delete without being read."""
    outside = tmp_path / "hostname"
    outside.write_bytes(b"a host file outside the store")
    store = SharedMemoryKeyValueStorage(tmp_path / "store", "sessions")
    link = tmp_path / "store" / "sessions" / "s"
    link.symlink_to(outside)

    with pytest.raises(StorageError, match="symbolic link"):
        asyncio.run(store.get("s"))
    assert asyncio.run(store.list_keys()) == []
    with pytest.raises(StorageError, match="symbolic link"):
        asyncio.run(store.delete("s"))
    assert not link.is_symlink()  # the planted link went with the delete

    link.symlink_to(outside)
    assert asyncio.run(store.set("s", b"mine")) is True
    assert not link.is_symlink() and asyncio.run(store.get("s")) == b"mine"
    assert outside.read_bytes() == b"a host file outside the store"


def test_symlinked_namespace_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "sessions").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="symbolic link"):
        SharedMemoryKeyValueStorage(tmp_path / "store", "sessions")

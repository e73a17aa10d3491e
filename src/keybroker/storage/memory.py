"""In-process key-value storage: a dict. Lost at exit and private to one process.

Expiry uses the injected clock (monotonic by default, so a wall-clock jump neither revives nor
kills entries). Expired entries read as missing at once and are dropped when touched, and a
sweep over the whole dict runs after as many writes as there were entries at the last sweep
(at least :data:`SWEEP_MIN_WRITES`): sweeping costs O(1) amortized per write, and abandoned
entries (a handshake nobody finishes) cannot pile up beyond about twice the live set. A write
also sweeps when the last sweep is :data:`SWEEP_MAX_INTERVAL` seconds old, so after a burst the
expired entries go with the next write rather than after as many writes as the burst made.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from keybroker.storage.base import KeyValueStorage

SWEEP_MIN_WRITES = 1024
SWEEP_MAX_INTERVAL = 60.0


class MemoryKeyValueStorage(KeyValueStorage):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[bytes, float | None]] = {}  # key -> (value, deadline)
        self._writes_since_sweep = 0
        self._sweep_after = SWEEP_MIN_WRITES
        self._last_sweep = clock()

    @property
    def stored_entries(self) -> int:
        """Entries held, expired ones not yet purged included (for monitoring and tests)."""
        return len(self._entries)

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if deadline is not None and deadline <= self._clock():
            del self._entries[key]
            return None
        return value

    async def _get(self, key: str) -> bytes | None:
        return self._live(key)

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        # No await between the check and the write: on one event loop this is atomic.
        if not overwrite and self._live(key) is not None:
            return False
        now = self._clock()
        self._entries[key] = (value, None if ttl is None else now + ttl)
        self._writes_since_sweep += 1
        if (
            self._writes_since_sweep >= self._sweep_after
            or now - self._last_sweep >= SWEEP_MAX_INTERVAL
        ):
            self._sweep()
        return True

    async def _delete(self, key: str) -> bytes | None:
        value = self._live(key)
        self._entries.pop(key, None)
        return value

    async def _list(self) -> list[str]:
        return [key for key in list(self._entries) if self._live(key) is not None]

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        # No await between the comparison and the change: atomic on one event loop.
        if self._live(key) != expected:
            return False
        if new is None:
            self._entries.pop(key, None)
        else:
            self._entries[key] = (new, None)
        return True

    def _sweep(self) -> None:
        now = self._clock()
        expired = [
            key
            for key, (_, deadline) in self._entries.items()
            if deadline is not None and deadline <= now
        ]
        for key in expired:
            del self._entries[key]
        self._writes_since_sweep = 0
        self._sweep_after = max(SWEEP_MIN_WRITES, len(self._entries))
        self._last_sweep = now

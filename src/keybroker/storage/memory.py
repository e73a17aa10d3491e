"""In-process key-value storage. Lost at exit, and private to one process."""

from __future__ import annotations

import time
from collections.abc import Callable

from keybroker.storage.base import KeyValueStorage

_SWEEP_EVERY = 1024  # writes between sweeps of expired entries: bounded memory under load


class MemoryKeyValueStorage(KeyValueStorage):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._writes = 0

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= self._clock():
            del self._values[key]
            return None
        return value

    async def _get(self, key: str) -> bytes | None:
        return self._live(key)

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        if not overwrite and self._live(key) is not None:
            return False
        self._values[key] = (value, None if ttl is None else self._clock() + ttl)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()
        return True

    async def _delete(self, key: str) -> bytes | None:
        value = self._live(key)
        self._values.pop(key, None)
        return value

    async def _list(self) -> list[str]:
        return [key for key in list(self._values) if self._live(key) is not None]

    def _sweep(self) -> None:
        now = self._clock()
        expired = [k for k, (_, exp) in self._values.items() if exp is not None and exp <= now]
        for key in expired:
            del self._values[key]

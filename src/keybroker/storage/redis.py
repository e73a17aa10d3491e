"""Key-value storage in Redis (redis-py asyncio), for sessions and shared state of replicas.

Each key is a hash ``<namespace>:<key>`` holding the value (``v``) and, for expiring entries,
the deadline by the injected clock (``e``); Redis's own expiry (``PEXPIRE``) reclaims the memory
as well. Inserts without overwrite, deletes and ``compare_and_set`` are Lua scripts, so they
are atomic across replicas. A server that cannot be reached within the timeout answers
``ServiceUnavailableError`` (503); the next call reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keybroker.errors import ServiceUnavailableError, StorageError
from keybroker.storage.base import KeyValueStorage

TIMEOUT = 5.0
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,128}")

# KEYS[1] = key; ARGV = value, deadline ("" = none), now, ttl in ms ("" = none)
_INSERT = """
local expires = redis.call('HGET', KEYS[1], 'e')
local live = not expires or tonumber(expires) > tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 and live then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'e', ARGV[2]) end
if ARGV[4] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""
# KEYS[1] = key; returns {value, deadline} of what was deleted
_DELETE = """
local found = redis.call('HMGET', KEYS[1], 'v', 'e')
redis.call('DEL', KEYS[1])
return found
"""

# KEYS[1] = key; ARGV = "1" if a live value is expected, the expected value, "1" to write
# (else delete), the new value, now. The comparison and the change are one script: atomic.
_COMPARE_AND_SET = """
local found = redis.call('HMGET', KEYS[1], 'v', 'e')
local current = found[1]
if current and found[2] and tonumber(found[2]) <= tonumber(ARGV[5]) then current = false end
if ARGV[1] == '1' then
  if (not current) or current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'v', ARGV[4]) end
return 1
"""


# SHA-1 of each Lua script run here (a handful of constant texts), by text
_SCRIPT_DIGESTS: dict[str, str] = {}
_SCRIPTS_REMEMBERED = 64


class RedisKeyValueStorage(KeyValueStorage):
    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = TIMEOUT,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise StorageError(f"invalid Redis namespace {namespace[:64]!r}")
        self._url = url
        self._prefix = f"{namespace}:"
        self._clock = clock
        self._timeout = timeout
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry_on_timeout=False,
            )
            self._clients[loop] = client
        return client

    async def _do(self, command: str, *args: Any) -> Any:
        try:
            return await getattr(self._client(), command)(*args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ServiceUnavailableError(
                f"Redis is unavailable ({type(e).__name__}): retry later"
            ) from None

    def _live(self, value: Any, deadline: Any) -> bytes | None:
        if value is None:
            return None
        if deadline is not None and float(deadline) <= self._clock():
            return None
        return bytes(value)

    async def _get(self, key: str) -> bytes | None:
        value, deadline = await self._do("hmget", self._prefix + key, ["v", "e"])
        live = self._live(value, deadline)
        if live is None and value is not None:
            await self._do("delete", self._prefix + key)
        return live

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        pipeline = self._client().pipeline(transaction=False)
        for key in keys:
            pipeline.hmget(self._prefix + key, ["v", "e"])
        try:
            replies = await pipeline.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ServiceUnavailableError(
                f"Redis is unavailable ({type(e).__name__}): retry later"
            ) from None
        found = {}
        for key, (value, deadline) in zip(keys, replies, strict=True):
            live = self._live(value, deadline)
            if live is not None:
                found[key] = live
        return found

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        now = self._clock()
        deadline = "" if ttl is None else repr(now + ttl)
        # Redis's own expiry only reclaims memory; a margin keeps it behind our deadline.
        expire_ms = "" if ttl is None else str(math.ceil(ttl * 1000) + 60_000)
        if overwrite:
            pipeline = self._client().pipeline(transaction=True)
            name = self._prefix + key
            pipeline.delete(name)
            pipeline.hset(name, mapping={"v": value, **({"e": deadline} if deadline else {})})
            if expire_ms:
                pipeline.pexpire(name, int(expire_ms))
            try:
                await pipeline.execute()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                raise ServiceUnavailableError(
                    f"Redis is unavailable ({type(e).__name__}): retry later"
                ) from None
            return True
        inserted = await self._script(
            _INSERT, 1, self._prefix + key, value, deadline, repr(now), expire_ms
        )
        return bool(inserted)

    async def _delete(self, key: str) -> bytes | None:
        value, deadline = await self._script(_DELETE, 1, self._prefix + key)
        return self._live(value, deadline)

    async def _list(self) -> list[str]:
        keys: list[str] = []
        client = self._client()
        try:
            async for name in client.scan_iter(match=self._prefix + "*", count=500):
                keys.append(name.decode()[len(self._prefix) :])
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ServiceUnavailableError(
                f"Redis is unavailable ({type(e).__name__}): retry later"
            ) from None
        live = []
        for key in keys:
            value, deadline = await self._do("hmget", self._prefix + key, ["v", "e"])
            if self._live(value, deadline) is not None:
                live.append(key)
        return live

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        changed = await self._script(
            _COMPARE_AND_SET,
            1,
            self._prefix + key,
            "0" if expected is None else "1",
            expected or b"",
            "0" if new is None else "1",
            new or b"",
            repr(self._clock()),
        )
        return bool(changed)

    async def _list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """SCAN matches the prefix (the key alphabet has no glob characters), then the first
        ``limit`` live keys after ``after`` are checked in pipelined batches."""
        names: list[str] = []
        client = self._client()
        try:
            async for name in client.scan_iter(match=self._prefix + prefix + "*", count=500):
                key = name.decode()[len(self._prefix) :]
                if after is None or key > after:
                    names.append(key)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ServiceUnavailableError(
                f"Redis is unavailable ({type(e).__name__}): retry later"
            ) from None
        names.sort()
        page: list[str] = []
        now = self._clock()
        for start in range(0, len(names), limit):
            batch = names[start : start + limit]
            pipeline = client.pipeline(transaction=False)
            for key in batch:  # the deadline and existence only: values are never loaded
                pipeline.hget(self._prefix + key, "e")
                pipeline.exists(self._prefix + key)
            try:
                replies = await pipeline.execute()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                raise ServiceUnavailableError(
                    f"Redis is unavailable ({type(e).__name__}): retry later"
                ) from None
            for index, key in enumerate(batch):
                deadline, exists = replies[2 * index], replies[2 * index + 1]
                if exists and (deadline is None or float(deadline) > now):
                    page.append(key)
            if len(page) >= limit:
                break
        return page[:limit]

    async def run_script(self, script: str, keys: list[str], args: list[str]) -> Any:
        """Run a Lua ``script`` atomically on keys of this namespace (``keys`` are prefixed;
        they are the caller's own, never session keys). For state that needs an atomic
        read-modify-write across replicas, such as ``keybroker.kbs.limits``."""
        names = [self._prefix + key for key in keys]
        return await self._guarded("script", self._script(script, len(names), *names, *args))

    async def _script(self, script: str, key_count: int, *args: Any) -> Any:
        """Run ``script`` by its SHA-1 (``EVALSHA``: Redis neither receives nor hashes the text
        again); a Redis that does not hold it yet (restarted, flushed, another server behind
        the URL) answers NOSCRIPT, and the text is sent once with ``EVAL``, which caches it."""
        digest = _SCRIPT_DIGESTS.get(script)
        if digest is None:
            digest = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis's script name
            if len(_SCRIPT_DIGESTS) < _SCRIPTS_REMEMBERED:
                _SCRIPT_DIGESTS[script] = digest
        try:
            return await self._do("evalsha", digest, key_count, *args)
        except NoScriptError:
            return await self._do("eval", script, key_count, *args)

    async def _close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

"""The Redis store runs its Lua scripts by digest (EVALSHA) and sends a script's text only to a
Redis that does not hold it: after a restart or a SCRIPT FLUSH every operation still works.
Each test owns a private redis-server, so its command counts are its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis

from databases import private_redis
from keybroker.kbs.limits import RedisBuckets
from keybroker.storage.redis import RedisKeyValueStorage


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_scripts_run_by_digest_once_redis_holds_them(tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)

        async def main() -> None:
            store = RedisKeyValueStorage(server.url, "scripts")
            try:
                # each script's first run: NOSCRIPT, then EVAL with its text
                assert await store.set("a", b"1", overwrite=False)
                assert await store.compare_and_set("a", b"1", b"2")
                assert await store.delete("a") == b"2"
                assert _calls(client, "eval") == 3
                eval_before, sha_before = _calls(client, "eval"), _calls(client, "evalsha")
                for index in range(5):
                    assert await store.set(f"k{index}", b"v", overwrite=False)
                    assert not await store.set(f"k{index}", b"w", overwrite=False)
                    assert await store.compare_and_set(f"k{index}", b"v", b"x")
                    assert await store.delete(f"k{index}") == b"x"
                assert _calls(client, "eval") == eval_before  # no script text sent again
                assert _calls(client, "evalsha") - sha_before == 20
            finally:
                await store.close()

        asyncio.run(main())


def test_a_flushed_script_cache_is_filled_again(tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)

        async def main() -> None:
            store = RedisKeyValueStorage(server.url, "scripts")
            try:
                assert await store.set("a", b"1", overwrite=False)
                client.script_flush()
                assert await store.set("b", b"2", overwrite=False)
                client.script_flush()
                assert await store.compare_and_set("b", b"2", b"3")
                client.script_flush()
                assert await store.delete("b") == b"3"
                client.script_flush()
                buckets = RedisBuckets(store, rate=1.0, burst=2)  # run_script, flushed too
                waits = [await buckets.take("guest", 1000.0) for _ in range(3)]
                assert waits[:2] == [0.0, 0.0] and waits[2] > 0
                assert await store.get("a") == b"1"
            finally:
                await store.close()

        asyncio.run(main())

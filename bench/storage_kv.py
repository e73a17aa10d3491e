"""Key-value storage cost per operation, for every backend, on this machine's real servers.

.venv/bin/python bench/storage_kv.py [ROUNDS]

Prints microseconds per call (sequential, one event loop, one connection in use at a time) for
what a handshake and a resource GET do: a session insert with a TTL and without overwrite, a
session read, a 4 KiB resource read, and a 4 KiB resource overwrite. PostgreSQL is
127.0.0.1:5432 (database ``test``), Redis 127.0.0.1:6379; each run uses a fresh namespace and
removes it afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import redis

from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.redis import RedisKeyValueStorage

POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS = "redis://127.0.0.1:6379/0"
VALUE = bytes(range(256)) * 16  # 4 KiB


async def per_call(rounds: int, operation: Callable[[int], Awaitable[object]]) -> float:
    start = time.perf_counter()
    for index in range(rounds):
        await operation(index)
    return (time.perf_counter() - start) / rounds * 1e6


async def measure(name: str, store: KeyValueStorage, rounds: int) -> None:
    await store.set("default/bench/resource", VALUE)
    await store.set("session-read", VALUE, ttl=300)
    figures = {
        "session insert": await per_call(
            rounds, lambda i: store.set(f"s-{i}", b"session", overwrite=False, ttl=300)
        ),
        "session read": await per_call(rounds, lambda i: store.get("session-read")),
        "resource read": await per_call(rounds, lambda i: store.get("default/bench/resource")),
        "resource write": await per_call(
            rounds, lambda i: store.set("default/bench/resource", VALUE)
        ),
    }
    await store.close()
    cells = "  ".join(f"{k} {v:8.1f} us" for k, v in figures.items())
    print(f"{name:10} {cells}")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    namespace = f"bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as directory:
        stores: list[tuple[str, KeyValueStorage]] = [
            ("memory", MemoryKeyValueStorage()),
            ("local_fs", LocalFsKeyValueStorage(Path(directory) / "fs", namespace)),
            ("local_json", LocalJsonKeyValueStorage(Path(directory) / "json", namespace)),
            ("postgres", PostgresKeyValueStorage(POSTGRES, namespace)),
            ("redis", RedisKeyValueStorage(REDIS, namespace)),
        ]
        print(f"{rounds} sequential calls each")
        try:
            for name, store in stores:
                # LocalJson rewrites its whole file per change: fewer rounds keep it short
                asyncio.run(measure(name, store, rounds if name != "local_json" else rounds // 5))
        finally:
            with psycopg.connect(POSTGRES, autocommit=True) as connection:
                connection.execute(f'DROP TABLE IF EXISTS "{namespace}"')
            client = redis.Redis.from_url(REDIS)
            for key in client.scan_iter(match=f"{namespace}:*"):
                client.delete(key)
            client.close()


if __name__ == "__main__":
    main()

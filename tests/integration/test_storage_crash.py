"""A process killed (SIGKILL) in the middle of writing a resource never leaves half a value.

A child process overwrites one key with two alternating 1 MiB values as fast as it can; it is
killed at an arbitrary moment, several times over, and each time the stored value must be
exactly one of the two (or absent, if no write had finished yet). Real PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.redis import RedisKeyValueStorage

POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS = "redis://127.0.0.1:6379/0"
MIB = 1024 * 1024
KEY = "default/crash/secret"

WRITER = """
import asyncio, sys
from pathlib import Path
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage
from keybroker.storage.postgres import PostgresKeyValueStorage
from keybroker.storage.redis import RedisKeyValueStorage

kind, where, namespace = sys.argv[1:4]
store = {
    "local_fs": lambda: LocalFsKeyValueStorage(Path(where), namespace),
    "local_json": lambda: LocalJsonKeyValueStorage(Path(where), namespace),
    "postgres": lambda: PostgresKeyValueStorage(where, namespace),
    "redis": lambda: RedisKeyValueStorage(where, namespace),
}[kind]()
values = [bytes([0xA5]) * (1024 * 1024), bytes([0x5A]) * (1024 * 1024)]

async def main():
    n = 0
    while True:
        await store.set("default/crash/secret", values[n % 2])
        n += 1
        if n == 2:
            print("writing", flush=True)

asyncio.run(main())
"""
VALUES = (bytes([0xA5]) * MIB, bytes([0x5A]) * MIB)


@pytest.fixture(params=["local_fs", "local_json", "postgres", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    namespace = f"t_{uuid.uuid4().hex[:12]}"
    kind = str(request.param)
    where = {"postgres": POSTGRES, "redis": REDIS}.get(kind, str(tmp_path))
    yield kind, where, namespace
    if kind == "postgres":
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {namespace}")
    elif kind == "redis":
        client = redis.Redis.from_url(REDIS)
        client.delete(f"{namespace}:{KEY}")
        client.close()


def _reader(kind: str, where: str, namespace: str) -> KeyValueStorage:
    if kind == "local_fs":
        return LocalFsKeyValueStorage(Path(where), namespace)
    if kind == "local_json":
        return LocalJsonKeyValueStorage(Path(where), namespace)
    if kind == "postgres":
        return PostgresKeyValueStorage(where, namespace)
    return RedisKeyValueStorage(where, namespace)


def test_killed_writer_leaves_a_whole_value(backend: tuple[str, str, str]) -> None:
    kind, where, namespace = backend
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, where, namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"writing\n", (
            writer.stderr.read() if writer.stderr else ""
        )
        time.sleep(delay)  # an arbitrary moment within the write loop, not a timing assertion
        writer.send_signal(signal.SIGKILL)
        writer.wait()

        async def read_back() -> bytes | None:
            store = _reader(kind, where, namespace)
            try:
                return await store.get(KEY)
            finally:
                await store.close()

        assert asyncio.run(read_back()) in VALUES

"""Real PostgreSQL and Redis for tests: a fresh database per test, a private Redis server.

The machine's PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are shared by
every test, so a KBS under test gets its own database (its tables are named after fixed
namespaces) and, where a test stops Redis, its own ``redis-server`` process.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis

from ports import free_port
from system_tools import require

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SHARED_REDIS = "redis://127.0.0.1:6379/0"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The name of a new, empty database on the local server, dropped afterwards."""
    name = f"kbs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class PrivateRedis:
    """A ``redis-server`` of this test's own, which the test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = str(require("redis-server", "redis-server", default="/usr/bin/redis-server"))
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()

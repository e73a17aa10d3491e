"""PostgreSQL specifics beyond the conformance suite: upstream's tables, settings, errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from keybroker.errors import ServiceUnavailableError
from keybroker.storage.postgres import PostgresKeyValueStorage

POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture
def table() -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {name}")


def test_reads_and_migrates_a_table_made_by_upstream(table: str) -> None:
    """Upstream's KBS creates (value BYTEA, key TEXT PRIMARY KEY): its rows stay readable."""
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        name = sql.Identifier(table)
        connection.execute(
            sql.SQL("CREATE TABLE {} (value BYTEA, key TEXT PRIMARY KEY)").format(name)
        )
        connection.execute(
            sql.SQL("INSERT INTO {} (key, value) VALUES (%s, %s)").format(name),
            ("repo/type/tag", b"\x00up"),
        )
    store = PostgresKeyValueStorage(POSTGRES, table)

    async def scenario() -> None:
        try:
            assert await store.get("repo/type/tag") == b"\x00up"
            assert await store.set("session", b"s", ttl=60) is True
            assert await store.list_keys() == ["repo/type/tag", "session"]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_wrong_database_is_unavailable_with_a_clear_message() -> None:
    store = PostgresKeyValueStorage(
        "host=127.0.0.1 port=5432 user=postgres dbname=no_such_database_here",
        "repository",
        timeout=1,
    )

    async def scenario() -> None:
        try:
            await store.get("k")
        finally:
            await store.close()

    # a database that does not exist is a login PostgreSQL refuses, not an outage
    with pytest.raises(ServiceUnavailableError, match='refused the login.*"no_such_database_here"'):
        asyncio.run(scenario())


def test_replicas_creating_one_table_at_once_all_succeed() -> None:
    """Replicas starting together each create the namespace's table on their first request.
    PostgreSQL's IF NOT EXISTS does not stop two concurrent creations from colliding on the
    catalog (the table, or its row type): the losers must find the table made, not fail the
    request. Many fresh tables, eight replicas each, so the race is met."""
    tables = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(30)]

    async def replicas_start(table: str) -> list[bool]:
        stores = [PostgresKeyValueStorage(POSTGRES, table) for _ in range(8)]
        try:
            return await asyncio.gather(
                *(store.set(f"k{i}", b"v") for i, store in enumerate(stores))
            )
        finally:
            for store in stores:
                await store.close()

    async def scenario() -> None:
        for table in tables:
            assert await replicas_start(table) == [True] * 8

    try:
        asyncio.run(scenario())
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            for table in tables:
                connection.execute(f"DROP TABLE IF EXISTS {table}")

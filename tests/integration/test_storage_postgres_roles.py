"""A PostgreSQL that refuses the KBS's login or its rights reads as such, not as an outage:
real roles on the local server (trust authentication), the production store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from databases import POSTGRES_ADMIN, fresh_postgres_database
from keybroker.errors import ServiceUnavailableError, StorageError
from keybroker.storage.postgres import PostgresKeyValueStorage


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_postgres_database() as name:
        yield name


def _conninfo(database: str, user: str) -> str:
    return f"host=127.0.0.1 port=5432 user={user} dbname={database}"


async def _set_and_close(store: PostgresKeyValueStorage) -> None:
    try:
        await store.set("key", b"value")
    finally:
        await store.close()


def test_a_role_that_does_not_exist_is_named_not_called_an_outage(database: str) -> None:
    role = f"kbs_missing_{uuid.uuid4().hex[:8]}"
    store = PostgresKeyValueStorage(_conninfo(database, role), "kbs", timeout=1)
    with pytest.raises(ServiceUnavailableError) as refused:
        asyncio.run(_set_and_close(store))
    detail = refused.value.detail
    assert "refused the login" in detail and f'role "{role}" does not exist' in detail
    assert "username, password and db" in detail


def test_a_role_without_rights_on_its_tables_is_told_to_grant_them(database: str) -> None:
    role = f"kbs_noright_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with psycopg.connect(_conninfo(database, "postgres"), autocommit=True) as owner:
            owner.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        store = PostgresKeyValueStorage(_conninfo(database, role), "kbs", timeout=2)
        with pytest.raises(StorageError) as refused:
            asyncio.run(_set_and_close(store))
        detail = refused.value.detail
        assert "refused this KBS's role access to table kbs" in detail
        assert "permission denied" in detail and "grant" in detail
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {role}")

"""Key-value storage in PostgreSQL (psycopg 3): one table per namespace, shared by replicas.

Rows are ``(key TEXT PRIMARY KEY, value BYTEA, expires_at DOUBLE PRECISION NULL)``; the table is
created at first use. Expiry follows the injected clock (a row past its deadline reads as
missing and is deleted lazily). An exclusive insert is one ``INSERT ... ON CONFLICT`` statement,
so exactly one of several replicas wins; so is each ``compare_and_set`` (a conditional
``INSERT``, ``UPDATE`` or ``DELETE``). Pages of keys are read in byte order (``COLLATE "C"``,
Python's order too, whatever the database's collation), bounded by ``LIMIT``. A database that
cannot be reached within the timeout answers ``ServiceUnavailableError`` (503) and the next
call tries again: no restart needed.

Connections come from a pool per event loop (each worker process and test loop has its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from keybroker.errors import ServiceUnavailableError, StorageError
from keybroker.storage.base import KeyValueStorage

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
CONNECT_TIMEOUT = 5
# A pool that cannot connect says only that it timed out. One direct connection, at most this
# often per store, finds out why (a wrong role or password reads differently from an outage).
DIAGNOSE_INTERVAL = 30.0
# What PostgreSQL says when it refuses a login, as opposed to being unreachable.
_LOGIN_REFUSED = re.compile(
    r'password authentication failed|role "[^"]*" does not exist|'
    r'database "[^"]*" does not exist|no pg_hba\.conf entry|'
    r"permission denied for database|not permitted to log in"
)


class PostgresKeyValueStorage(KeyValueStorage):
    def __init__(
        self,
        conninfo: str,
        namespace: str,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if not _TABLE.fullmatch(namespace):
            raise StorageError(f"invalid PostgreSQL table name {namespace[:64]!r}")
        self._conninfo = conninfo
        self._namespace = namespace
        self._table = sql.Identifier(namespace)
        self._clock = clock
        self._timeout = timeout
        self._pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool[Any]] = {}
        self._ready: set[asyncio.AbstractEventLoop] = set()
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._diagnosed_at = -math.inf
        self._diagnosis: str | None = None

    async def _pool(self) -> AsyncConnectionPool[Any]:
        """This loop's pool, with the table created: retried on every call until it works, so
        a database that was down at start-up is picked up when it comes back."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = AsyncConnectionPool(
                self._conninfo,
                min_size=0,
                max_size=10,
                timeout=self._timeout,
                open=False,
                # A pooled connection may have died with a database restart: check it on
                # checkout (one round trip) rather than fail the request that drew it.
                check=AsyncConnectionPool.check_connection,
                kwargs={"connect_timeout": max(1, math.ceil(self._timeout)), "autocommit": True},
            )
            self._pools[loop] = pool
            await pool.open(wait=False)
        if loop not in self._ready:
            async with self._schema_lock(loop):
                if loop not in self._ready:
                    await self._create_table()
                    self._ready.add(loop)
        return pool

    async def _create_table(self) -> None:
        """Create the namespace's table, or add the expiry column to one made by upstream's
        KBS (``key``, ``value`` only): its rows read as permanent entries."""
        # Two replicas creating the table at the same moment can collide even with IF NOT
        # EXISTS (the catalog insert is not atomic): the loser finds the table made, or the
        # table's row type ("type ... already exists", DuplicateObject).
        with contextlib.suppress(
            psycopg.errors.UniqueViolation,
            psycopg.errors.DuplicateTable,
            psycopg.errors.DuplicateObject,
        ):
            await self._run(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, "
                    "value BYTEA NOT NULL, expires_at DOUBLE PRECISION)"
                ).format(self._table),
                (),
                fetch=False,
            )
        with contextlib.suppress(psycopg.errors.DuplicateColumn):
            await self._run(
                sql.SQL(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS expires_at DOUBLE PRECISION"
                ).format(self._table),
                (),
                fetch=False,
            )

    def _schema_lock(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def _run(self, query: sql.Composed, params: tuple[Any, ...], *, fetch: bool) -> Any:
        pool = self._pools[asyncio.get_running_loop()]
        try:
            async with pool.connection() as connection, connection.cursor() as cursor:
                await cursor.execute(query, params)
                if not fetch:
                    return cursor.rowcount
                return await cursor.fetchall()
        except PoolTimeout as e:
            raise _unavailable(e, await self._diagnose()) from None
        except psycopg.OperationalError as e:
            raise _unavailable(e) from None
        except psycopg.errors.InsufficientPrivilege as e:
            raise StorageError(
                f"PostgreSQL refused this KBS's role access to table {self._namespace} "
                f"({_first_line(e)}): grant the role of [storage_backend] backends.postgres "
                "the rights to create and use its tables"
            ) from None

    async def _diagnose(self) -> str | None:
        """Why the pool cannot connect, when PostgreSQL refuses the login: one direct attempt,
        at most every ``DIAGNOSE_INTERVAL`` seconds, so an outage does not double its cost."""
        now = time.monotonic()
        if now - self._diagnosed_at < DIAGNOSE_INTERVAL:
            return self._diagnosis
        self._diagnosed_at, self._diagnosis = now, None
        try:
            connection = await psycopg.AsyncConnection.connect(
                self._conninfo, connect_timeout=max(1, math.ceil(min(self._timeout, 2)))
            )
        except psycopg.OperationalError as e:
            if _LOGIN_REFUSED.search(str(e)):
                self._diagnosis = _first_line(e)
        else:
            await connection.close()
        return self._diagnosis

    async def _call(self, query: sql.Composed, params: tuple[Any, ...], fetch: bool = True) -> Any:
        await self._pool()
        return await self._run(query, params, fetch=fetch)

    async def _get(self, key: str) -> bytes | None:
        rows = await self._call(
            sql.SQL("SELECT value, expires_at FROM {} WHERE key = %s").format(self._table), (key,)
        )
        if not rows:
            return None
        value, expires_at = rows[0]
        if expires_at is not None and expires_at <= self._clock():
            await self._delete(key)
            return None
        return bytes(value)

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        rows = await self._call(
            sql.SQL("SELECT key, value, expires_at FROM {} WHERE key = ANY(%s)").format(
                self._table
            ),
            (keys,),
        )
        now = self._clock()
        # expired rows read as missing; the single-key read purges them
        return {
            key: bytes(value)
            for key, value, expires_at in rows
            if expires_at is None or expires_at > now
        }

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        now = self._clock()
        expires_at = None if ttl is None else now + ttl
        if overwrite:
            query = sql.SQL(
                "INSERT INTO {t} (key, value, expires_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, "
                "expires_at = EXCLUDED.expires_at"
            ).format(t=self._table)
            await self._call(query, (key, value, expires_at), fetch=False)
            return True
        # Only an absent or expired row may be replaced: one statement, one winner.
        query = sql.SQL(
            "INSERT INTO {t} AS row (key, value, expires_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, "
            "expires_at = EXCLUDED.expires_at "
            "WHERE row.expires_at IS NOT NULL AND row.expires_at <= %s"
        ).format(t=self._table)
        written = await self._call(query, (key, value, expires_at, now), fetch=False)
        return bool(written)

    async def _delete(self, key: str) -> bytes | None:
        rows = await self._call(
            sql.SQL("DELETE FROM {} WHERE key = %s RETURNING value, expires_at").format(
                self._table
            ),
            (key,),
        )
        if not rows:
            return None
        value, expires_at = rows[0]
        if expires_at is not None and expires_at <= self._clock():
            return None
        return bytes(value)

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        now = self._clock()
        live = sql.SQL("(row.expires_at IS NULL OR row.expires_at > %s)")
        if expected is None and new is None:
            query = sql.SQL("SELECT 1 FROM {t} AS row WHERE key = %s AND {live}")
            rows = await self._call(query.format(t=self._table, live=live), (key, now))
            return not rows
        if expected is None:  # create: only over an absent or expired row
            query = sql.SQL(
                "INSERT INTO {t} AS row (key, value, expires_at) VALUES (%s, %s, NULL) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL "
                "WHERE row.expires_at IS NOT NULL AND row.expires_at <= %s"
            )
            params: tuple[Any, ...] = (key, new, now)
        elif new is None:
            query = sql.SQL("DELETE FROM {t} AS row WHERE key = %s AND value = %s AND {live}")
            params = (key, expected, now)
        else:
            query = sql.SQL(
                "UPDATE {t} AS row SET value = %s, expires_at = NULL "
                "WHERE key = %s AND value = %s AND {live}"
            )
            params = (new, key, expected, now)
        # one statement: the comparison and the change are atomic across replicas
        changed = await self._call(query.format(t=self._table, live=live), params, fetch=False)
        return bool(changed)

    async def _list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        rows = await self._call(
            sql.SQL(
                'SELECT key FROM {} WHERE left(key, %s) = %s AND key COLLATE "C" > %s '
                "AND (expires_at IS NULL OR expires_at > %s) "
                'ORDER BY key COLLATE "C" LIMIT %s'
            ).format(self._table),
            (len(prefix), prefix, after or "", self._clock(), limit),
        )
        return [str(row[0]) for row in rows]

    async def _list(self) -> list[str]:
        rows = await self._call(
            sql.SQL(
                "SELECT key FROM {} WHERE expires_at IS NULL OR expires_at > %s ORDER BY key"
            ).format(self._table),
            (self._clock(),),
        )
        return [str(row[0]) for row in rows]

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self._pools.pop(loop, None)
        self._ready.discard(loop)
        self._locks.pop(loop, None)
        if pool is not None:
            await pool.close()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _unavailable(error: Exception, refused: str | None = None) -> ServiceUnavailableError:
    reason = refused or _first_line(error)
    if refused is not None or _LOGIN_REFUSED.search(reason):
        return ServiceUnavailableError(
            f"PostgreSQL refused the login ({reason}): check username, password and db in "
            "[storage_backend] backends.postgres (or POSTGRES_URL)"
        )
    return ServiceUnavailableError(f"PostgreSQL is unavailable ({reason}): retry later")


def conninfo_from_config(
    *, db: str, username: str, password: str | None, host: str, port: int
) -> str:
    """A libpq connection string that keeps the user name when a password is set too (an
    upstream bug dropped it)."""
    parts: dict[str, Any] = {"dbname": db, "user": username, "host": host, "port": port}
    if password:
        parts["password"] = password
    return psycopg.conninfo.make_conninfo(**parts)

"""Which key-value storage serves each ``storage_type``: an explicit, typed table.

:data:`STORAGE_PROVIDERS` maps a :class:`~keybroker.config.StorageType` to a function that
builds its :class:`StorageProvider` from the ``[storage_backend.backends]`` section. The
PostgreSQL and Redis modules import their drivers (psycopg, redis) at their top, so their
factories import them in their body: a missing extra stops start-up with the ``pip install``
line that adds it, and mypy still sees the real modules. :data:`STAMPED_CACHE` says which
types the read caches of :mod:`keybroker.storage.read_cache` may serve.

This module reads no environment: ``POSTGRES_URL`` and ``REDIS_URL`` are mapped into the
sections when the configuration is loaded (``keybroker.config_env``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from keybroker.config import StorageBackends, StorageType
from keybroker.errors import ConfigError
from keybroker.storage.provider import (
    StorageProvider,
    local_fs_provider,
    local_json_provider,
    memory_provider,
    shared_memory_provider,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# (the backends section, the clock, the workers' shared directory for memory stores or None)
StorageFactory = Callable[[StorageBackends, Clock, Path | None], StorageProvider]


def _memory(backends: StorageBackends, clock: Clock, memory_dir: Path | None) -> StorageProvider:
    if memory_dir is not None:  # the server's private directory (kbs/server.py)
        return shared_memory_provider(memory_dir, clock=clock)
    return memory_provider(clock=clock)


def _local_fs(backends: StorageBackends, clock: Clock, memory_dir: Path | None) -> StorageProvider:
    if backends.local_fs is None:
        raise ConfigError(
            "storage_type = LocalFs needs [storage_backend.backends.local_fs] dir_path"
        )
    return local_fs_provider(backends.local_fs.dir_path, clock=clock)


def _local_json(
    backends: StorageBackends, clock: Clock, memory_dir: Path | None
) -> StorageProvider:
    if backends.local_json is None:
        raise ConfigError(
            "storage_type = LocalJson needs [storage_backend.backends.local_json] file_dir_path"
        )
    return local_json_provider(backends.local_json.file_dir_path, clock=clock)


def _postgres(backends: StorageBackends, clock: Clock, memory_dir: Path | None) -> StorageProvider:
    settings = backends.postgres
    if settings is None:
        raise ConfigError(
            "storage_type = Postgres needs [storage_backend.backends.postgres] "
            "(url, or db, username, password, host, port) or the environment variable "
            "POSTGRES_URL"
        )
    try:  # psycopg is an optional extra
        from keybroker.storage.postgres import (  # noqa: PLC0415
            PostgresKeyValueStorage,
            conninfo_from_config,
        )
    except ImportError:
        raise ConfigError(_missing_extra("Postgres", "postgres")) from None
    if settings.url:
        conninfo = settings.url
        log.info("PostgreSQL storage: connection from its url (POSTGRES_URL or the file)")
    else:
        conninfo = conninfo_from_config(
            db=settings.db,
            username=settings.username,
            password=settings.password,
            host=settings.host,
            port=settings.port,
        )
        log.info(
            "PostgreSQL storage: %s@%s:%d/%s",
            settings.username,
            settings.host,
            settings.port,
            settings.db,
        )
    timeout = settings.timeout
    return StorageProvider(
        lambda namespace: PostgresKeyValueStorage(conninfo, namespace, clock=clock, timeout=timeout)
    )


def _redis(backends: StorageBackends, clock: Clock, memory_dir: Path | None) -> StorageProvider:
    settings = backends.redis
    if settings is None:
        raise ConfigError(
            "storage_type = Redis needs [storage_backend.backends.redis] (url) "
            "or the environment variable REDIS_URL"
        )
    try:  # redis is an optional extra
        from keybroker.storage.redis import RedisKeyValueStorage  # noqa: PLC0415
    except ImportError:
        raise ConfigError(_missing_extra("Redis", "redis")) from None
    address, timeout = settings.url, settings.timeout
    return StorageProvider(
        lambda namespace: RedisKeyValueStorage(address, namespace, clock=clock, timeout=timeout)
    )


def _missing_extra(kind: str, extra: str) -> str:
    return f"storage_type = {kind} needs the {extra} extra: pip install 'keybroker[{extra}]'"


STORAGE_PROVIDERS: Mapping[StorageType, StorageFactory] = {
    StorageType.MEMORY: _memory,
    StorageType.LOCAL_FS: _local_fs,
    StorageType.LOCAL_JSON: _local_json,
    StorageType.POSTGRES: _postgres,
    StorageType.REDIS: _redis,
}


# Whether the in-process read caches with a generation stamp (keybroker.storage.read_cache)
# serve a store of this type: only where every write to the cached namespaces goes through a
# KBS, which writes the stamp after it. Memory is in-process (or the workers' shared files):
# there is no round trip to save. Every type is listed, so a new one is a decision.
STAMPED_CACHE: Mapping[StorageType, bool] = {
    StorageType.MEMORY: False,
    StorageType.LOCAL_FS: True,
    StorageType.LOCAL_JSON: True,
    StorageType.POSTGRES: True,
    StorageType.REDIS: True,
}


def storage_provider(
    kind: StorageType, backends: StorageBackends, clock: Clock, memory_dir: Path | None
) -> StorageProvider:
    """The provider of ``storage_type = kind``."""
    return STORAGE_PROVIDERS[kind](backends, clock, memory_dir)

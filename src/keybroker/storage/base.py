"""The key-value storage interface: async, bound to one namespace per instance, with TTLs.

Upstream Trustee's ``KeyValueStorage`` (``deps/key-value-storage``) in Python: ``set`` with an
``overwrite`` flag, ``get``, ``delete`` returning the previous value, and a key listing. Values are
opaque bytes; this module does not interpret them and holds no policy.

Backends subclass :class:`KeyValueStorage` and implement the protected ``_get``/``_set``/
``_delete``/``_list``/``_compare_and_set`` (and ``_close`` when they hold connections).
``compare_and_set`` is Keybroker's addition: one atomic read-compare-write, natively per backend
(one SQL statement, one Lua script, or under the backend's lock), on which the versioned
resources of :mod:`keybroker.storage.versions` build. ``list_page`` (also ours) lists a bounded,
sorted page of keys under a prefix; backends that can do it natively override ``_list_page``.

The public methods, as in python-tuf's ``FetcherInterface.fetch()``, validate every key before
a backend sees it and turn a backend's foreign failures (``OSError``, a driver's exceptions)
into :class:`StorageError`, so callers only ever handle Keybroker errors.

Keys use upstream's alphabet (ASCII letters and digits, ``-``, ``_``, ``.``, ``/``). On top of
upstream, no ``/``-separated segment may be empty or start with a dot: that rules out ``.`` and
``..`` (path traversal in file-backed stores) and keeps dot-names free for a backend's own
bookkeeping files.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from keybroker.errors import KeybrokerError, StorageError

MAX_KEY_LENGTH = 512
MAX_NAMESPACE_LENGTH = 128
MAX_PAGE = 1000  # the most keys one list_page call returns, whatever the caller asks
_KEY_CHARS = re.compile(r"[A-Za-z0-9_./-]+")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")

T = TypeVar("T")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid storage key, else raise :class:`StorageError`."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise StorageError(f"a storage key has 1 to {MAX_KEY_LENGTH} characters, found {len(key)}")
    if not _KEY_CHARS.fullmatch(key):
        raise StorageError(
            f"invalid storage key {key[:64]!r}: only ASCII letters, digits, - _ . / are allowed"
        )
    # Traversal defence: `a/../b`, `./a`, `a//b` or a hidden `.name` never reach a backend.
    if any(not segment or segment.startswith(".") for segment in key.split("/")):
        raise StorageError(
            f"invalid storage key {key[:64]!r}: a segment is empty or starts with a dot"
        )
    return key


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it matches ``[A-Za-z0-9_-]+`` (it names a directory or a table)."""
    if len(namespace) > MAX_NAMESPACE_LENGTH or not _NAMESPACE.fullmatch(namespace):
        raise StorageError(
            f"invalid storage namespace {namespace[:64]!r}: expected 1 to "
            f"{MAX_NAMESPACE_LENGTH} ASCII letters, digits, - or _"
        )
    return namespace


def validate_ttl(ttl: float | None) -> float | None:
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise StorageError(f"a TTL is a positive number of seconds, found {ttl!r}")
    return ttl


async def translate_errors(what: str, pending: Awaitable[T]) -> T:
    """Await ``pending``; re-raise Keybroker errors, turn any other exception into StorageError.

    The message names the error class and the OS reason only: keys can be session ids, and a
    foreign message may carry paths or values that must not reach a client. ``from e`` keeps
    the whole cause for the log.
    """
    try:
        return await pending
    except KeybrokerError:
        raise
    except Exception as e:  # a backend's own failure (OSError, a driver's error): report as ours
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise StorageError(f"{what} failed: {reason}") from e


class KeyValueStorage(ABC):
    """One namespace of a key-value store.

    ``ttl`` is in seconds: once it has passed the key reads as missing. Backends without native
    expiry store the deadline next to the value, treat expired entries as missing and purge them
    lazily.
    """

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if there is none (or it expired)."""
        return await self._guarded("get", self._get(validate_key(key)))

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The live values of ``keys`` (missing and expired ones left out), in one round trip
        where the backend can (PostgreSQL, Redis)."""
        unique = list(dict.fromkeys(validate_key(key) for key in keys))
        if not unique:
            return {}
        return await self._guarded("get", self._get_many(unique))

    async def set(
        self, key: str, value: bytes, *, overwrite: bool = True, ttl: float | None = None
    ) -> bool:
        """Store ``value`` under ``key``.

        Returns True if it was written, False (and nothing changed) if a live value exists and
        ``overwrite`` is False: with ``overwrite=False`` exactly one of several concurrent
        writers wins. An overwrite without ``ttl`` makes the key permanent.
        """
        validate_key(key)
        validate_ttl(ttl)
        return await self._guarded("set", self._set(key, bytes(value), overwrite, ttl))

    async def delete(self, key: str) -> bytes | None:
        """Remove ``key``; return the value it had, or None if there was none."""
        return await self._guarded("delete", self._delete(validate_key(key)))

    async def list_keys(self) -> list[str]:
        """Every live key of this namespace, sorted."""
        return sorted(await self._guarded("list", self._list()))

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        """Atomically: if ``key`` holds ``expected`` (None: no live value), make it hold ``new``
        (None: delete it) and return True; otherwise change nothing and return False.

        Across processes and replicas exactly one of several callers that read the same
        ``expected`` wins. A value written here is permanent (no TTL). Atomic with respect to
        every other ``compare_and_set`` on the key (and, on every backend but the workers'
        shared memory store, with ``set`` and ``delete`` too): keys managed by compare-and-set
        should only ever be changed through it.
        """
        validate_key(key)
        return await self._guarded(
            "compare_and_set",
            self._compare_and_set(
                key,
                None if expected is None else bytes(expected),
                None if new is None else bytes(new),
            ),
        )

    async def list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """At most ``limit`` (1 to :data:`MAX_PAGE`) live keys starting with ``prefix`` and
        sorting after ``after`` (from the start when None), in order."""
        # a prefix is a key's beginning: the key alphabet, any segment boundary allowed
        if prefix and (len(prefix) > MAX_KEY_LENGTH or not _KEY_CHARS.fullmatch(prefix)):
            raise StorageError(f"invalid key prefix {prefix[:64]!r}")
        if after is not None:
            validate_key(after)
        if not 1 <= limit <= MAX_PAGE:
            raise StorageError(f"a page has 1 to {MAX_PAGE} keys, asked for {limit}")
        return await self._guarded("list", self._list_page(prefix, after, limit))

    def storable(self, key: str) -> bool:
        """Whether this backend can hold ``key`` at all (LocalFs: its file name length)."""
        return True

    def creates_conditionally(self) -> bool:
        """Whether ``set(overwrite=False)`` is offered (a PKCS#11 token has no such thing)."""
        return True

    async def close(self) -> None:
        """Release connections and handles. The instance is not used afterwards."""
        await self._guarded("close", self._close())

    async def _guarded(self, operation: str, pending: Awaitable[T]) -> T:
        return await translate_errors(f"{type(self).__name__}: {operation}", pending)

    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            value = await self._get(key)
            if value is not None:
                found[key] = value
        return found

    @abstractmethod
    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool: ...

    @abstractmethod
    async def _delete(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _list(self) -> list[str]: ...

    @abstractmethod
    async def _compare_and_set(
        self, key: str, expected: bytes | None, new: bytes | None
    ) -> bool: ...

    async def _list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """Every key is listed and filtered: O(namespace) per page. PostgreSQL and Redis
        override this with a query bounded by the prefix."""
        keys = sorted(key for key in await self._list() if key.startswith(prefix))
        if after is not None:
            keys = [key for key in keys if key > after]
        return keys[:limit]

    async def _close(self) -> None:
        return None

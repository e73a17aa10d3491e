"""The key-value storage interface: async, namespaced (one instance per namespace), with TTLs.

Public methods validate keys and turn foreign failures (``OSError`` and the like) into
``StorageError``; backends implement the protected ``_`` methods. Keys use upstream's alphabet
(ASCII letters and digits, ``-``, ``_``, ``.``, ``/``) and may not contain empty, ``.`` or
``..`` segments: file-backed stores can never be walked out of their directory.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import TypeVar

from keybroker.errors import KeybrokerError, StorageError

MAX_KEY_LENGTH = 512
_KEY = re.compile(r"[A-Za-z0-9._/-]+")
T = TypeVar("T")


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise StorageError(f"invalid storage key {key[:64]!r}: use letters, digits, - _ . /")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise StorageError(f"invalid storage key {key[:64]!r}: empty, . or .. segment")
    return key


class KeyValueStorage(ABC):
    async def get(self, key: str) -> bytes | None:
        return await self._guard(self._get(validate_key(key)))

    async def set(
        self, key: str, value: bytes, *, overwrite: bool = True, ttl: float | None = None
    ) -> bool:
        """Store ``value``; False (and nothing written) if the key exists and not overwrite."""
        return await self._guard(self._set(validate_key(key), bytes(value), overwrite, ttl))

    async def delete(self, key: str) -> bytes | None:
        """Remove the key; return its previous value, or None if there was none."""
        return await self._guard(self._delete(validate_key(key)))

    async def list_keys(self) -> list[str]:
        return await self._guard(self._list())

    async def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections and handles."""

    @staticmethod
    async def _guard(operation: Awaitable[T]) -> T:
        try:
            return await operation
        except KeybrokerError:
            raise
        except (OSError, ValueError) as e:  # the backend's own failure, not the caller's
            raise StorageError(f"storage backend failed: {e}") from e

    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool: ...

    @abstractmethod
    async def _delete(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _list(self) -> list[str]: ...

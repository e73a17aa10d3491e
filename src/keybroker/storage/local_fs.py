"""Key-value storage on the local filesystem, in upstream Trustee's exact layout.

One file per key at ``<dir_path>/<namespace>/<key>``, every ``/`` in the key written as the
four characters ``\\x2F``, so a storage directory written by upstream's KBS works unchanged
(and the other way round). Writes are atomic: a temporary file in the same directory, fsync,
``os.replace``, fsync of the directory; a crash never leaves half a value. Values with a TTL
get a dot-prefixed sidecar holding their expiry; dot-files are never keys.

File I/O runs inline: the values are small (a policy, a session, a secret) and a local read or
write takes microseconds, less than handing it to a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage

_SLASH = "\\x2F"
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")


def write_atomically(path: Path, value: bytes) -> None:
    """Replace ``path`` with ``value`` so that readers see the old or the new bytes, never half."""
    fd, temp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _create_exclusively(path: Path, value: bytes) -> bool:
    """Publish a complete file at ``path`` only if none exists (``link`` fails if it does), so
    two writers cannot both insert and no reader ever sees a partial value."""
    fd, temp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(value)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    _fsync_dir(path.parent)
    return True


def _temp_file(path: Path) -> tuple[int, str]:
    for attempt in range(100):
        temp = path.parent / f".tmp-{os.getpid()}-{time.monotonic_ns()}-{attempt}"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), str(temp)
        except FileExistsError:
            continue
    raise StorageError(f"cannot create a temporary file in {path.parent}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFsKeyValueStorage(KeyValueStorage):
    def __init__(
        self, dir_path: Path, namespace: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise StorageError(f"invalid storage namespace {namespace[:64]!r}")
        self._dir = Path(dir_path) / namespace
        self._clock = clock
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self._dir}: {e.strerror}") from e

    def _path(self, key: str) -> Path:
        return self._dir / key.replace("/", _SLASH)

    def _expiry_path(self, key: str) -> Path:
        return self._dir / f".{key.replace('/', _SLASH)}.expires"

    def _expired(self, key: str) -> bool:
        try:
            expires = float(self._expiry_path(key).read_text())
        except FileNotFoundError:
            return False
        except ValueError:
            return True  # a corrupt expiry is treated as expired: fail closed
        return expires <= self._clock()

    def _read(self, key: str) -> bytes | None:
        try:
            value = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        if self._expired(key):
            self._remove(key)
            return None
        return value

    def _remove(self, key: str) -> None:
        for path in (self._path(key), self._expiry_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _get(self, key: str) -> bytes | None:
        return self._read(key)

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        path = self._path(key)
        if overwrite:
            write_atomically(path, value)
        else:
            if self._read(key) is not None:
                return False
            if not _create_exclusively(path, value):
                return False
        if ttl is not None:
            write_atomically(self._expiry_path(key), str(self._clock() + ttl).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                self._expiry_path(key).unlink()
        return True

    async def _delete(self, key: str) -> bytes | None:
        value = self._read(key)
        self._remove(key)
        return value

    async def _list(self) -> list[str]:
        keys = []
        for entry in os.scandir(self._dir):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            key = entry.name.replace(_SLASH, "/")
            if not self._expired(key):
                keys.append(key)
        return sorted(keys)

"""Key-value storage in one JSON file per namespace, in upstream Trustee's ``LocalJson`` format.

The file ``<file_dir_path>/<namespace>`` holds one JSON object mapping each key to its value in
URL-safe base64 with padding, so a file written by upstream's KBS is read unchanged and the
other way round. For small, single-host deployments that want one readable file per namespace.

Beyond upstream:

- **TTLs.** An entry with a deadline is stored as ``{"value": <base64>, "expires_at": <seconds
  on the injected wall clock>}``; permanent entries stay plain strings (upstream never writes
  expiring entries to this backend, so its files contain none).
- **Atomic, cross-process writes.** Every change rewrites the whole file through
  :func:`write_atomically` (temp file, fsync, rename, directory fsync) while holding an
  exclusive ``flock`` on a ``.<namespace>.lock`` file beside it, so several worker processes
  never lose each other's updates and a crash leaves the old or the new file, never half.
- **Fail closed.** A file that is not a JSON object of such entries is a ``StorageError``
  naming the file; it is never silently replaced by an empty one.

Every operation reads the whole file, so the cost grows with the namespace: use ``LocalFs``,
PostgreSQL or Redis for many keys or busy sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage, validate_namespace
from keybroker.storage.local_fs import make_private_dirs, read_file_sync, write_atomically

DEFAULT_FILE_DIR_PATH = Path("/opt/confidential-containers/storage/local_json")
MAX_FILE_BYTES = 256 * 1024 * 1024

Entry = tuple[bytes, float | None]


class LocalJsonKeyValueStorage(KeyValueStorage):
    def __init__(
        self,
        file_dir_path: Path,
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        validate_namespace(namespace)
        self._dir = Path(file_dir_path)
        self._path = self._dir / namespace
        self._lock_path = self._dir / f".{namespace}.lock"
        self._clock = clock

    # --- file format ---------------------------------------------------------------------

    def _load(self) -> dict[str, Entry]:
        raw = read_file_sync(self._path, what="LocalJson file", max_bytes=MAX_FILE_BYTES)
        if raw is None:
            return {}
        try:
            document = json.loads(raw)
            if not isinstance(document, dict):
                raise TypeError("not a JSON object")
            return {str(key): _decode_entry(item) for key, item in document.items()}
        except (ValueError, TypeError, binascii.Error) as e:
            raise StorageError(
                f"LocalJson file {self._path} is malformed ({e}); it was left untouched"
            ) from None

    def _store(self, entries: dict[str, Entry]) -> None:
        document: dict[str, Any] = {}
        for key, (value, deadline) in entries.items():
            encoded = base64.urlsafe_b64encode(value).decode("ascii")
            document[key] = (
                encoded
                if deadline is None
                else {
                    "value": encoded,
                    "expires_at": deadline,
                }
            )
        write_atomically(self._path, json.dumps(document, sort_keys=True).encode())

    def _live(self, entries: dict[str, Entry], key: str) -> bytes | None:
        entry = entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        return None if deadline is not None and deadline <= self._clock() else value

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        make_private_dirs(self._dir)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # --- operations ----------------------------------------------------------------------

    async def _get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(lambda: self._live(self._load(), key))

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        return await asyncio.to_thread(self._set_sync, key, value, overwrite, ttl)

    def _set_sync(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        with self._locked():
            entries = self._purged(self._load())
            if not overwrite and key in entries:
                return False
            entries[key] = (value, None if ttl is None else self._clock() + ttl)
            self._store(entries)
            return True

    async def _delete(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._delete_sync, key)

    def _delete_sync(self, key: str) -> bytes | None:
        with self._locked():
            entries = self._load()
            if key not in entries:
                return None
            previous = self._live(entries, key)
            del entries[key]
            self._store(self._purged(entries))
            return previous

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        return await asyncio.to_thread(self._compare_and_set_sync, key, expected, new)

    def _compare_and_set_sync(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        with self._locked():  # the flock every writer takes: atomic across workers
            entries = self._purged(self._load())
            if self._live(entries, key) != expected:
                return False
            if new is None:
                entries.pop(key, None)
            else:
                entries[key] = (new, None)
            self._store(entries)
            return True

    async def _list(self) -> list[str]:
        def live_keys() -> list[str]:
            entries = self._load()
            return [key for key in entries if self._live(entries, key) is not None]

        return await asyncio.to_thread(live_keys)

    def _purged(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """``entries`` without the expired ones (dropped whenever the file is rewritten)."""
        now = self._clock()
        return {k: e for k, e in entries.items() if e[1] is None or e[1] > now}


def _decode_entry(item: object) -> Entry:
    if isinstance(item, str):
        return _b64(item), None
    if isinstance(item, dict) and isinstance(item.get("value"), str):
        deadline = item.get("expires_at")
        if not isinstance(deadline, int | float):
            raise TypeError("an expiring entry needs a numeric expires_at")
        return _b64(item["value"]), float(deadline)
    raise TypeError(f"an entry is a base64 string or an object, found {type(item).__name__}")


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)

r"""The "memory" store of a server with several worker processes: one tmpfs directory they share.

``storage_type = "Memory"`` with ``worker_count > 1`` cannot keep values in one process's
memory: a guest's ``/auth`` and ``/attest`` may land on two workers. The server makes a private
0700 directory (in ``/dev/shm`` where there is one, see ``kbs/server.py``) and every worker opens
this store on it. Nothing here has to outlive the server, so nothing is fsync'd, and the layout
is ours (upstream has no such store): one file per key, named as in
:mod:`keybroker.storage.local_fs` (``/`` written ``\x2F``), holding a header line with the
deadline (wall-clock seconds, or ``-`` for none) and then the value.

No lock is taken on the common path. Each operation is a few system calls on one directory
descriptor, cheap enough to run on the event loop (about 20 microseconds on tmpfs, less than
the hop to a thread):

- ``set`` writes a ``.tmp-`` file and moves it into place: ``rename`` to overwrite, ``link`` to
  create only if absent, which the kernel makes atomic, so ``set(overwrite=False)`` has exactly
  one winner across processes.
- ``get`` reads the file; readers always see a whole value.
- ``delete`` renames the file to a ``.gone-`` name first, so exactly one caller gets the value.
- An expired entry reads as missing. It is removed the same way (renamed away, then checked);
  if a writer replaced it in between, the new value is put back. A reader racing that put-back
  may miss the key for the few microseconds it takes.
- A sweep every :data:`SWEEP_MIN_WRITES` writes (or more, with more live entries) removes
  expired entries nobody reads again, and temp files older than :data:`STALE_SECONDS` (a
  crashed writer's). It reads every entry, so it runs in a thread.

``compare_and_set`` is the one locked operation: it holds an exclusive ``flock`` on the
directory (a descriptor of its own, so threads and processes exclude each other) while it reads,
compares and renames, inline on the event loop (tmpfs: microseconds). It is atomic against other
``compare_and_set`` calls, not against a plain ``set`` or ``delete`` of the same key, which take
no lock; keys managed by compare-and-set are only ever changed through it.

Symbolic links are never followed: every file is opened ``O_NOFOLLOW`` relative to the
directory's descriptor, and a planted link is a :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import math
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage, validate_key, validate_namespace
from keybroker.storage.local_fs import (
    SLASH,
    TEMP_PREFIX,
    make_private_dirs,
    read_open_file,
    refuse_symlink,
)

GONE_PREFIX = ".gone-"
SWEEP_MIN_WRITES = 256
STALE_SECONDS = 60.0
NO_DEADLINE = b"-"
_MAX_HEADER = 64
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def _record(value: bytes, deadline: float | None) -> bytes:
    header = NO_DEADLINE if deadline is None else repr(deadline).encode()
    return header + b"\n" + value


class SharedMemoryKeyValueStorage(KeyValueStorage):
    def __init__(
        self, dir_path: Path, namespace: str, clock: Callable[[], float] = time.time
    ) -> None:
        # The clock must be wall time: the workers compare each other's deadlines.
        directory = Path(dir_path) / validate_namespace(namespace)
        refuse_symlink(directory, "a storage namespace directory")
        try:
            make_private_dirs(directory)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {directory}: {e.strerror}") from e
        self._directory = directory
        self._dir_fd: int | None = None
        self._clock = clock
        self._writes_since_sweep = 0
        self._sweep_after = SWEEP_MIN_WRITES
        self._sweeping = False

    @property
    def _fd(self) -> int:
        """The directory's descriptor, opened at first use (again after :meth:`close`)."""
        if self._dir_fd is None:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
            self._dir_fd = os.open(self._directory, flags)
        return self._dir_fd

    # records

    def _read(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StorageError(
                    "a stored value is a symbolic link, which is never followed"
                ) from None
            raise
        return read_open_file(fd, what="stored value")

    def _live_value(self, record: bytes) -> bytes | None:
        """The value of a record whose deadline has not passed; None if expired or corrupt
        (fail closed: a record we cannot read a deadline from is gone)."""
        header, newline, value = record[: _MAX_HEADER + 1].partition(b"\n")
        if not newline:
            return None
        value = record[len(header) + 1 :]
        if header == NO_DEADLINE:
            return value
        try:
            deadline = float(header)
        except ValueError:
            return None
        if not math.isfinite(deadline) or deadline <= self._clock():
            return None
        return value

    def _write_temp(self, record: bytes) -> str:
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=self._fd)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            self._unlink(temp)
            raise
        os.close(fd)
        return temp

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd)

    def _take(self, name: str) -> bytes | None:
        """Move the entry out of sight and return its record: exactly one caller gets it."""
        gone = f"{GONE_PREFIX}{secrets.token_hex(8)}"
        try:
            os.rename(name, gone, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except FileNotFoundError:
            return None
        try:
            return self._read(gone)
        finally:
            self._unlink(gone)  # a planted link goes too: it was in our directory

    def _purge(self, name: str) -> None:
        """Remove an expired entry unless a writer has replaced it since it was read."""
        gone = f"{GONE_PREFIX}{secrets.token_hex(8)}"
        try:
            os.rename(name, gone, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except FileNotFoundError:
            return
        try:
            record = self._read(gone)
        except StorageError:
            record = None  # a planted link or special file: removed below
        if record is not None and self._live_value(record) is not None:
            # Put the newer value back, unless an even newer one is already in place.
            with contextlib.suppress(FileExistsError):
                os.link(gone, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        self._unlink(gone)

    # operations

    async def _get(self, key: str) -> bytes | None:
        name = key.replace("/", SLASH)
        record = self._read(name)
        if record is None:
            return None
        value = self._live_value(record)
        if value is None:
            self._purge(name)
        return value

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        name = key.replace("/", SLASH)
        deadline = None if ttl is None else self._clock() + ttl
        temp = self._write_temp(_record(value, deadline))
        try:
            written = self._place(temp, name, overwrite)
        finally:
            if not overwrite:
                self._unlink(temp)  # link() left it; rename() consumed it
        if written:
            self._writes_since_sweep += 1
            if self._writes_since_sweep >= self._sweep_after and not self._sweeping:
                self._sweeping = True
                try:
                    await asyncio.to_thread(self._sweep)
                finally:
                    self._sweeping = False
        return written

    def _place(self, temp: str, name: str, overwrite: bool) -> bool:
        if overwrite:
            try:
                os.replace(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            except BaseException:
                self._unlink(temp)
                raise
            return True
        for _ in range(3):
            try:
                os.link(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                return True
            except FileExistsError:
                record = self._read(name)
                if record is not None and self._live_value(record) is not None:
                    return False
                self._purge(name)  # expired: gone unless someone just wrote a live one
        return False  # other writers keep winning the name: it exists

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        name = key.replace("/", SLASH)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        lock = os.open(self._directory, flags)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self._read(name)
            current = None if record is None else self._live_value(record)
            if current != expected:
                return False
            if new is None:
                self._take(name)
            else:
                self._place(self._write_temp(_record(new, None)), name, overwrite=True)
            return True
        finally:
            os.close(lock)  # releases the lock

    async def _delete(self, key: str) -> bytes | None:
        record = self._take(key.replace("/", SLASH))
        return None if record is None else self._live_value(record)

    async def _list(self) -> list[str]:
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> list[str]:
        keys = []
        for name in os.listdir(self._fd):
            key = _key_of(name)
            if key is None:
                continue
            try:
                record = self._read(name)
            except StorageError:
                continue  # a link or special file is never a key
            if record is not None and self._live_value(record) is not None:
                keys.append(key)
        return keys

    def _sweep(self) -> None:
        """Drop expired entries and the temp files of crashed writers (in a thread)."""
        entries = 0
        stale_before = time.time() - STALE_SECONDS
        for name in os.listdir(self._fd):
            if name.startswith((TEMP_PREFIX, GONE_PREFIX)):
                with contextlib.suppress(FileNotFoundError):
                    info = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
                    if info.st_mtime < stale_before or not stat.S_ISREG(info.st_mode):
                        self._unlink(name)
                continue
            if _key_of(name) is None:
                continue
            entries += 1
            try:
                record = self._read(name)
            except StorageError:
                continue
            if record is not None and self._live_value(record) is None:
                self._purge(name)
        self._writes_since_sweep = 0
        self._sweep_after = max(SWEEP_MIN_WRITES, entries)

    async def _close(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)


def _key_of(name: str) -> str | None:
    """The key a file name stands for, or None for temp files and strays."""
    try:
        return validate_key(name.replace(SLASH, "/"))
    except StorageError:
        return None

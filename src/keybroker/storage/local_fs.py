r"""Key-value storage on the local filesystem, in upstream Trustee's exact layout.

One file per key at ``<dir_path>/<namespace>/<key>``, every ``/`` of the key written as the four
characters ``\x2F`` (key ``default/key/one`` is the file ``default\x2Fkey\x2Fone``) and the
value stored as raw bytes, so a directory written by upstream's KBS is served unchanged and the
other way round. Names that do not decode to a valid key (upstream's ``#expiry`` index, anything
starting with a dot, stray files) are never listed.

Beyond upstream:

- **Atomic writes.** A value is written to a ``.tmp-<random>`` file in the same directory,
  flushed and fsynced, moved over the key with ``os.replace`` and the directory fsynced: a crash
  leaves the old or the new value, never half of one (at worst an orphaned temp file, which is
  not a key and is removed by the next sweep). Files are 0600, directories 0700.
- **TTLs.** A value with a TTL gets a sidecar ``.<file>.expires`` holding its deadline (seconds
  on the injected wall clock, as text); a value without one is byte-for-byte upstream's.
  Expired entries read as missing, are removed when read, and a sweep after every batch of
  writes removes the ones nobody reads again (abandoned handshakes).
- **No symlinks.** Every file is opened with ``O_NOFOLLOW`` and a namespace directory that is a
  link is refused: a link planted in the store (say ``default\x2Fkey\x2Fhost`` pointing at
  ``/etc/hostname``) is a :class:`StorageError` for reads, writes and deletes, never a way to
  hand a guest a file from outside the store. Links are not listed as keys.
- **Cross-process consistency.** Writers (set, delete, sweep) hold an exclusive ``flock`` on the
  namespace directory, so ``set(overwrite=False)`` has exactly one winner across worker
  processes. Readers take no lock: ``os.replace`` gives them whole values. The deadline is
  written before the value and removed after it, so a reader never sees a new value with an
  older write's deadline; a crash between the two can leave the previous value under the new
  deadline (or none).

Threads: a read runs inline when the value is at most :data:`INLINE_READ_MAX` bytes (about 10
microseconds for a small file, against about 120 for handing it to a worker thread, measured on
the development VM). Larger reads, and every write, delete and listing, run in
``asyncio.to_thread``: an fsync takes 0.5 ms there and can take tens of milliseconds on a busy
disk, which must not stall the event loop.

This module also holds the file primitives the directory-tree secret backend reuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

from keybroker.errors import StorageError
from keybroker.storage.base import KeyValueStorage, validate_key, validate_namespace

log = logging.getLogger(__name__)

DEFAULT_DIR_PATH = Path("/opt/confidential-containers/storage/local_fs")
SLASH = "\\x2F"  # four characters: backslash, x, 2, F (upstream's escape of "/")
TEMP_PREFIX = ".tmp-"
EXPIRY_SUFFIX = ".expires"
INLINE_READ_MAX = 1024 * 1024
SWEEP_MIN_WRITES = 256
# The longest file name common filesystems take (ext4, xfs, btrfs: 255 bytes). A key is one
# file name once its slashes are escaped, and its deadline sidecar adds a dot and a suffix.
NAME_MAX = 255


# --- file primitives --------------------------------------------------------------------------


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each with mode 0700."""
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process was faster
            path.mkdir(mode=0o700)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, value: bytes) -> None:
    """Replace ``path`` with a 0600 file holding ``value``, on disk (fsync'd, directory too)
    before returning; readers see all old or all new."""
    # O_EXCL on a random name: never follows a planted symlink, never shares another writer's
    # temp file. The dot prefix keeps it out of every key listing.
    temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
    fsync_directory(path.parent)


def unlink_if_exists(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def refuse_symlink(path: Path, what: str) -> None:
    """Raise :class:`StorageError` if ``path`` is a symbolic link (it is never followed)."""
    if path.is_symlink():
        raise _symlink_refused(path, what)


def _symlink_refused(path: Path, what: str) -> StorageError:
    # A link planted in the store must not make the KBS read or write a file outside it.
    log.warning("refusing %s at %s: it is a symbolic link, which is never followed", what, path)
    return StorageError(f"{what} is a symbolic link, which is never followed")


def _open_regular(
    path: Path, *, what: str, max_bytes: int | None
) -> tuple[int, os.stat_result] | None:
    """A descriptor open on the regular file at ``path`` (the caller closes it), or None.
    ``O_NOFOLLOW``: a symlink is refused, never followed."""
    # O_NONBLOCK: opening a FIFO planted in the tree would otherwise hang the worker forever.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink_refused(path, what) from None
        raise
    return fd, _check_regular(fd, what, max_bytes)


def _check_regular(fd: int, what: str, max_bytes: int | None) -> os.stat_result:
    """``fd``'s status if it is a regular file within the limit; else close it and raise."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{what} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise StorageError(f"{what} is larger than the limit of {max_bytes} bytes")
    except BaseException:
        os.close(fd)
        raise
    return info


def read_open_file(fd: int, *, what: str, max_bytes: int | None = None) -> bytes:
    """Everything the regular file open on ``fd`` holds; ``fd`` is closed in every case."""
    info = _check_regular(fd, what, max_bytes)
    return _read_limited(fd, info.st_size, what, max_bytes)


def _read_limited(fd: int, size_hint: int, what: str, max_bytes: int | None) -> bytes:
    """Everything ``fd`` holds, then close it (plain reads: no buffered file object)."""
    limit = None if max_bytes is None else max_bytes + 1
    chunks: list[bytes] = []
    total = 0
    try:
        while limit is None or total < limit:
            want = max(size_hint - total, 0) + 1  # one byte more shows the end (or growth)
            chunk = os.read(fd, want if limit is None else min(want, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if max_bytes is not None and total > max_bytes:  # it grew after the size check
        raise StorageError(f"{what} is larger than the limit of {max_bytes} bytes")
    return b"".join(chunks)


def read_file_sync(path: Path, *, what: str, max_bytes: int | None = None) -> bytes | None:
    """The bytes of the regular file at ``path``, or None if there is none."""
    opened = _open_regular(path, what=what, max_bytes=max_bytes)
    if opened is None:
        return None
    fd, info = opened
    return _read_limited(fd, info.st_size, what, max_bytes)


async def read_file(path: Path, *, what: str, max_bytes: int | None = None) -> bytes | None:
    """:func:`read_file_sync` for the event loop: small files inline, large ones in a thread."""
    opened = _open_regular(path, what=what, max_bytes=max_bytes)
    if opened is None:
        return None
    fd, info = opened
    if info.st_size <= INLINE_READ_MAX:
        return _read_limited(fd, info.st_size, what, max_bytes)
    return await asyncio.to_thread(_read_limited, fd, info.st_size, what, max_bytes)


# --- the key-value store ----------------------------------------------------------------------

T = TypeVar("T")


class _Busy:
    """The writer lock is held elsewhere and the caller chose not to wait for it."""


_BUSY = _Busy()


class LocalFsKeyValueStorage(KeyValueStorage):
    def __init__(
        self,
        dir_path: Path = DEFAULT_DIR_PATH,
        namespace: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The clock must be wall time: deadlines outlive the process.
        self._dir = Path(dir_path) / validate_namespace(namespace)
        self._clock = clock
        self._writes_since_sweep = 0
        self._sweep_after = SWEEP_MIN_WRITES
        refuse_symlink(self._dir, "a storage namespace directory")
        try:
            make_private_dirs(self._dir)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self._dir}: {e.strerror}") from e

    # names

    def _file(self, key: str) -> Path:
        return self._dir / key.replace("/", SLASH)

    def _expiry_file(self, key: str) -> Path:
        return self._dir / f".{key.replace('/', SLASH)}{EXPIRY_SUFFIX}"

    def storable(self, key: str) -> bool:
        return self._storable(key)

    def _storable(self, key: str) -> bool:
        """Whether the key's files have names the filesystem takes; a key that does not could
        never have been stored, so reading or deleting it finds nothing (rather than an OS
        error surfacing as a 500 for a client's over-long id)."""
        return len(self._expiry_file(key).name.encode()) <= NAME_MAX

    @staticmethod
    def _key_of(name: str) -> str | None:
        """The key a file name stands for, or None for temp files, sidecars and strays."""
        key = name.replace(SLASH, "/")
        try:
            return validate_key(key)
        except StorageError:
            return None

    # expiry

    def _expired(self, key: str) -> bool:
        text = read_file_sync(self._expiry_file(key), what="a stored deadline", max_bytes=64)
        if text is None:
            return False
        try:
            deadline = float(text)
        except ValueError:
            return True  # a corrupt deadline: fail closed, treat the value as gone
        return not math.isfinite(deadline) or deadline <= self._clock()

    def _remove(self, key: str) -> None:
        # Value first: a reader must never find an expired value without its deadline.
        unlink_if_exists(self._file(key))
        unlink_if_exists(self._expiry_file(key))

    @contextlib.contextmanager
    def _locked(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold the namespace's writer lock (``flock`` on its directory) if it can be had."""
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)  # releases the lock

    # operations

    async def _get(self, key: str, *, may_expire: bool = True) -> bytes | None:
        if not self._storable(key):
            return None
        value = await read_file(self._file(key), what="stored value")
        if value is None or not may_expire or not self._expired(key):
            return value
        # Purge only if no writer is busy, and only if the entry is still expired under the
        # lock (a writer may have replaced it since): a reader never waits on an fsync.
        with self._locked(wait=False) as locked:
            if locked and self._expired(key):
                self._remove(key)
        return None

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        """One directory listing first: a policy asks for dozens of reference values of which
        a few exist, and a failed open costs as much as a read. A value listed without a
        deadline sidecar was permanent when listed; a deadline written since belongs to a
        newer value, which is live."""
        try:
            names = set(os.listdir(self._dir))
        except FileNotFoundError:
            return {}
        found: dict[str, bytes] = {}
        for key in keys:
            name = key.replace("/", SLASH)
            if name not in names:
                continue
            may_expire = f".{name}{EXPIRY_SUFFIX}" in names
            value = await self._get(key, may_expire=may_expire)
            if value is not None:
                found[key] = value
        return found

    async def _write(self, operation: Callable[[bool], T | _Busy]) -> T:
        """Run ``operation(wait=True)`` under the writer lock, in a thread: it fsyncs."""
        result = await asyncio.to_thread(operation, True)
        if isinstance(result, _Busy):  # a caller that waits always gets the lock
            raise StorageError("the storage writer lock could not be taken")
        return result

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        return await self._write(partial(self._set_locked, key, value, overwrite, ttl))

    def _set_locked(
        self,
        key: str,
        value: bytes,
        overwrite: bool,
        ttl: float | None,
        wait: bool,
    ) -> bool | _Busy:
        if not self._storable(key):
            raise StorageError(
                f"key {key[:64]!r} is too long for LocalFs: its file names would pass "
                f"{NAME_MAX} bytes once every / is escaped"
            )
        file = self._file(key)
        with self._locked(wait=wait) as locked:
            if not locked:
                return _BUSY
            refuse_symlink(file, "a stored value")  # os.replace would not follow it, but
            refuse_symlink(self._expiry_file(key), "a stored deadline")  # fail closed anyway
            exists = file.exists()
            if exists and self._expired(key):
                self._remove(key)
                exists = False
            if exists and not overwrite:
                return False
            # The deadline goes first, so no reader pairs the new value with an old deadline.
            if ttl is None:
                unlink_if_exists(self._expiry_file(key))
            else:
                deadline = repr(self._clock() + ttl).encode()
                write_atomically(self._expiry_file(key), deadline)
            write_atomically(file, value)
            self._writes_since_sweep += 1
            if self._writes_since_sweep >= self._sweep_after:
                self._sweep()
        return True

    async def _delete(self, key: str) -> bytes | None:
        return await self._write(partial(self._delete_locked, key))

    def _delete_locked(self, key: str, wait: bool) -> bytes | _Busy | None:
        if not self._storable(key):
            return None
        with self._locked(wait=wait) as locked:
            if not locked:
                return _BUSY
            value = read_file_sync(self._file(key), what="stored value")
            if value is None:
                unlink_if_exists(self._expiry_file(key))  # an orphan a crash left behind
                return None
            live = not self._expired(key)
            self._remove(key)
        fsync_directory(self._dir)  # a deleted secret must not come back after a power cut
        return value if live else None

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        return await self._write(partial(self._compare_and_set_locked, key, expected, new))

    def _compare_and_set_locked(
        self, key: str, expected: bytes | None, new: bytes | None, wait: bool
    ) -> bool | _Busy:
        """Under the writer lock every writer of the namespace takes: atomic across workers."""
        if not self._storable(key):
            raise StorageError(f"key {key[:64]!r} is too long for LocalFs")
        file = self._file(key)
        with self._locked(wait=wait) as locked:
            if not locked:
                return _BUSY
            refuse_symlink(file, "a stored value")
            current = read_file_sync(file, what="stored value")
            if current is not None and self._expired(key):
                self._remove(key)
                current = None
            if current != expected:
                return False
            if new is None:
                self._remove(key)
            else:
                unlink_if_exists(self._expiry_file(key))  # compare-and-set values are permanent
                write_atomically(file, new)
        if new is None:
            fsync_directory(self._dir)
        return True

    async def _list(self) -> list[str]:
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> list[str]:
        keys: list[str] = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                key = self._key_of(entry.name)
                if (
                    key is not None
                    and entry.is_file(follow_symlinks=False)  # a link is never a key
                    and not self._expired(key)
                ):
                    keys.append(key)
        return keys

    def _sweep(self) -> None:
        """Under the writer lock: drop expired entries and orphaned temp files."""
        deadlines = 0
        with os.scandir(self._dir) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(".")]
        for name in names:
            if name.startswith(TEMP_PREFIX):
                # Every writer holds the lock while its temp file exists: this one is a crash's.
                unlink_if_exists(self._dir / name)
            elif name.endswith(EXPIRY_SUFFIX):
                deadlines += 1
                key = self._key_of(name[1 : -len(EXPIRY_SUFFIX)])
                if key is not None and self._expired(key):
                    self._remove(key)
        self._writes_since_sweep = 0
        self._sweep_after = max(SWEEP_MIN_WRITES, deadlines)

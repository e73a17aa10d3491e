"""The one collateral fetcher: how every verifier's collateral (certificates, CRLs, TCB documents)
is fetched over HTTPS, read from an offline directory, and cached. Verifier-specific fetchers
(Intel PCS/PCCS in ``intel/dcap_fetcher.py``, AMD KDS in ``amd/snp_fetcher.py``) only build
URLs and file names and interpret what comes back; everything below is shared.

A fetcher is trusted for availability and freshness, never for integrity: verifiers check every
signature, chain and date of what they are handed. What a fetcher can still get wrong is serving
old but validly signed collateral (a CRL from before a revocation, until its ``nextUpdate``),
which is why plain HTTP is refused unless ``insecure_http`` is set, and why an expired item is
fetched again, never served.

::

    HttpsSource         one service: HTTPS only (unless insecure_http), a total deadline per
                        request, a response size cap; ``get`` (200 only) and ``send`` (any
                        method, JSON or bytes body, any status); failure -> ServiceUnavailableError
    OfflineDirectory    files prepared offline: names checked, size capped; a missing file ->
                        ServiceUnavailableError naming it (never a network fallback of its own)
    CollateralCache     get(key, fetch, keeping): memory (LRU, bounded in entries and bytes),
                        then an optional directory (0600 files replaced atomically, LRU, bounded),
                        then ``fetch``; concurrent callers of one key share one fetch
    Keeping             how one kind of item is kept: encode/decode to bytes (a file that does
                        not decode is ignored and fetched again) and when it expires

Expiry is per item: ``Keeping.expires`` reads it from the item (a CRL's or TCB Info's
``nextUpdate``; ``FOREVER`` for a certificate keyed by what it certifies); ``max_age`` caps it
from the moment the item was fetched (a file's mtime after a restart). An item with no expiry,
or one already past, is returned to its caller but kept nowhere.

Single-flight is per process and per key: the verifiers run in worker threads
(``asyncio.to_thread``), so the followers of a fetch block on a ``threading.Event`` for at most
``wait_limit`` seconds and get the leader's item or a ServiceUnavailableError. Worker processes
share the cache directory but not their fetches.

A new user (a Hygon KDS client, NVIDIA's RIM service, ...) builds an ``HttpsSource`` for the
service, an ``OfflineDirectory`` for air-gapped deployments and one ``CollateralCache`` with a
``Keeping`` per item kind, then writes ``get(key, lambda: source.get(path).body, keeping)``.
A client of a service that appraises evidence (NVIDIA's NRAS, Veraison) talks to it through
``send`` and judges the status itself.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import httpx

from keybroker.errors import ConfigError, KeybrokerError, ServiceUnavailableError
from keybroker.storage.local_fs import TEMP_PREFIX, write_atomically

logger = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], datetime.datetime]
FOREVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)
# a cache key is a file name, and an offline name a relative path of such names: built by code
# from validated fields, checked anyway so no request can name a file outside the directory
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@contextlib.contextmanager
def unavailable_unless_fetched(what: str) -> Iterator[None]:
    """Any failure inside is the collateral service's, never the evidence's: a
    ServiceUnavailableError (503) saying ``what`` could not be fetched and why."""
    try:
        yield
    except ServiceUnavailableError as e:
        if what in e.detail:  # said by an inner fetcher already
            raise
        raise ServiceUnavailableError(f"{what} could not be fetched: {e.detail}") from e
    except Exception as e:
        raise ServiceUnavailableError(f"{what} could not be fetched: {e}") from e


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a file, refused when larger than ``limit``; FileNotFoundError when there is
    none."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ServiceUnavailableError(f"{path} is larger than {limit} bytes")
    return data


# --- HTTPS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: httpx.Headers
    url: str  # where it came from (redirects are not followed, so the URL asked)


class _DeadlineError(Exception):
    """The total deadline passed while the answer was still arriving."""


class HttpsSource:
    """One service at ``base_url``. ``get`` and ``send`` take a path under it (``/…``) or an
    absolute URL (held to the same scheme rule) and read an answer within ``timeout`` seconds
    in total and no larger than ``max_bytes``; ``get`` answers only a 200, ``send`` any status
    for its caller to judge."""

    def __init__(
        self,
        base_url: str,
        *,
        service: str,
        max_bytes: int,
        timeout: float = 10.0,
        ca_pem: bytes | None = None,
        client: httpx.Client | None = None,
        insecure_http: bool = False,
    ) -> None:
        """``service``: what to call it in errors and logs (e.g. "the AMD KDS"). ``ca_pem``: the
        CA of the service's TLS certificate, when not a public one."""
        self.base = base_url.rstrip("/")
        self._service, self._max_bytes, self._timeout = service, max_bytes, timeout
        self._insecure_http = insecure_http
        self.check_url(self.base)
        verify: ssl.SSLContext | bool = True
        if ca_pem is not None:
            verify = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        self._client = client or httpx.Client(timeout=timeout, verify=verify)

    def check_url(self, url: str) -> None:
        """ConfigError unless ``url`` is HTTPS (or HTTP, when insecure_http is set)."""
        scheme = httpx.URL(url).scheme
        if scheme != "https" and not (scheme == "http" and self._insecure_http):
            raise ConfigError(
                f"{self._service} {url!r} is not HTTPS (set insecure_http to allow plain HTTP, "
                "which lets anyone on the path replay or change what it answers)"
            )

    def close(self) -> None:
        self._client.close()

    def get(self, path_or_url: str, params: list[tuple[str, str]] | None = None) -> HttpAnswer:
        """A 200 answer; any other status, or any failure, is a ServiceUnavailableError."""
        return self._exchange("GET", path_or_url, {"params": tuple(params or ())}, only_200=True)

    def send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: dict[str, str] | None = None,
        json: object = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpAnswer:
        """The answer to ``method`` with a JSON or bytes body, whatever its status (a 4xx may be
        the service refusing what it was sent); an unreachable, slow or oversized answer is a
        ServiceUnavailableError."""
        request = {"params": params, "json": json, "content": content, "headers": headers}
        return self._exchange(method, path_or_url, request, only_200=False)

    def _exchange(
        self, method: str, path_or_url: str, request: dict[str, Any], *, only_200: bool
    ) -> HttpAnswer:
        url = self.base + path_or_url if path_or_url.startswith("/") else path_or_url
        self.check_url(url)
        if httpx.URL(url).scheme == "http":
            logger.warning("INSECURE: %s reached over plain HTTP at %s", self._service, url)
        try:
            return self._read(method, url, request, only_200)
        except (httpx.HTTPError, _DeadlineError) as e:
            reason = str(e) or type(e).__name__
            if only_200:  # a collateral item
                raise ServiceUnavailableError(f"{url} could not be fetched: {reason}") from e
            raise ServiceUnavailableError(
                f"{self._service} {url} cannot be reached: {reason}"
            ) from e

    def _read(self, method: str, url: str, request: dict[str, Any], only_200: bool) -> HttpAnswer:
        # httpx's timeout bounds each network operation (connect, send, each read); the deadline
        # bounds the whole answer, so a service that drips a byte per read still fails soon
        deadline = time.monotonic() + self._timeout
        with self._client.stream(method, url, **request) as response:
            if only_200 and response.status_code != 200:
                raise ServiceUnavailableError(f"{url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    raise ServiceUnavailableError(f"{url} sent more than {self._max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _DeadlineError(f"no full answer within {self._timeout} s")
            return HttpAnswer(
                response.status_code, bytes(body), response.headers, str(response.url)
            )


# --- offline ------------------------------------------------------------------------------------


class OfflineDirectory:
    """Collateral files prepared offline (air-gapped deployments). A file is read only by a
    relative name of checked segments, and only up to ``max_bytes``."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory, self._max_bytes = directory, max_bytes

    def _path(self, relative: str) -> Path:
        parts = relative.split("/")
        if not all(_NAME.fullmatch(part) for part in parts):
            raise ServiceUnavailableError(f"refusing the offline collateral name {relative!r}")
        return self.directory.joinpath(*parts)

    def read(self, relative: str) -> bytes:
        """The file at ``relative``; ServiceUnavailableError when it is missing or too large."""
        found = self.read_if_present(relative)
        if found is None:
            raise ServiceUnavailableError(
                f"No such file in the offline collateral directory: {self._path(relative)}"
            )
        return found

    def read_if_present(self, relative: str) -> bytes | None:
        path = self._path(relative)
        try:
            return read_bounded(path, self._max_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise ServiceUnavailableError(f"cannot read {path}: {e.strerror}") from e


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keeping(Generic[T]):
    """How one kind of item is kept: its bytes on disk, and until when it may be served.
    ``decode`` raises (anything) on bytes that are not such an item; ``expires`` gives None
    when the item must not be kept at all."""

    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]
    expires: Callable[[T], datetime.datetime | None]


def keep_bytes(expires: Callable[[bytes], datetime.datetime | None]) -> Keeping[bytes]:
    """Items kept as the bytes the service sent."""
    return Keeping(encode=bytes, decode=bytes, expires=expires)


@dataclass(frozen=True)
class CacheLimits:
    """Bounds of the memory and disk caches (least recently used entries go first) and of one
    item; the defaults hold thousands of typical items (a few kB each)."""

    memory_entries: int = 1024
    memory_bytes: int = 64 * 1024 * 1024
    disk_entries: int = 8192
    disk_bytes: int = 512 * 1024 * 1024
    item_bytes: int = 16 * 1024 * 1024
    max_age: datetime.timedelta | None = None  # None: as long as the item itself says
    wait_limit: float = 60.0  # how long a caller waits for another caller's fetch of its key


@dataclass
class _Held:
    value: object
    until: datetime.datetime
    size: int


class _Memory:
    """A least-recently-used map bounded in entries and bytes; callers hold the lock."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._items: OrderedDict[str, _Held] = OrderedDict()
        self._max_entries, self._max_bytes, self._bytes = max_entries, max_bytes, 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, now: datetime.datetime) -> _Held | None:
        held = self._items.get(key)
        if held is None:
            return None
        if now >= held.until:
            self.pop(key)
            return None
        self._items.move_to_end(key)
        return held

    def pop(self, key: str) -> None:
        held = self._items.pop(key, None)
        if held is not None:
            self._bytes -= held.size

    def put(self, key: str, held: _Held) -> None:
        self.pop(key)
        if held.size > self._max_bytes or self._max_entries < 1:
            return
        self._items[key] = held
        self._bytes += held.size
        while len(self._items) > self._max_entries or self._bytes > self._max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.size


class _Disk:
    """One 0600 file per key in a 0700 directory, replaced atomically (a reader never sees half
    a file); bounded in files and bytes by removing the least recently used after each store
    (recency: this process's last use, else the file's mtime)."""

    def __init__(self, directory: Path, limits: CacheLimits) -> None:
        self.directory, self._limits = directory, limits
        self._used: dict[str, float] = {}  # wall-clock time of this process's last use
        self._lock = threading.Lock()

    def load(self, key: str) -> tuple[bytes, datetime.datetime] | None:
        """The file's bytes and mtime, or None when there is no usable file."""
        path = self.directory / key
        try:
            # O_NOFOLLOW: a symlink planted in the cache directory is not followed elsewhere
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                data = file.read(self._limits.item_bytes + 1)
                mtime = os.fstat(file.fileno()).st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:  # an unreadable cache file is a miss, not an outage
            logger.warning("ignoring unreadable collateral cache file %s: %s", path, e)
            return None
        if not 0 < len(data) <= self._limits.item_bytes:
            logger.warning("ignoring collateral cache file %s of %d bytes", path, len(data))
            return None
        with self._lock:
            self._used[key] = time.time()
        return data, datetime.datetime.fromtimestamp(mtime, datetime.UTC)

    def store(self, key: str, data: bytes) -> None:
        if len(data) > min(self._limits.disk_bytes, self._limits.item_bytes):
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self.directory / key, data)
            with self._lock:
                self._used[key] = time.time()
            self._prune()
        except OSError as e:  # the item is still served; only the next process refetches it
            logger.warning("cannot keep collateral in %s: %s", self.directory, e)

    def _prune(self) -> None:
        files: list[tuple[float, str, int]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith((".", TEMP_PREFIX)) or not entry.is_file():
                    continue
                with contextlib.suppress(FileNotFoundError):  # another process pruned it
                    stat = entry.stat()
                    files.append((stat.st_mtime, entry.name, stat.st_size))
        with self._lock:
            present = {name for _, name, _ in files}
            self._used = {k: v for k, v in self._used.items() if k in present}
            files = sorted((max(m, self._used.get(n, m)), n, s) for m, n, s in files)
        total = sum(size for _, _, size in files)
        count = len(files)
        for _, name, size in files:
            if count <= self._limits.disk_entries and total <= self._limits.disk_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
            with self._lock:
                self._used.pop(name, None)
            count, total = count - 1, total - size


class _Flight:
    """One fetch in progress, awaited by the callers that came after its leader."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.followers = 0
        self.value: object = None
        self.error: BaseException | None = None


class CollateralCache:
    """Items by key: from memory, else from ``directory`` (when given), else fetched; kept until
    their expiry. Thread-safe; concurrent ``get``s of one key share one fetch."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        limits: CacheLimits | None = None,
        clock: Clock = _utc_now,
    ) -> None:
        self.limits = limits or CacheLimits()
        self._clock = clock
        self._memory = _Memory(self.limits.memory_entries, self.limits.memory_bytes)
        self._disk = _Disk(directory, self.limits) if directory is not None else None
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}

    def held(self) -> int:
        """How many items the memory cache holds."""
        with self._lock:
            return len(self._memory)

    def waiting(self, key: str) -> int:
        """How many callers wait for the fetch of ``key`` in progress (besides its leader)."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.followers if flight is not None else 0

    def get(self, key: str, fetch: Callable[[], T], keeping: Keeping[T]) -> T:
        if not _NAME.fullmatch(key):
            raise ServiceUnavailableError(f"refusing the collateral cache key {key!r}")
        with self._lock:
            held = self._memory.get(key, self._clock())
            if held is not None:
                return cast(T, held.value)
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.followers += 1
        if not leader:
            return cast(T, self._follow(key, flight))
        try:
            value = self._load_or_fetch(key, fetch, keeping)
            flight.value = value
            return value
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _follow(self, key: str, flight: _Flight) -> object:
        if not flight.done.wait(self.limits.wait_limit):
            raise ServiceUnavailableError(
                f"{key} was not fetched within {self.limits.wait_limit} s"
            )
        if flight.error is not None:
            detail = flight.error.detail if isinstance(flight.error, KeybrokerError) else None
            raise ServiceUnavailableError(detail or f"{key} could not be fetched") from flight.error
        return flight.value

    def _until(
        self, keeping: Keeping[T], value: T, fetched: datetime.datetime
    ) -> datetime.datetime | None:
        until = keeping.expires(value)
        if until is not None and self.limits.max_age is not None:
            until = min(until, fetched + self.limits.max_age)
        return until

    def _load_or_fetch(self, key: str, fetch: Callable[[], T], keeping: Keeping[T]) -> T:
        now = self._clock()
        if self._disk is not None:
            stored = self._disk.load(key)
            if stored is not None:
                try:
                    value = keeping.decode(stored[0])
                    until = self._until(keeping, value, stored[1])
                except Exception as e:  # a damaged file is a miss, never trusted
                    logger.warning("ignoring damaged collateral cache file %s: %s", key, e)
                else:
                    if until is not None and now < until:
                        self._hold(key, value, until, len(stored[0]))
                        return value
        value = fetch()
        until = self._until(keeping, value, now)
        if until is None or now >= until:
            return value  # nothing to keep: the verifier judges it, the next caller refetches
        data = keeping.encode(value)
        if self._disk is not None:
            self._disk.store(key, data)
        self._hold(key, value, until, len(data))
        return value

    def _hold(self, key: str, value: object, until: datetime.datetime, size: int) -> None:
        with self._lock:
            self._memory.put(key, _Held(value, until, size))

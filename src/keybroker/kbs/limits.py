"""Limits on the unauthenticated handshake: a rate limit per client on ``/auth`` and
``/attest``, and a cap on live sessions that have not attested.

Threat: anyone who can reach the KBS may call ``/auth`` without credentials, and each call
stores a session (with ``LocalFs`` sessions, an fsync'd file). A flood from one client is
answered 429 with ``Retry-After`` once its token bucket is empty; a flood from many clients
cannot hold more than ``max_unattested_sessions`` sessions that have not attested, because
each new one sheds the oldest.

The client is the direct peer's address. ``X-Forwarded-For`` is believed only when the direct
peer is one of ``trusted_proxies``; it is then read from the right, skipping trusted proxies,
so a client cannot pick its own bucket by writing the header itself. IPv6 clients are counted
per prefix (``ipv6_prefix_length``, a /64 by default), since one host usually holds a whole
/64 and could otherwise use a fresh address per request.

Where the state lives (and so what is shared):

- sessions in Redis: the buckets (namespace ``kbs_rate_limit``) and the index of unattested
  sessions (``kbs_unattested_sessions``) are in that Redis, updated by Lua scripts, so every
  worker and every replica using it shares one limit per client and one cap;
- otherwise, when the server shares a private directory with its workers (every
  ``worker_count > 1``, see ``kbs.server``): the buckets are a fixed table in a file there
  (:class:`SharedFileBuckets`), shared by the workers; the index is per worker;
- otherwise (one worker) both are in this process's memory.

A per-worker index lets up to N times the cap of sessions be live; each process sheds the
oldest of the sessions it opened, from the shared session store.

This module decides; it does no HTTP. ``kbs.app`` calls :meth:`GuestLimits.admit` before it
reads a handshake body, and ``kbs.sessions`` registers and sheds sessions through
:class:`UnattestedSessions`.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import math
import mmap
import os
import secrets
import struct
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from keybroker.config import RateLimitConfig
from keybroker.errors import TooManyRequestsError
from keybroker.storage.local_fs import make_private_dirs

log = logging.getLogger(__name__)

RATE_LIMIT_NAMESPACE = "kbs_rate_limit"
UNATTESTED_NAMESPACE = "kbs_unattested_sessions"
# Bounds on what a client controls: how many buckets one process keeps (the least recently
# seen are dropped first: a dropped bucket is a full one again) and how many hops of
# X-Forwarded-For are read.
MAX_TRACKED_CLIENTS = 100_000
MAX_FORWARDED_HOPS = 32

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@runtime_checkable
class ScriptStore(Protocol):
    """A store that runs a Lua script atomically on its own keys (``RedisKeyValueStorage``)."""

    async def run_script(self, script: str, keys: list[str], args: list[str]) -> Any: ...


# --- who is the client ------------------------------------------------------------------------


def client_key(
    peer: str | None,
    forwarded_for: Sequence[str],
    *,
    trusted_proxies: Sequence[Network],
    ipv6_prefix_length: int = 64,
) -> str:
    """The name of the bucket a request is counted in.

    ``peer`` is the direct peer's address; ``forwarded_for`` the ``X-Forwarded-For`` header
    values, believed only when ``peer`` is in ``trusted_proxies``."""
    address = _address(peer)
    if address is None:  # not an IP (a Unix socket, a test client): one bucket per name
        return f"host:{(peer or 'unknown')[:64]}"
    if _within(address, trusted_proxies):
        address = _forwarded_client(address, forwarded_for, trusted_proxies)
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, ipv6_prefix_length), strict=False)
        return f"ip:{network}"
    return f"ip:{address}"


def _forwarded_client(
    proxy: Address, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> Address:
    """The first untrusted hop from the right. A hop that is not an address stops the walk at
    the last trusted hop, so garbage in the header never buys a fresh bucket."""
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    client = proxy
    for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
        address = _address(hop)
        if address is None:
            break
        client = address
        if not _within(address, trusted):
            break
    return client


def _address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


# --- token buckets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated: float


def spend(bucket: Bucket | None, now: float, rate: float, burst: int) -> tuple[Bucket, float]:
    """Refill ``bucket`` (None: a new, full one) up to ``now`` and take one token.
    Returns the new bucket and 0.0, or the unchanged bucket and the seconds until a token."""
    tokens, updated = (float(burst), now) if bucket is None else (bucket.tokens, bucket.updated)
    if now > updated:  # a clock that went back refills nothing
        tokens, updated = min(float(burst), tokens + (now - updated) * rate), now
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, updated), 0.0
    return Bucket(tokens, updated), (1.0 - tokens) / rate


class Buckets(ABC):
    @abstractmethod
    async def take(self, client: str, now: float) -> float:
        """Take a token from ``client``'s bucket: 0.0, or the seconds to wait for one."""

    def close(self) -> None:  # noqa: B027 - most buckets hold nothing open
        """Release what the buckets hold open (nothing by default)."""


class LocalBuckets(Buckets):
    """Buckets in this process's memory, at most ``max_clients`` of them."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self._rate, self._burst, self._max = rate, burst, max_clients
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    @property
    def tracked_clients(self) -> int:
        return len(self._buckets)

    async def take(self, client: str, now: float) -> float:
        # No await from read to write: atomic on the event loop.
        bucket, wait = spend(self._buckets.pop(client, None), now, self._rate, self._burst)
        self._buckets[client] = bucket
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


SHARED_SLOTS = 65_536
SHARED_PROBES = 8
_MAGIC = b"kbs-rate-limit-1"
_KEY_BYTES = 32
_HEADER_BYTES = len(_MAGIC) + _KEY_BYTES
_DIGEST = 16
_EMPTY = bytes(_DIGEST)
_SLOT = struct.Struct(f"<{_DIGEST}sdd")
SHARED_TABLE_NAME = ".rate-limit-buckets"


class SharedFileBuckets(Buckets):
    """Buckets in a table shared by the worker processes of one server: a file of fixed size
    in the server's private "memory" directory (``kbs.server``), mapped into each worker and
    changed under an exclusive ``flock``.

    The table has :data:`SHARED_SLOTS` slots; a client's slot is found by a keyed hash (the key
    is random, in the file's header) and up to :data:`SHARED_PROBES` neighbours. When all are
    taken by others, the least recently updated one is reused: that client starts again with
    a full bucket, as a client the table never saw. The lock is held for a few microseconds
    and the file is in memory, so this runs on the event loop (as the memory store's writes do).
    """

    def __init__(self, path: Path, rate: float, burst: int, *, slots: int = SHARED_SLOTS) -> None:
        self._rate, self._burst, self._slots = rate, burst, slots
        size = _HEADER_BYTES + slots * _SLOT.size
        make_private_dirs(path.parent)  # the workers' directory exists once a store wrote there
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with _locked(fd):
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._table = mmap.mmap(fd, size)
                if self._table[: len(_MAGIC)] != _MAGIC:  # the first worker here: a fresh key
                    self._table[:_HEADER_BYTES] = _MAGIC + secrets.token_bytes(_KEY_BYTES)
        finally:
            os.close(fd)
        self._lock_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._key = bytes(self._table[len(_MAGIC) : _HEADER_BYTES])

    async def take(self, client: str, now: float) -> float:
        digest = hashlib.blake2b(client.encode(), key=self._key, digest_size=_DIGEST).digest()
        start = int.from_bytes(digest[:8], "big") % self._slots
        with _locked(self._lock_fd):
            offset, bucket = self._find(digest, start)
            bucket, wait = spend(bucket, now, self._rate, self._burst)
            _SLOT.pack_into(self._table, offset, digest, bucket.tokens, bucket.updated)
        return wait

    def _find(self, digest: bytes, start: int) -> tuple[int, Bucket | None]:
        """The offset of ``digest``'s slot and its bucket, or of the slot to reuse and None."""
        reuse, oldest = -1, math.inf
        for probe in range(SHARED_PROBES):
            offset = _HEADER_BYTES + ((start + probe) % self._slots) * _SLOT.size
            owner, tokens, updated = _SLOT.unpack_from(self._table, offset)
            if owner == digest:
                return offset, Bucket(tokens, updated)
            age = -math.inf if owner == _EMPTY else updated
            if age < oldest:
                reuse, oldest = offset, age
        return reuse, None

    def close(self) -> None:
        if not self._table.closed:
            self._table.close()
            os.close(self._lock_fd)


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# KEYS[1] = bucket; ARGV = now, rate, burst, expiry in ms. The arithmetic of ``spend``.
_TAKE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local found = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens, updated = tonumber(found[1]), tonumber(found[2])
if tokens == nil or updated == nil then tokens, updated = burst, now end
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate)
  updated = now
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
local function exact(x) return string.format('%.17g', x) end
redis.call('HSET', KEYS[1], 't', exact(tokens), 'u', exact(updated))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return exact(wait)
"""


class RedisBuckets(Buckets):
    """Buckets in Redis, shared by every worker and replica using it. A bucket expires once it
    would have refilled (plus a minute), so idle clients cost nothing."""

    def __init__(self, store: ScriptStore, rate: float, burst: int) -> None:
        self._store, self._rate, self._burst = store, rate, burst
        self._expire_ms = math.ceil(burst / rate * 1000) + 60_000

    async def take(self, client: str, now: float) -> float:
        args = [repr(now), repr(self._rate), str(self._burst), str(self._expire_ms)]
        wait = await self._store.run_script(_TAKE, [client], args)
        return float(wait)


# --- the unattested-session cap ---------------------------------------------------------------


class UnattestedSessions(ABC):
    """The ids of sessions opened and not yet attested, oldest first, at most ``cap``.

    An entry leaves when its session's attestation is claimed, or when it is shed. A session
    that expired unattested stays until it is the oldest and is shed (deleting it is then a
    no-op), so the number of *live* unattested sessions never exceeds the cap."""

    @abstractmethod
    async def add(self, session_id: str) -> list[str]:
        """Register a new session; return the ids of the oldest ones shed to stay in the cap."""

    @abstractmethod
    async def remove(self, session_id: str) -> None: ...


class LocalUnattested(UnattestedSessions):
    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._ids: OrderedDict[str, None] = OrderedDict()

    async def add(self, session_id: str) -> list[str]:
        self._ids[session_id] = None
        shed = []
        while len(self._ids) > self._cap:
            shed.append(self._ids.popitem(last=False)[0])
        return shed

    async def remove(self, session_id: str) -> None:
        self._ids.pop(session_id, None)


# KEYS[1] = index (sorted set by order of arrival), KEYS[2] = arrival counter;
# ARGV = session id, cap, expiry in ms. Returns the ids shed.
_ADD = """
local order = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], order, ARGV[1])
local shed = {}
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], excess)
  for i = 1, #popped, 2 do shed[#shed + 1] = popped[i] end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return shed
"""
_REMOVE = "return redis.call('ZREM', KEYS[1], ARGV[1])"


class RedisUnattested(UnattestedSessions):
    """The index in Redis, shared by every replica: one cap for them all. It expires with
    the sessions it names when no new one is opened for a session lifetime."""

    def __init__(self, store: ScriptStore, cap: int, session_lifetime: float) -> None:
        self._store, self._cap = store, cap
        self._expire_ms = math.ceil(session_lifetime * 1000) + 60_000

    async def add(self, session_id: str) -> list[str]:
        args = [session_id, str(self._cap), str(self._expire_ms)]
        shed = await self._store.run_script(_ADD, ["index", "order"], args)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in shed]

    async def remove(self, session_id: str) -> None:
        await self._store.run_script(_REMOVE, ["index"], [session_id])


# --- admission --------------------------------------------------------------------------------


class GuestLimits:
    """Admission to the handshake endpoints; a no-op when ``[rate_limit] enabled = false``."""

    def __init__(
        self, config: RateLimitConfig, buckets: Buckets, clock: Callable[[], float]
    ) -> None:
        self._config, self._buckets, self._clock = config, buckets, clock

    async def admit(self, peer: str | None, forwarded_for: Sequence[str]) -> None:
        """Raise ``TooManyRequestsError`` if the request's client is over its limit."""
        if not self._config.enabled:
            return
        client = client_key(
            peer,
            forwarded_for,
            trusted_proxies=self._config.trusted_proxies,
            ipv6_prefix_length=self._config.ipv6_prefix_length,
        )
        wait = await self._buckets.take(client, self._clock())
        if wait > 0:
            retry_after = math.ceil(wait)
            raise TooManyRequestsError(
                f"too many handshake requests from {client}: at most "
                f"{self._config.requests_per_second:g} per second (bursts of "
                f"{self._config.burst}); retry in {retry_after} s",
                retry_after=retry_after,
            )

    def close(self) -> None:
        self._buckets.close()


def build_limits(
    config: RateLimitConfig,
    *,
    clock: Callable[[], float],
    session_lifetime: float,
    buckets_store: object | None = None,
    index_store: object | None = None,
    workers_dir: Path | None = None,
) -> tuple[GuestLimits, UnattestedSessions]:
    """The limits of one process: in Redis when given its stores (sessions in Redis); else
    the buckets in ``workers_dir`` (the directory the server shares with its workers) when
    there is one, and the rest in this process's memory."""
    rate, burst = config.requests_per_second, config.burst
    if isinstance(buckets_store, ScriptStore) and isinstance(index_store, ScriptStore):
        buckets: Buckets = RedisBuckets(buckets_store, rate, burst)
        index: UnattestedSessions = RedisUnattested(
            index_store, config.max_unattested_sessions, session_lifetime
        )
        where = "shared by every process using this Redis"
    elif workers_dir is not None:
        buckets = SharedFileBuckets(workers_dir / SHARED_TABLE_NAME, rate, burst)
        index = LocalUnattested(config.max_unattested_sessions)
        where = "rate shared by the workers, session cap per worker"
    else:
        buckets = LocalBuckets(rate, burst)
        index = LocalUnattested(config.max_unattested_sessions)
        where = "per process"
    summary = (
        f"{rate:g} requests/s per client, bursts of {burst}" if config.enabled else "no rate limit"
    )
    if any(network.prefixlen == 0 for network in config.trusted_proxies):
        # Every peer may then name its own client address: the per-client limit is void.
        log.warning(
            "[rate_limit] trusted_proxies lists a whole address family: any client can set "
            "X-Forwarded-For to choose its own rate-limit bucket; list only your proxies"
        )
    log.info(
        "handshake limits (%s): %s; at most %d unattested sessions",
        where,
        summary,
        config.max_unattested_sessions,
    )
    return GuestLimits(config, buckets, clock), index

"""Loopback ports for the servers tests start (kbs, grpc-as, nginx, redis-server, proxies).

A port from ``bind(0)`` is free when asked for, not when the server binds it a moment later:
another pytest-xdist worker, or the source port of any outgoing connection, may take it
meanwhile. So each worker draws from its own block of ports below the kernel's ephemeral range
(which outgoing connections never use), in turn, skipping any that something else holds.
"""

from __future__ import annotations

import itertools
import os
import socket

_LOWEST = 10_000
_WORKER_BLOCKS = 8


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as text:
            return min(int(text.read().split()[0]), 32_768)
    except (OSError, ValueError, IndexError):
        return 32_768


def _worker_index() -> int:
    """0 for a plain run; N for pytest-xdist's worker ``gwN`` (its children inherit it)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


def worker_block(index: int) -> range:
    """The ports of worker ``index``: disjoint from every other worker's, below the floor."""
    size = (_ephemeral_floor() - _LOWEST) // _WORKER_BLOCKS
    start = _LOWEST + (index % _WORKER_BLOCKS) * size
    return range(start, start + size)


_BLOCK = worker_block(_worker_index())
# Child processes of one worker (a benchmark run by a test) start at another offset.
_turn = itertools.count(int.from_bytes(os.urandom(2), "big"))


def free_port() -> int:
    for _ in _BLOCK:
        port = _BLOCK[next(_turn) % len(_BLOCK)]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by a server, or by connections lingering in TIME_WAIT
        return port
    raise RuntimeError(f"no free loopback port in {_BLOCK.start}-{_BLOCK.stop - 1}")

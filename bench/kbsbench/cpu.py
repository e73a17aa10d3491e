"""CPU time of groups of processes on this machine, from ``/proc`` (Linux only): the KBS servers'
process trees, the Redis server, PostgreSQL. The scaling section uses it to give each shared
store's CPU per handshake, the inputs of the scale-out model in docs/performance.md."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except OSError:
            continue
        for child in children:
            pids += tree(int(child))
    return pids


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds of ``pids`` (processes gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICKS


def named(predicate: Callable[[str, str], bool]) -> list[int]:
    """Every process whose ``(comm, cmdline)`` satisfies ``predicate``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if predicate(comm, cmdline):
            found.append(int(entry.name))
    return found


def redis_server(port: int) -> list[int]:
    return named(lambda comm, cmdline: comm == "redis-server" and f":{port}" in cmdline)


def postgres() -> list[int]:
    return named(lambda comm, _cmdline: comm.startswith("postgres"))

"""The load generator: simulated guests against a running KBS, in a process of its own.

python -m kbsbench.loadgen --url http://127.0.0.1:PORT --mode handshake --concurrency 64 \
    --duration 10 [--warmup 2] [--count N] [--spread N [--server-pid PID]]

Modes:
- ``handshake``: each guest runs the whole RCAR exchange as upstream's guest does (``/auth``,
  ``/attest`` with sample evidence bound to an EC P-256 TEE key, one resource GET with the
  session cookie), then starts again as a new guest;
- ``get``: each guest attests once, then GETs the resource on its attested session;
- ``bearer``: each guest attests once, then GETs the resource presenting its token
  (passport mode, ``Authorization: Bearer``), without a cookie.
- ``healthz``: each guest GETs ``/healthz`` (no attestation); against the bare-HTTP ceiling
  (``kbsbench.ceiling``), which answers every path, it measures the server stack alone.

``--vary-workload``: every attestation sends init-data whose Kata agent policy names one
container image no other attestation of this run (or of another run: a random prefix) named.
The default attestation policy reads the images (``ear.trustee.identifiers``), so its answer
cannot be remembered from another guest's, nor can that of a resource policy that reads them
from the token (``kbsbench.isolation``). Without it every guest's evidence differs only in
what the policies never read (nonce, key), and their answers are remembered.

A guest keeps one keep-alive connection, so all its requests reach the worker process that
accepted that connection. ``--spread N`` gives each guest N connections and sends each of its
requests on the next one in turn, as a load balancer spreading one guest's requests would: a
handshake's ``/auth``, ``/attest`` and GET, or a guest's successive GETs, then reach whichever
workers accepted those connections, and the session (or the token check) must be shared
between workers. With ``--server-pid`` (the ``kbs`` process on this machine), the run ends by
reading ``/proc`` for which of the server's processes holds each guest's connections, and
reports how many guests were spread over more than one worker.

Each guest decrypts its first resource reply and checks the bytes, so a run that measures
wrong answers fails instead. Prints one JSON object: completions (in the measured window, and
with the warm-up's), errors, the measured seconds and the latency of every completed operation
(milliseconds, sorted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

from kbsbench.wire import Connection, Reply
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.models import PROTOCOL_VERSION

RESOURCE_PATH = "/kbs/v0/resource/default/bench/secret"
SECRET = b"keybroker benchmark secret"
AUTH_BODY = json.dumps(
    {
        "version": PROTOCOL_VERSION,
        "tee": "sample",
        "extra-params": {"supported-hash-algorithms": ["sha384"]},
    }
).encode()
JSON = {"content-type": "application/json"}
MAX_FAILURES_BEFORE_SUCCESS = 200
IMAGE_REGISTRY = "registry.bench.example/"  # where --vary-workload's images come from


class Workloads:
    """Init-data naming one new container image per call (``--vary-workload``)."""

    def __init__(self) -> None:
        self._prefix = f"{IMAGE_REGISTRY}guest-{secrets.token_hex(4)}-"
        self._count = 0

    def next(self) -> dict[str, str]:
        self._count += 1
        container = {
            "OCI": {
                "Annotations": {"io.kubernetes.cri.image-name": f"{self._prefix}{self._count}"},
                "Process": {"User": {"UID": 1000}},
            }
        }
        agent_policy = "package agent_policy\n\npolicy_data := " + json.dumps(
            {"containers": [container]}
        )
        document = {
            "version": "0.1.0",
            "algorithm": "sha384",
            "data": {"policy.rego": agent_policy},
        }
        return {"format": "json", "body": json.dumps(document)}


class GuestError(Exception):
    pass


@dataclass
class Tally:
    measuring: bool = False
    stop: bool = False
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    failures: int = 0
    all_completed: int = 0  # the warm-up's too: what the server did while this process ran

    def record(self, seconds: float) -> None:
        self.all_completed += 1
        if self.measuring:
            self.latencies.append(seconds * 1e3)

    def fail(self, error: Exception) -> None:
        self.failures += 1
        if self.failures > MAX_FAILURES_BEFORE_SUCCESS and not self.latencies:
            self.stop = True  # nothing works: report it instead of retrying for ever
        if self.measuring or self.stop:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"{type(error).__name__}: {error}")


def _expect(reply: Reply, status: int, what: str) -> Reply:
    if reply.status != status:
        raise GuestError(f"{what}: HTTP {reply.status} {reply.body[:200]!r}")
    return reply


class Guest:
    """One simulated guest on ``spread`` keep-alive connections, used in turn."""

    def __init__(
        self,
        host: str,
        port: int,
        key: TeeKey,
        spread: int = 1,
        workloads: Workloads | None = None,
    ) -> None:
        self.connections = [Connection(host, port) for _ in range(spread)]
        self.workloads = workloads
        self._turn = 0
        self.key = key
        self.jwk = key.public_jwk()
        self.cookie = ""
        self.token = ""
        self.checked = False

    @property
    def connection(self) -> Connection:
        """The connection of the next request."""
        connection = self.connections[self._turn % len(self.connections)]
        self._turn += 1
        return connection

    async def close(self) -> None:
        for connection in self.connections:
            await connection.close()

    async def attest(self) -> None:
        reply = _expect(
            await self.connection.request("POST", "/kbs/v0/auth", body=AUTH_BODY, headers=JSON),
            200,
            "auth",
        )
        self.cookie = reply.headers.get("set-cookie", "").split(";", 1)[0]
        nonce = json.loads(reply.body)["nonce"]
        data = runtime_data(nonce, self.jwk, "")
        evidence = SampleAttester().evidence(runtime_data_digest(data, HashAlgorithm.SHA384))
        body = json.dumps(
            {
                "init-data": self.workloads.next() if self.workloads else None,
                "runtime-data": {"nonce": nonce, "tee-pubkey": self.jwk},
                "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
            }
        ).encode()
        reply = _expect(
            await self.connection.request(
                "POST", "/kbs/v0/attest", body=body, headers={**JSON, "cookie": self.cookie}
            ),
            200,
            "attest",
        )
        self.token = json.loads(reply.body)["token"]

    async def get(self, *, bearer: bool) -> None:
        headers = {"authorization": f"Bearer {self.token}"} if bearer else {"cookie": self.cookie}
        reply = _expect(
            await self.connection.request("GET", RESOURCE_PATH, headers=headers), 200, "resource"
        )
        if not self.checked:  # the first reply of each guest is decrypted and compared
            if self.key.decrypt(json.loads(reply.body)) != SECRET:
                raise GuestError("the resource decrypted to the wrong bytes")
            self.checked = True

    async def healthz(self) -> None:
        _expect(await self.connection.request("GET", "/healthz"), 200, "healthz")


MAX_EXTRA_SECONDS = 60.0


async def _timed(guest: Guest, tally: Tally, operation: Callable[[], Awaitable[None]]) -> bool:
    """Run one measured operation; a failure is counted and the connection reopened."""
    start = time.perf_counter()
    try:
        await operation()
    except (GuestError, OSError, KeyError, ValueError, asyncio.IncompleteReadError) as e:
        tally.fail(e)
        await guest.close()
        return False
    tally.record(time.perf_counter() - start)
    return True


async def _handshakes(guest: Guest, tally: Tally, budget: list[int]) -> None:
    async def handshake() -> None:
        guest.checked = False  # each handshake is a new guest: check its secret again
        await guest.attest()
        await guest.get(bearer=False)

    while not tally.stop and not (budget and budget[0] <= 0):
        if await _timed(guest, tally, handshake) and budget:
            budget[0] -= 1
            if budget[0] <= 0:
                tally.stop = True


async def _gets(guest: Guest, tally: Tally, bearer: bool) -> None:
    await guest.attest()
    while not tally.stop:
        await _timed(guest, tally, lambda: guest.get(bearer=bearer))


async def _healthz(guest: Guest, tally: Tally) -> None:
    while not tally.stop:
        await _timed(guest, tally, guest.healthz)


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            pids += _process_tree(int(child))
    return pids


def _holders(server_pid: int, server_port: int) -> dict[int, int]:
    """Client port -> pid of the server process holding that connection's server end
    (Linux ``/proc``: socket inodes in each process's fds, ``/proc/net/tcp*`` for the ports)."""
    owner: dict[int, int] = {}
    for pid in _process_tree(server_pid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[int(target[8:-1])] = pid
    holders: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                inode = int(fields[9])
                if local_port == server_port and inode in owner:
                    holders[int(fields[2].rsplit(":", 1)[1], 16)] = owner[inode]
    return holders


def worker_spread(guests: list[Guest], server_pid: int, server_port: int) -> dict[str, int]:
    """How many guests (of those with at least two open connections) have them held by more
    than one server process: the guests whose requests really crossed workers."""
    holders = _holders(server_pid, server_port)
    counted = crossed = 0
    workers: set[int] = set()
    for guest in guests:
        held = {
            holders[c.local_port]
            for c in guest.connections
            if c.is_open and c.local_port in holders
        }
        workers |= held
        opened = sum(c.is_open and c.local_port in holders for c in guest.connections)
        if opened >= 2:
            counted += 1
            crossed += len(held) > 1
    return {"guests": counted, "guests_across_workers": crossed, "workers": len(workers)}


async def run(
    url: str,
    mode: str,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    count: int | None,
    spread: int = 1,
    server_pid: int | None = None,
    vary_workload: bool = False,
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    keys = [TeeKey.generate() for _ in range(min(concurrency, 32))]
    workloads = Workloads() if vary_workload else None
    guests = [Guest(host, port, keys[i % len(keys)], spread, workloads) for i in range(concurrency)]
    tally = Tally()
    budget = [count] if count is not None else []
    if mode == "handshake":
        tasks = [asyncio.create_task(_handshakes(g, tally, budget)) for g in guests]
    elif mode == "healthz":
        tasks = [asyncio.create_task(_healthz(g, tally)) for g in guests]
    else:
        tasks = [asyncio.create_task(_gets(g, tally, mode == "bearer")) for g in guests]
    await asyncio.sleep(warmup)
    tally.measuring = True
    started = time.perf_counter()
    if count is not None:
        while not tally.stop and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
    else:
        await asyncio.sleep(duration)
        # A window too short for one completion (a loaded machine, a --quick run) measures
        # nothing: wait, within a bound, for the first one.
        patience = time.perf_counter() + MAX_EXTRA_SECONDS
        while not tally.latencies and time.perf_counter() < patience:
            await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    tally.measuring = False
    tally.stop = True
    # before the connections close: which server process holds each of them
    spread_seen = worker_spread(guests, server_pid, port) if server_pid is not None else None
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [
        r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)
    ]
    for guest in guests:
        await guest.close()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "spread": spread,
        "vary_workload": vary_workload,
        **({"worker_spread": spread_seen} if spread_seen is not None else {}),
        "completed": len(tally.latencies),
        "completed_with_warmup": tally.all_completed,
        "errors": tally.errors + len(failures),
        "error_samples": tally.error_samples + [repr(f) for f in failures[:3]],
        "seconds": elapsed,
        "latencies_ms": sorted(round(v, 3) for v in tally.latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--mode", choices=["handshake", "get", "bearer", "healthz"], default="handshake"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=None, help="stop after N completions")
    parser.add_argument(
        "--spread", type=int, default=1, help="connections per guest, each request on the next"
    )
    parser.add_argument(
        "--server-pid", type=int, default=None, help="report which server processes held them"
    )
    parser.add_argument(
        "--vary-workload",
        action="store_true",
        help="each attestation's init-data names a new container image (nothing remembered)",
    )
    args = parser.parse_args()
    if args.spread < 1:
        parser.error("--spread must be at least 1")
    uvloop.install()
    result = asyncio.run(
        run(
            args.url,
            args.mode,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            count=args.count,
            spread=args.spread,
            server_pid=args.server_pid,
            vary_workload=args.vary_workload,
        )
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

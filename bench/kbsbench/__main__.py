"""``make bench`` / ``make bench-quick``: run the suite, print a table, write JSON.

cd bench && ../.venv/bin/python -m kbsbench [--quick] [--output DIR] [--audit-fsync always|never]

Sections (see docs/performance.md for what each measures and the targets):
1. the bare-HTTP ceiling: Keybroker's server stack serving a trivial app (kbsbench.ceiling)
   with each worker and replica count below, at each concurrency the suite uses;
2. handshakes/s and latency percentiles at 1, 16, 64 and 256 concurrent guests (2 workers);
   resource GETs/s on attested sessions and with bearer tokens; ``/healthz``; a handshake and
   a GET run with each guest's requests spread over two connections (``--spread``);
3. upstream: the same rows for a server configured as an upstream config file would be
   (LocalFs sessions and resources, no token signer, allow-all policy; servers.py);
4. scaling: worker_count 1 and 2; memory versus Redis+PostgreSQL stores; 1, 2 and 3 replicas
   behind nginx; and 2 workers with Prometheus metrics off (every other row counts them), the
   cost of metrics;
5. memory: server RSS after 10k and after 50k handshakes, run in rounds of 10k, each
   measured once the round's sessions have expired and been reaped;
6. servers (issue 23): the ceiling app, ``/healthz``, the cookie GET and the handshake, each
   under uvicorn (``kbs``) and under granian (``kbsbench.granian_server``), 2 workers, measured
   in turn, uvicorn then granian, so drift on the machine falls on both; granian/uvicorn ratios;
7. policy isolation: handshakes/s and p99 of a server evaluating policies in bounded worker
   processes (as every Keybroker does) against one evaluating them in-process, the benchmark's
   baseline, with every guest alike and with every guest different (kbsbench.isolation);
8. the crypto floor, and handshake throughput as a fraction of it.
Every throughput is then given as a share of the ceiling of the same stack, workers and
guests, counted in HTTP requests (a handshake is 3). ``--quick`` runs every section small (a
few hundred requests, no expiry waits) to show the suite works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import granian
import uvicorn

from kbsbench import cpu, floor, model
from kbsbench import isolation as policy_isolation
from kbsbench.ceiling import REPLY_BYTES
from kbsbench.servers import SERVERS, Kbs, ceiling_cluster, cluster
from kbsbench.shares import add_ceiling_shares, compare_servers, summary_lines
from keybroker.client.rcar import KbsClient
from keybroker.kbs.audit import load_key
from keybroker.kbs.audit_verify import verify_file

BENCH = Path(__file__).resolve().parents[1]
SESSION_LIFETIME = 60.0  # the servers' [attestation_service] timeout = 1 (minute)
SPREAD = 2  # connections per guest in the spread rows
# The servers section's rows: (name, load-generator mode), the ceiling first
SERVER_ROWS = [("ceiling", "healthz"), ("healthz", "healthz"), ("get", "get")]
SERVER_ROWS += [("handshake", "handshake")]


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def loadgen(
    url: str,
    mode: str,
    concurrency: int,
    *,
    duration: float = 10.0,
    warmup: float = 2.0,
    count: int | None = None,
    spread: int = 1,
    server_pid: int | None = None,
    vary_workload: bool = False,
) -> dict[str, Any]:
    """Run the load generator in its own process; summarize what it measured."""
    command = [sys.executable, "-m", "kbsbench.loadgen", "--url", url, "--mode", mode]
    command += ["--concurrency", str(concurrency), "--duration", str(duration)]
    command += ["--warmup", str(warmup), "--spread", str(spread)]
    if count is not None:
        command += ["--count", str(count)]
    if server_pid is not None:
        command += ["--server-pid", str(server_pid)]
    if vary_workload:
        command.append("--vary-workload")
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    done = subprocess.run(
        command, cwd=BENCH, env=env, capture_output=True, text=True, timeout=3600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout)
    latencies = raw.pop("latencies_ms")
    seconds = raw["seconds"]
    return {
        **raw,
        "per_second": round(raw["completed"] / seconds, 1) if seconds else 0.0,
        "p50_ms": _percentile(latencies, 0.50),
        "p90_ms": _percentile(latencies, 0.90),
        "p99_ms": _percentile(latencies, 0.99),
    }


def _token(url: str) -> str:
    client = KbsClient(url)
    try:
        return client.attest()
    finally:
        client.close()


class Bench:
    def __init__(self, quick: bool, audit_fsync: str, workdir: Path) -> None:
        self.quick, self.audit_fsync, self.workdir = quick, audit_fsync, workdir
        self.duration = 1.0 if quick else 10.0
        self.warmup = 0.3 if quick else 2.0
        self.levels = [1, 16] if quick else [1, 16, 64, 256]  # guests, for the handshake rows
        self.level = 16 if quick else 64  # guests, for every other row
        self._count = 0

    def _dir(self, name: str) -> Path:
        self._count += 1
        path = self.workdir / f"{self._count:02d}-{name}"
        path.mkdir()
        return path

    def _step(self, text: str) -> None:
        print(f"  {text} ...", file=sys.stderr, flush=True)

    def _load(self, url: str, mode: str, level: int, **options: Any) -> dict[str, Any]:
        return loadgen(url, mode, level, duration=self.duration, warmup=self.warmup, **options)

    def ceiling(self) -> dict[str, Any]:
        """The bare-HTTP ceiling for every stack and concurrency the other sections measure:
        the trivial app, the same server stack, the same load generator (``/healthz`` mode)."""
        stacks = [(1, 2, sorted({*self.levels, self.level}))]
        stacks += [(1, 1, [self.level]), (2, 1, [self.level]), (3, 1, [self.level])]
        rows: list[dict[str, Any]] = []
        for replicas, workers, levels in stacks:
            with ceiling_cluster(
                self._dir(f"ceiling-{replicas}-{workers}"), replicas=replicas, workers=workers
            ) as (url, _servers):
                for level in levels:
                    self._step(f"ceiling: {replicas} x {workers} worker(s), {level} guests")
                    measured = self._load(url, "healthz", level)
                    rows.append({"replicas": replicas, "workers": workers, **measured})
        return {"reply_bytes": REPLY_BYTES, "rows": rows}

    def _kbs_rows(self, url: str, server_pid: int, result: dict[str, Any]) -> None:
        """The rows every compared mode has at ``self.level`` guests: cookie and bearer GETs,
        and a handshake and a cookie GET with each guest's requests spread over connections."""
        for mode in ("get", "bearer"):
            self._step(f"resource GETs ({mode}), {self.level} concurrent guests")
            result[mode] = self._load(url, mode, self.level)
        result["spread"] = {}
        for mode in ("handshake", "get"):
            self._step(f"{mode}, {self.level} guests, each over {SPREAD} connections")
            result["spread"][mode] = self._load(
                url, mode, self.level, spread=SPREAD, server_pid=server_pid
            )

    def handshakes(self) -> dict[str, Any]:
        result: dict[str, Any] = {"replicas": 1, "workers": 2, "store": "memory", "levels": {}}
        with cluster(
            self._dir("handshakes"),
            replicas=1,
            workers=2,
            store="memory",
            audit_fsync=self.audit_fsync,
        ) as (url, servers):
            result["token"] = _token(url)
            for level in self.levels:
                self._step(f"handshakes, {level} concurrent guests")
                result["levels"][str(level)] = self._load(url, "handshake", level)
            self._kbs_rows(url, servers[0].process.pid, result)
            self._step(f"/healthz, {self.level} concurrent guests")
            result["healthz"] = self._load(url, "healthz", self.level)
        return result

    def upstream(self) -> dict[str, Any]:
        """A server configured as an upstream config file would be (servers.py)."""
        result: dict[str, Any] = {"replicas": 1, "workers": 2, "store": "upstream"}
        with cluster(
            self._dir("upstream"),
            replicas=1,
            workers=2,
            store="upstream",
            audit_fsync=self.audit_fsync,
        ) as (url, servers):
            self._step(f"upstream config: handshakes, {self.level} concurrent guests")
            result["handshake"] = self._load(url, "handshake", self.level)
            self._kbs_rows(url, servers[0].process.pid, result)
        return result

    def scaling(self) -> dict[str, Any]:
        level = self.level
        rows: list[dict[str, Any]] = []
        on, off = "loopback", "off"  # [metrics] access: metrics on, or off
        setups = [(1, 1, "memory", on), (1, 2, "memory", on), (1, 2, "memory", off)]
        setups += [(1, 2, "redis+postgres", on), (2, 1, "redis+postgres", on)]
        setups += [(3, 1, "redis+postgres", on)]
        for replicas, workers, store, metrics in setups:
            flag = "on" if metrics == on else "off"
            self._step(
                f"scaling: {replicas} replica(s) x {workers} worker(s), {store}, metrics {flag}"
            )
            with cluster(
                self._dir(f"scaling-{replicas}-{workers}-{store}-metrics-{flag}"),
                replicas=replicas,
                workers=workers,
                store=store,
                audit_fsync=self.audit_fsync,
                metrics=metrics,
            ) as (url, servers):
                groups = _cpu_groups(servers)
                before = {name: cpu.cpu_seconds(pids()) for name, pids in groups.items()}
                measured = self._load(url, "handshake", level)
                spent = {n: cpu.cpu_seconds(p()) - before[n] for n, p in groups.items()}
            row = {"replicas": replicas, "workers": workers, "store": store, "metrics": flag}
            # CPU per handshake of each process group over the whole load run (warm-up too)
            handshakes = measured["per_second"] * (self.duration + self.warmup)
            row["cpu_ms_per_handshake"] = {
                name: round(1000 * seconds / handshakes, 3) if handshakes else 0.0
                for name, seconds in spent.items()
            }
            rows.append({**row, **measured})
        return {"concurrency": level, "rows": rows}

    def memory(self) -> dict[str, Any]:
        """RSS of a one-worker server (sessions in its own memory) after 10k and after 50k
        handshakes, in rounds of 10k, each followed by the expiry and reaping of its sessions.

        Equal rounds keep the number of sessions alive at once the same in every round, so
        growth between the first and the last checkpoint is memory that reaping did not give
        back. One 40k run would hold more sessions at its peak than the 10k run (a session
        lives a minute), and Python keeps its peak heap, so it would show a leak that is not
        there.
        """
        per_round, rounds = (150, 2) if self.quick else (10_000, 5)
        wait = 0.0 if self.quick else SESSION_LIFETIME + 2
        result: dict[str, Any] = {"workers": 1, "store": "memory", "expiry_wait_s": wait}
        with cluster(
            self._dir("memory"),
            replicas=1,
            workers=1,
            store="memory",
            audit_fsync=self.audit_fsync,
        ) as (url, servers):
            server = servers[0]
            result["rss_start_mib"] = server.rss_bytes() / 2**20
            rounds_rss: list[float] = []
            errors = 0
            for index in range(rounds):
                self._step(f"memory: round {index + 1} of {rounds}, {per_round} handshakes")
                errors += loadgen(url, "handshake", 64, warmup=0, count=per_round)["errors"]
                time.sleep(wait)  # every session of the round expires
                loadgen(url, "handshake", 1, warmup=0, count=1)  # a write sweeps them
                rounds_rss.append(server.rss_bytes() / 2**20)
        result["handshakes"] = {"first": per_round, "total": per_round * rounds}
        result["rss_after_each_round_mib"] = [round(rss, 1) for rss in rounds_rss]
        result["rss_first_mib"], result["rss_total_mib"] = rounds_rss[0], rounds_rss[-1]
        result["errors"] = errors
        growth = result["rss_total_mib"] / result["rss_first_mib"] - 1
        result["growth_percent"] = round(100 * growth, 1)
        return result

    def servers(self) -> dict[str, Any]:
        """uvicorn against granian on the same apps and load (issue 23): both servers of a pair
        run at once and every row is measured under each in turn, uvicorn first."""
        level, workers = self.level, 2
        measured: dict[str, dict[str, dict[str, Any]]] = {name: {} for name, _ in SERVER_ROWS}
        with ExitStack() as stack:
            ceilings = {
                server: stack.enter_context(
                    ceiling_cluster(
                        self._dir(f"servers-ceiling-{server}"),
                        replicas=1,
                        workers=workers,
                        server=server,
                    )
                )[0]
                for server in SERVERS
            }
            for server, url in ceilings.items():
                self._step(f"servers: ceiling under {server}, {level} guests")
                measured["ceiling"][server] = self._load(url, "healthz", level)
        with ExitStack() as stack:
            urls = {
                server: stack.enter_context(
                    cluster(
                        self._dir(f"servers-kbs-{server}"),
                        replicas=1,
                        workers=workers,
                        store="memory",
                        audit_fsync=self.audit_fsync,
                        server=server,
                    )
                )[0]
                for server in SERVERS
            }
            for name, mode in SERVER_ROWS[1:]:
                for server, url in urls.items():
                    self._step(f"servers: {name} under {server}, {level} guests")
                    measured[name][server] = self._load(url, mode, level)
        return {
            "replicas": 1,
            "workers": workers,
            "store": "memory",
            "concurrency": level,
            "versions": {"uvicorn": uvicorn.__version__, "granian": granian.__version__},
            "rows": {
                name: compare_servers(rows, measured["ceiling"]) for name, rows in measured.items()
            },
        }

    def policy_isolation(self) -> dict[str, Any]:
        """Isolated against in-process policy evaluation, alternating runs (kbsbench.isolation):
        about 110 s in full (a warm-up run, then 4 runs of 3 s per server and workload), 16
        guests and 2 runs each in --quick."""
        # a longer warm-up than the other sections' in --quick: each server starts cold here
        duration, warmup = (1.0, 1.0) if self.quick else (3.0, 1.0)

        def load(url: str, vary: bool) -> dict[str, Any]:
            return loadgen(
                url,
                "handshake",
                self.level,
                duration=duration,
                warmup=warmup,
                vary_workload=vary,
            )

        return policy_isolation.measure(
            self._dir("policy-isolation"),
            load,
            rounds=2 if self.quick else 4,
            audit_fsync=self.audit_fsync,
        )


def _servers_lines(part: dict[str, Any]) -> list[str]:
    versions = part["versions"]
    lines = [
        f"\nServers (issue 23): uvicorn {versions['uvicorn']} (httptools, uvloop) against granian"
        f" {versions['granian']} (HTTP/1, uvloop), {part['replicas']} replica x"
        f" {part['workers']} workers, {part['store']}, {part['concurrency']} guests,"
        " measured in turn:",
        f"  {'what':<22} {'uvicorn/s':>9} {'granian/s':>9} {'ratio':>6} {'p99 u ms':>9}"
        f" {'p99 g ms':>9} {'p99 ratio':>9} {'errors':>7}",
    ]
    titles = {"ceiling": "bare app (ceiling)", "healthz": "Keybroker /healthz"}
    titles |= {"get": "resource GET, cookie", "handshake": "full handshake"}
    for name, row in part["rows"].items():
        u, g = row["uvicorn"], row["granian"]
        lines.append(
            f"  {titles[name]:<22} {u['per_second']:>9.0f} {g['per_second']:>9.0f}"
            f" {row['ratio']:>6.2f} {u['p99_ms']:>9.1f} {g['p99_ms']:>9.1f}"
            f" {row['p99_ratio']:>9.2f} {u['errors'] + g['errors']:>7}"
        )
    lines.append("  (ratio: granian/uvicorn; above 1 granian serves more, or waits longer at p99)")
    return lines


def _cpu_groups(servers: list[Kbs]) -> dict[str, Callable[[], list[int]]]:
    """The process groups whose CPU a scaling row accounts: the KBS servers' trees (workers and
    policy workers), and with shared stores the Redis server and every PostgreSQL process."""
    groups: dict[str, Callable[[], list[int]]] = {
        "kbs": lambda: [pid for s in servers for pid in cpu.tree(s.process.pid)]
    }
    port = servers[0].redis_port
    if port is not None:
        groups["redis"] = lambda: cpu.redis_server(port)
        groups["postgres"] = cpu.postgres
    return groups


def _table(results: dict[str, Any]) -> str:
    lines = [
        "",
        "Keybroker benchmark" + (" (QUICK: figures are meaningless)" if results["quick"] else ""),
    ]
    ce = results["ceiling"]
    lines.append(
        f"\nBare-HTTP ceiling (kbs's uvicorn stack, a trivial app, one {ce['reply_bytes']}-byte"
        " JSON reply):"
    )
    for row in ce["rows"]:
        lines.append(
            f"  {row['replicas']} replica(s) x {row['workers']} worker(s), "
            f"{row['concurrency']:>3} guests: {row['per_second']:>8.0f}/s"
            f"  p99 {row['p99_ms']:>6.1f} ms  errors {row['errors']}"
        )
    hs = results["handshakes"]
    lines.append(
        f"\nFull handshakes (auth + attest + GET), {hs['workers']} workers, {hs['store']}"
        " (share of the ceiling in requests, 3 per handshake):"
    )
    lines.append(
        f"  {'guests':>6} {'per s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'share':>7}"
    )
    for level, row in hs["levels"].items():
        lines.append(
            f"  {level:>6} {row['per_second']:>8.0f} {row['p50_ms']:>8.1f} {row['p90_ms']:>8.1f}"
            f" {row['p99_ms']:>8.1f} {row['errors']:>6} {row['ceiling_share']:>7.1%}"
        )
    lines += _rows_lines(hs)
    up = results["upstream"]
    lines.append(
        f"\nUpstream-style config ({up['workers']} workers; LocalFs sessions and resources, no"
        " signer, allow-all policy):"
    )
    lines += _rows_lines(up)
    lines += summary_lines(results)
    fl = results["floor"]
    lines.append(
        f"\nCrypto floor (one core): {fl['handshake_microseconds']:.0f} µs per handshake "
        f"= {fl['floor_per_core']:.0f} handshakes/s"
    )
    for name, micros in fl["microseconds"].items():
        lines.append(f"  {name:<20} {micros:>9.1f} µs")
    lines.append(f"  best handshake rate / (floor x 2 workers): {fl['fraction_of_floor']:.0%}")
    sc = results["scaling"]
    lines.append(f"\nScaling (handshakes/s at {sc['concurrency']} guests):")
    for row in sc["rows"]:
        lines.append(
            f"  {row['replicas']} replica(s) x {row['workers']} worker(s) {row['store']:<15}"
            f" metrics {row['metrics']:<3} {row['per_second']:>7.0f}/s"
            f"  p99 {row['p99_ms']:>6.1f} ms  errors {row['errors']}"
            f"  {row['ceiling_share']:.1%} of the ceiling"
        )
        costs = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_handshake"].items())
        lines.append(f"      CPU ms per handshake: {costs}")
    so = results["scale_out_model"]
    costs = ", ".join(f"{k} {v:.2f}" for k, v in so["cpu_ms_per_handshake"].items())
    lines.append(
        f"\nScale-out model (CPU ms per handshake: {costs}; {so['cores_per_machine']} cores"
        " per machine, see docs/performance.md):"
    )
    for row in so["rows"]:
        lines.append(
            f"  {row['replicas']:>3} replica(s): {row['handshakes_per_second'] or 0:>9.0f}"
            f" handshakes/s, bound by {row['saturates']}"
        )
    mem = results["memory"]
    lines.append(
        f"\nMemory (1 worker): RSS {mem['rss_first_mib']:.1f} MiB after "
        f"{mem['handshakes']['first']}"
        f" handshakes, {mem['rss_total_mib']:.1f} MiB after {mem['handshakes']['total']} "
        f"({mem['growth_percent']:+.1f} %), sessions reaped after {mem['expiry_wait_s']:.0f} s"
    )
    rounds = ", ".join(f"{rss:.1f}" for rss in mem["rss_after_each_round_mib"])
    lines.append(f"  RSS after each round of {mem['handshakes']['first']}: {rounds} MiB")
    lines += _servers_lines(results["servers"])
    lines += policy_isolation.table_lines(results["policy_isolation"])
    return "\n".join(lines)


def _rows_lines(part: dict[str, Any]) -> list[str]:
    """One line per row of a compared mode (handshakes or upstream), with its share."""
    titles = {"handshake": "Full handshakes", "get": "Resource GETs (cookie)"}
    titles |= {"bearer": "Resource GETs (bearer)", "healthz": "/healthz"}
    rows = [(titles[m], part[m]) for m in ("handshake", "get", "bearer", "healthz") if m in part]
    rows += [(f"{titles[m]}, spread", row) for m, row in part["spread"].items()]
    lines = []
    for title, row in rows:
        text = (
            f"{title}, {row['concurrency']} guests: {row['per_second']:.0f}/s, "
            f"p99 {row['p99_ms']:.1f} ms, errors {row['errors']}, "
            f"{row['ceiling_share']:.1%} of the ceiling"
        )
        if "worker_spread" in row:
            seen = row["worker_spread"]
            text += (
                f"; {row['spread']} connections per guest, {seen['guests_across_workers']} of"
                f" {seen['guests']} guests across {seen['workers']} workers"
            )
        lines.append(text)
    return lines


def verify_audit_logs(workdir: Path) -> dict[str, int]:
    """Every server's audit log, written by several workers under load, still verifies: keyed
    where its cluster has a key (every one but the upstream-style server's, whose log is the
    default plain SHA-256 chain)."""
    logs = records = 0
    for path in sorted(workdir.rglob("audit-*.log")):  # one directory per cluster, one key each
        key_file = path.parent / "audit.key"
        key = load_key(key_file) if key_file.exists() else None
        result = verify_file(path, key=key)
        if not result.ok:
            raise SystemExit(f"audit log {path.name} does not verify: {result.problem}")
        logs, records = logs + 1, records + result.records
    print(f"audit logs: {logs} verified, {records} records", file=sys.stderr, flush=True)
    return {"logs": logs, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description="Keybroker benchmark suite")
    parser.add_argument("--quick", action="store_true", help="small and fast; checks the suite")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    parser.add_argument("--audit-fsync", choices=["always", "never"], default="always")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "audit_fsync": args.audit_fsync,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kbsbench-") as tmp:
        bench = Bench(args.quick, args.audit_fsync, Path(tmp))
        sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("ceiling", bench.ceiling),
            ("handshakes", bench.handshakes),
            ("upstream", bench.upstream),
            ("scaling", bench.scaling),
            ("memory", bench.memory),
            ("servers", bench.servers),
            ("policy_isolation", bench.policy_isolation),
        ]
        args.output.mkdir(parents=True, exist_ok=True)
        partial = args.output / "partial.json"
        for name, section in sections:
            print(f"{name}:", file=sys.stderr, flush=True)
            results[name] = section()
            partial.write_text(json.dumps(results, indent=2) + "\n")  # kept if a later one fails
        results["audit"] = verify_audit_logs(Path(tmp))
    token = results["handshakes"].pop("token")
    print("crypto floor:", file=sys.stderr, flush=True)
    results["floor"] = floor.measure(token, seconds=1.0 if args.quick else 6.0)
    best = max(row["per_second"] for row in results["handshakes"]["levels"].values())
    results["floor"]["fraction_of_floor"] = best / (2 * results["floor"]["floor_per_core"])
    results["ratios"] = add_ceiling_shares(results)
    shared_row = next(
        r
        for r in results["scaling"]["rows"]
        if r["store"] == "redis+postgres" and r["workers"] == 2
    )
    results["scale_out_model"] = model.scale_out(
        shared_row["cpu_ms_per_handshake"], cores=2, replicas=[1, 2, 4, 8, 16, 32]
    )
    results["seconds"] = round(time.monotonic() - started, 1)
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = results["when"].replace(":", "").replace("-", "")
    path = args.output / f"{'quick' if args.quick else 'full'}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(_table(results))
    print(f"\nwritten to {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

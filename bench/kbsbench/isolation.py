"""The ``policy_isolation`` section: what evaluating policies in bounded worker processes
costs in handshake throughput, against evaluating them in the server process (issue 23's
target: at most 15 %).

Two servers, configured alike (``servers.write_config``: 2 workers, memory sessions, the
default attestation policy), run side by side: the normal ``kbs`` (isolated: every compilation
and evaluation in ``keybroker.policy.workers`` processes) and ``kbsbench.inprocess_kbs`` (the
same server with ``kbsbench.inprocess_policy`` answering in the server process, on the same
threads). Both keep the same answer memory, so they differ only in the process boundary and its
bounds. Runs alternate between them (isolated first, then in-process first, ...), so a drift in
the machine's speed falls on both.

Two workloads, because a remembered answer never reaches the boundary:
- ``same_guest``: the suite's normal handshake, every guest with the same evidence, under the
  ``affirming`` resource policy: after the first guests, both policies' answers are
  remembered and the boundary is almost never crossed;
- ``distinct_guests``: every handshake's init-data names a container image no other named
  (``loadgen --vary-workload``), and the resource policy (``IMAGE_POLICY``) releases only to
  images from one registry, read from the token: the attestation policy and the resource
  policy evaluate afresh in every handshake: two crossings of the boundary.

Each server is checked while it serves, after every run: the isolated one has policy worker
processes under it, the in-process one has none and logged ``inprocess_policy.MARKER`` once in
each of its worker processes. Otherwise the section fails, rather than compare two isolated
servers.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# the test suite's helpers for real processes, as in kbsbench.servers
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from kbs_process import running_kbs  # noqa: E402
from kbsbench.cpu import cpu_seconds, tree  # noqa: E402
from kbsbench.inprocess_policy import MARKER  # noqa: E402
from kbsbench.loadgen import IMAGE_REGISTRY  # noqa: E402
from kbsbench.servers import BENCH, Kbs, provision, running_server, write_config  # noqa: E402
from keybroker.client.admin import AdminClient  # noqa: E402
from keybroker.kbs.resource_policy import builtin_policy  # noqa: E402
from ports import free_port  # noqa: E402

WORKERS = 2
POLICY_WORKER = "keybroker.policy.workers"  # in the command line of every policy worker process
UVICORN_WORKER = "spawn_main"  # in the command line of every uvicorn worker (multiprocessing)
SIDES = ("isolated", "in_process")
# Releases resources to a guest whose every submodule is affirming and whose validated container
# images (from its init-data, in the token) all come from the bench's registry.
IMAGE_POLICY = f"""
package policy

import rego.v1

default allow := false

allow if {{
	data.plugin == "resource"
	count(input.submods) > 0
	every _, submod in input.submods {{
		submod["ear.status"] == "affirming"
	}}
	images := input.submods.cpu0["ear.trustee.identifiers"].validated.container_images
	count(images) > 0
	every image in images {{
		startswith(image, "{IMAGE_REGISTRY}")
	}}
}}
"""
WORKLOADS = {  # name: (resource policy, loadgen --vary-workload)
    "same_guest": (builtin_policy("affirming"), False),
    "distinct_guests": (IMAGE_POLICY, True),
}

# (url, vary_workload) -> one run's summary (kbsbench.__main__.loadgen)
Load = Callable[[str, bool], dict[str, Any]]


def measure(workdir: Path, load: Load, *, rounds: int, audit_fsync: str) -> dict[str, Any]:
    """Every workload, ``rounds`` runs on each server, alternating; see the module."""
    with ExitStack() as stack:
        servers = {
            side: stack.enter_context(_side(workdir / side, side, audit_fsync)) for side in SIDES
        }
        for side, server in servers.items():
            # unmeasured: every pool thread's worker process started, every policy compiled
            _step(f"warm-up, {side}")
            load(server.url, True)
        workloads: dict[str, Any] = {}
        seen: dict[str, dict[str, int]] = {}
        for name, (policy, vary) in WORKLOADS.items():
            for server in servers.values():
                _set_resource_policy(server.url, policy)
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
            for index in range(rounds):
                order = SIDES if index % 2 == 0 else SIDES[::-1]
                for side in order:
                    server = servers[side]
                    _step(f"{name}, {side}, run {index + 1} of {rounds}")
                    before = _cpu(server)
                    run = load(server.url, vary)
                    after = _cpu(server)
                    run["server_cpu_seconds"] = after[0] - before[0]
                    run["policy_worker_cpu_seconds"] = after[1] - before[1]
                    runs[side].append(run)
                    seen[side] = _check(side, server, workdir / side)
            workloads[name] = _workload(runs, vary)
        return {
            "workers": WORKERS,
            "rounds": rounds,
            "evaluation_in_process": "on the pool's threads (rego-cpp releases the GIL)",
            "workloads": workloads,
            "processes_seen": seen,  # at the last check of each server
        }


def _step(text: str) -> None:
    print(f"  policy isolation: {text} ...", file=sys.stderr, flush=True)


def _workload(runs: dict[str, list[dict[str, Any]]], vary: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"vary_workload": vary}
    for side in SIDES:
        result[side] = _pooled(runs[side])
    isolated, in_process = result["isolated"]["per_second"], result["in_process"]["per_second"]
    cost = 1 - isolated / in_process if in_process else 0.0
    result["cost_percent"] = round(100 * cost, 1)
    isolated, in_process = (result[side]["cpu_ms_per_handshake"] for side in SIDES)
    result["cpu_cost_percent"] = round(100 * (isolated / in_process - 1), 1) if in_process else 0.0
    return result


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs as one row: the rate over all of them, the median of each percentile."""
    completed = sum(run["completed"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    # the server's CPU over whole runs, warm-ups included, per handshake completed in them
    # (those cut off at the end of a run, at most one per guest, are not counted)
    cpu = sum(run["server_cpu_seconds"] for run in runs)
    in_workers = sum(run["policy_worker_cpu_seconds"] for run in runs)
    everything = sum(run["completed_with_warmup"] for run in runs)
    return {
        "concurrency": runs[0]["concurrency"],
        "completed": completed,
        "seconds": round(seconds, 2),
        "errors": sum(run["errors"] for run in runs),
        "error_samples": [sample for run in runs for sample in run["error_samples"]][:5],
        "per_second": round(completed / seconds, 1) if seconds else 0.0,
        "cpu_ms_per_handshake": round(1000 * cpu / everything, 3) if everything else 0.0,
        # of which in policy worker processes (none in-process): how often the boundary is crossed
        "policy_worker_cpu_ms_per_handshake": (
            round(1000 * in_workers / everything, 3) if everything else 0.0
        ),
        **{key: statistics.median(run[key] for run in runs) for key in _PERCENTILES},
        "runs": [{key: run[key] for key in ("per_second", *_PERCENTILES)} for run in runs],
    }


_PERCENTILES = ("p50_ms", "p90_ms", "p99_ms")


def _set_resource_policy(url: str, policy: str) -> None:
    admin = AdminClient(url)
    try:
        admin.set_resource_policy(policy)
    finally:
        admin.close()


def _check(side: str, server: Kbs, workdir: Path) -> dict[str, int]:
    """Fail loudly unless the server evaluates policies as its side says (see the module);
    what was seen: its uvicorn workers, those that logged the marker, its policy workers."""
    commands = {pid: _command_line(pid) for pid in tree(server.process.pid)}
    workers = [pid for pid, command in commands.items() if UVICORN_WORKER in command]
    log = _log(workdir)
    marked = [pid for pid in workers if f"{MARKER} (pid {pid})" in log]
    seen = {
        "uvicorn_workers": len(workers),
        "marked_workers": len(marked),
        "policy_worker_processes": sum(POLICY_WORKER in command for command in commands.values()),
    }
    if len(workers) != WORKERS:
        raise SystemExit(
            f"policy isolation: the {side} server should have {WORKERS} workers: {seen}"
        )
    if side == "isolated" and (seen["policy_worker_processes"] == 0 or MARKER in log):
        raise SystemExit(
            "policy isolation: the isolated server should have policy worker processes and "
            f"no in-process marker in its log: {seen}"
        )
    if side == "in_process" and (seen["policy_worker_processes"] or len(marked) != WORKERS):
        raise SystemExit(
            "policy isolation: every worker of the in-process server should have logged the "
            f"marker, and none should have a policy worker process: {seen}; the stand-in did "
            "not reach every uvicorn worker"
        )
    return seen


def _cpu(server: Kbs) -> tuple[float, float]:
    """CPU seconds of the server's whole process tree, and of its policy worker processes."""
    pids = tree(server.process.pid)
    workers = [pid for pid in pids if POLICY_WORKER in _command_line(pid)]
    return cpu_seconds(pids), cpu_seconds(workers)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _log(workdir: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in workdir.glob("kbs-*.log"))


@contextmanager
def _side(workdir: Path, side: str, audit_fsync: str) -> Iterator[Kbs]:
    """One provisioned server of ``side`` in a directory of its own (its store, its log)."""
    workdir.mkdir()
    port = free_port()
    config = write_config(
        workdir, port, workers=WORKERS, store="memory", shared=None, audit_fsync=audit_fsync
    )
    starting = running_server if side == "isolated" else _running_in_process
    with starting(config, port, workdir) as server:
        provision(server.url)
        yield server


@contextmanager
def _running_in_process(config: Path, port: int, workdir: Path) -> Iterator[Kbs]:
    """``kbsbench.inprocess_kbs`` (kbs with in-process policies) on ``config``, started and
    stopped as ``kbs`` is."""
    url = f"http://127.0.0.1:{port}"
    with running_kbs(
        ["-c", str(config)],
        workdir,
        url,
        log_name=f"kbs-{port}.log",
        command=[sys.executable, "-m", "kbsbench.inprocess_kbs"],
        env={"PYTHONPATH": str(BENCH)},
    ) as process:
        yield Kbs(url, process)


def table_lines(result: dict[str, Any]) -> list[str]:
    """The section's lines in the printed table."""
    lines = [
        f"\nPolicy isolation ({result['workers']} workers, {result['rounds']} alternating runs"
        " each; cost = 1 - isolated / in-process; CPU: the server's, per handshake):"
    ]
    for name, workload in result["workloads"].items():
        isolated, in_process = workload["isolated"], workload["in_process"]
        lines.append(
            f"  {name:<16} {isolated['concurrency']} guests: isolated"
            f" {isolated['per_second']:>6.0f}/s p99 {isolated['p99_ms']:>6.1f} ms,"
            f" in-process {in_process['per_second']:>6.0f}/s p99 {in_process['p99_ms']:>6.1f} ms,"
            f" cost {workload['cost_percent']:+.1f} %;"
            f" CPU {isolated['cpu_ms_per_handshake']:.2f}"
            f" ({isolated['policy_worker_cpu_ms_per_handshake']:.2f} in policy workers)"
            f" / {in_process['cpu_ms_per_handshake']:.2f} ms"
            f" ({workload['cpu_cost_percent']:+.1f} %)"
            f"  errors {isolated['errors'] + in_process['errors']}"
        )
    return lines

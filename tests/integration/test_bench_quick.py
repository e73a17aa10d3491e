"""``make bench-quick`` runs the whole benchmark suite small and writes valid results JSON.

No figure is judged here (performance is measured by ``make bench``, never asserted in tests):
this shows every section runs against real ``kbs`` processes, the guests get their secret,
and the results file holds what docs/performance.md reads from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def _measured(row: dict[str, object]) -> None:
    assert row["errors"] == 0, row["error_samples"]
    assert isinstance(row["completed"], int) and row["completed"] > 0
    assert _positive(row["per_second"])
    p50, p90, p99 = row["p50_ms"], row["p90_ms"], row["p99_ms"]
    assert isinstance(p50, float) and isinstance(p90, float) and isinstance(p99, float)
    assert 0 < p50 <= p90 <= p99


def test_quick_bench_runs_every_section_and_writes_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kbsbench", "--quick", "--output", str(tmp_path)],
        cwd=ROOT / "bench",
        env={**os.environ, "PYTHONPATH": str(ROOT / "bench")},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [path] = tmp_path.glob("quick-*.json")
    results = json.loads(path.read_text())
    assert results["quick"] is True and results["machine"]["cpus"] >= 1

    scaling_rows = [
        (1, 1, "memory", "on"),
        (1, 2, "memory", "on"),
        (1, 2, "memory", "off"),  # the cost of metrics: this row against the one above
        (1, 2, "redis+postgres", "on"),
        (2, 1, "redis+postgres", "on"),
        (3, 1, "redis+postgres", "on"),
    ]
    ceiling = results["ceiling"]
    assert ceiling["reply_bytes"] == 200
    assert [(r["replicas"], r["workers"], r["concurrency"]) for r in ceiling["rows"]] == [
        (1, 2, 1),
        (1, 2, 16),
        (1, 1, 16),  # one stack for each worker and replica count the other sections use
        (2, 1, 16),
        (3, 1, 16),
    ]
    for row in ceiling["rows"]:
        _measured(row)
        assert row["mode"] == "healthz" and row["spread"] == 1

    handshakes = results["handshakes"]
    assert set(handshakes["levels"]) == {"1", "16"}
    for row in [
        *handshakes["levels"].values(),
        handshakes["get"],
        handshakes["bearer"],
        handshakes["healthz"],
    ]:
        _measured(row)
        assert row["spread"] == 1 and "worker_spread" not in row
    upstream = results["upstream"]
    assert (upstream["store"], upstream["workers"]) == ("upstream", 2)
    for part in (handshakes, upstream):
        assert set(part["spread"]) == {"handshake", "get"}
        for row in part["spread"].values():
            _measured(row)
            assert row["spread"] == 2
            # which of the server's workers held each guest's connections, read from /proc
            seen = row["worker_spread"]
            assert 1 <= seen["workers"] <= 2 and 0 < seen["guests"] <= 16
            assert 0 <= seen["guests_across_workers"] <= seen["guests"]
    for mode in ("handshake", "get", "bearer"):
        _measured(upstream[mode])

    # every throughput as a share of the ceiling of its stack, in requests (3 per handshake)
    ratios = results["ratios"]
    memory = ["handshake 1 guests", "handshake 16 guests", "get", "bearer", "healthz"]
    upstream_rows = ["handshake", "get", "bearer"]
    spread = ["handshake spread", "get spread"]
    assert [r["name"] for r in ratios] == [
        *(f"memory {name}" for name in [*memory, *spread]),
        *(f"upstream {name}" for name in [*upstream_rows, *spread]),
        *(f"scaling {r}x{w} {store} metrics {m}" for r, w, store, m in scaling_rows),
    ]
    for ratio in ratios:
        assert _positive(ratio["ceiling_share"]) and _positive(ratio["ceiling_per_second"])
        per_completion = 3 if ratio["mode"] == "handshake" else 1
        assert ratio["requests_per_second"] == round(per_completion * ratio["per_second"], 1)
    assert handshakes["levels"]["16"]["ceiling_share"] == next(
        r["ceiling_share"] for r in ratios if r["name"] == "memory handshake 16 guests"
    )

    floor = results["floor"]
    assert set(floor["microseconds"]) == {
        "runtime_data_hash",
        "policy_evaluation",
        "ear_sign",
        "ear_verify",
        "jwe_wrap_ec_p256",
        "jwe_wrap_rsa_2048",
    }
    assert all(_positive(v) for v in floor["microseconds"].values())
    assert _positive(floor["floor_per_core"]) and _positive(floor["fraction_of_floor"])

    rows = results["scaling"]["rows"]
    assert [(r["replicas"], r["workers"], r["store"], r["metrics"]) for r in rows] == scaling_rows
    for r in rows:
        assert r["errors"] == 0 and r["completed"] > 0, r.get("error_samples")
        assert _positive(r["ceiling_share"])
        groups = {"kbs", "redis", "postgres"} if r["store"] == "redis+postgres" else {"kbs"}
        assert set(r["cpu_ms_per_handshake"]) == groups
        assert _positive(r["cpu_ms_per_handshake"]["kbs"])
    model = results["scale_out_model"]
    assert [row["replicas"] for row in model["rows"]] == [1, 2, 4, 8, 16, 32]
    assert all(row["saturates"] in {"kbs replicas", "redis", "postgres"} for row in model["rows"])
    assert "Scale-out model" in done.stdout

    memory = results["memory"]
    assert memory["errors"] == 0 and memory["handshakes"] == {"first": 150, "total": 300}
    assert len(memory["rss_after_each_round_mib"]) == 2
    assert _positive(memory["rss_first_mib"]) and _positive(memory["rss_total_mib"])
    # issue 23: uvicorn against granian, each row measured under both, with the ratios
    servers = results["servers"]
    assert (servers["replicas"], servers["workers"], servers["store"]) == (1, 2, "memory")
    assert servers["concurrency"] == 16
    assert set(servers["versions"]) == {"uvicorn", "granian"}
    assert list(servers["rows"]) == ["ceiling", "healthz", "get", "handshake"]
    modes = {"ceiling": "healthz", "healthz": "healthz", "get": "get", "handshake": "handshake"}
    for name, row in servers["rows"].items():
        for server in ("uvicorn", "granian"):
            _measured(row[server])
            assert row[server]["mode"] == modes[name] and row[server]["concurrency"] == 16
            assert _positive(row[server]["ceiling_share"])
        assert row["ratio"] == round(row["granian"]["per_second"] / row["uvicorn"]["per_second"], 3)
        assert _positive(row["p99_ratio"])
    assert "Servers (issue 23)" in done.stdout and "granian/uvicorn" in done.stdout

    # every cluster's audit log verified, the granian servers' (two writers each) among them
    assert results["audit"]["logs"] >= 2 and results["audit"]["records"] > 0

    # isolated against in-process policy evaluation, each checked while it served
    isolation = results["policy_isolation"]
    assert (isolation["workers"], isolation["rounds"]) == (2, 2)
    assert set(isolation["workloads"]) == {"same_guest", "distinct_guests"}
    for name, workload in isolation["workloads"].items():
        assert workload["vary_workload"] is (name == "distinct_guests")
        for side in ("isolated", "in_process"):
            _measured(workload[side])
            assert workload[side]["concurrency"] == 16 and len(workload[side]["runs"]) == 2
            assert _positive(workload[side]["cpu_ms_per_handshake"])
        rates = workload["isolated"]["per_second"], workload["in_process"]["per_second"]
        assert workload["cost_percent"] == round(100 * (1 - rates[0] / rates[1]), 1)
        cpu = [workload[side]["cpu_ms_per_handshake"] for side in ("isolated", "in_process")]
        assert workload["cpu_cost_percent"] == round(100 * (cpu[0] / cpu[1] - 1), 1)
    in_process_workers = [
        workload["in_process"]["policy_worker_cpu_ms_per_handshake"]
        for workload in isolation["workloads"].values()
    ]
    assert in_process_workers == [0.0, 0.0]  # no policy worker process to spend it
    seen = isolation["processes_seen"]
    assert seen["isolated"]["uvicorn_workers"] == seen["in_process"]["uvicorn_workers"] == 2
    assert seen["isolated"]["policy_worker_processes"] > 0
    assert seen["in_process"] == {
        "uvicorn_workers": 2,
        "marked_workers": 2,
        "policy_worker_processes": 0,
    }
    assert "Policy isolation" in done.stdout and "distinct_guests" in done.stdout
    assert "Crypto floor" in done.stdout and "written to" in done.stdout
    assert "Bare-HTTP ceiling" in done.stdout and "Shares of the bare-HTTP ceiling" in done.stdout
    assert "Upstream-style config" in done.stdout and "of the ceiling" in done.stdout

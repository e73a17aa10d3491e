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

    handshakes = results["handshakes"]
    assert set(handshakes["levels"]) == {"1", "16"}
    for row in [*handshakes["levels"].values(), handshakes["get"], handshakes["bearer"]]:
        assert row["errors"] == 0, row["error_samples"]
        assert row["completed"] > 0 and _positive(row["per_second"])
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]

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
    assert [(r["replicas"], r["workers"], r["store"], r["metrics"]) for r in rows] == [
        (1, 1, "memory", "on"),
        (1, 2, "memory", "on"),
        (1, 2, "memory", "off"),  # the cost of metrics: this row against the one above
        (1, 2, "redis+postgres", "on"),
        (2, 1, "redis+postgres", "on"),
        (3, 1, "redis+postgres", "on"),
    ]
    for r in rows:
        assert r["errors"] == 0 and r["completed"] > 0, r.get("error_samples")

    memory = results["memory"]
    assert memory["errors"] == 0 and memory["handshakes"] == {"first": 150, "total": 300}
    assert len(memory["rss_after_each_round_mib"]) == 2
    assert _positive(memory["rss_first_mib"]) and _positive(memory["rss_total_mib"])
    assert "Crypto floor" in done.stdout and "written to" in done.stdout

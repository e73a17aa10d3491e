"""``make profile``: where a resource GET and a handshake spend their CPU, by py-spy.

cd bench && ../.venv/bin/python -m kbsbench.profile [--tag before] [--seconds 20] [--output DIR]

For each mode (``get``: resource GETs on attested cookie sessions; ``handshake``: auth, attest
and GET), the bench's own 1 replica x 2 worker server (memory sessions, local-disk resources,
audit ``fsync = always``) runs under 64 guests of the bench's load generator while
``py-spy record --subprocesses --nonblocking`` samples every worker twice over: once into a
flame graph (``profile-<mode>-<tag>.svg``) and once into collapsed stacks, from which the
CPU of one request is attributed to the parts of the release path (``PARTS`` below) and
written as ``profile-<mode>-<tag>.json``. The attribution of a stack is the outermost frame
that names a part, so a part's figure includes everything it calls (the audit record's JSON
is the audit record's). The load generator runs in its own process and is not sampled.

py-spy samples 100 times a second per thread; idle threads are not sampled, so the sampled
seconds are the workers' CPU seconds (within py-spy's sampling error). Divided by the requests
completed, they give the milliseconds of CPU one request costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kbsbench.__main__ import BENCH, loadgen
from kbsbench.servers import cluster
from kbsbench.stacks import GENERIC, PARTS, WAITING, attribute

RATE = 100  # samples per second per thread
GUESTS = 64


def profile(
    mode: str, tag: str, seconds: float, output: Path, workdir: Path, *, store: str = "memory"
) -> dict[str, Any]:
    with cluster(workdir, replicas=1, workers=2, store=store, audit_fsync="always") as (
        url,
        servers,
    ):
        pid = str(servers[0].process.pid)
        svg = output / f"profile-{mode}-{tag}.svg"
        raw = output / f"profile-{mode}-{tag}.txt"  # collapsed stacks, kept
        # both samplers start once the load has run ``2 * lead`` and stop before it ends
        lead = 3.0
        common = ["--subprocesses", "--nonblocking", "--rate", str(RATE), "-p", pid]
        common += ["--duration", str(int(seconds))]
        with ThreadPoolExecutor(max_workers=1) as pool:
            load = pool.submit(loadgen, url, mode, GUESTS, duration=seconds + 2 * lead, warmup=lead)
            time.sleep(2 * lead)  # every worker has started its policy workers and warmed up
            samplers = [
                subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        *common,
                        "--format",
                        fmt,
                        "-o",
                        str(path),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for fmt, path in (("flamegraph", svg), ("raw", raw))
            ]
            for sampler in samplers:
                sampler.wait(timeout=60)
            measured = load.result()
    parts = attribute(raw.read_text())
    waiting = parts.pop(WAITING, 0)
    sampled = sum(parts.values()) / RATE  # CPU seconds, both workers
    # requests completed while the samplers ran (the load measured ``seconds + lead`` after its
    # warm-up), assuming a steady rate
    requests = measured["completed"] * seconds / (seconds + lead)
    requests *= 3 if mode == "handshake" else 1
    per_request_ms = 1000 * sampled / requests if requests else 0.0
    rows = [
        {
            "part": name,
            "share": round(parts[name] / sum(parts.values()), 4),
            "ms_per_request": round(per_request_ms * parts[name] / sum(parts.values()), 3),
        }
        for name, _ in PARTS + GENERIC
        if parts[name]
    ]
    return {
        "mode": mode,
        "tag": tag,
        "guests": GUESTS,
        "per_second": measured["per_second"],
        "p99_ms": measured["p99_ms"],
        "errors": measured["errors"],
        "cpu_seconds_sampled": round(sampled, 2),
        "waiting_seconds_sampled": round(waiting / RATE, 2),
        "ms_cpu_per_request": round(per_request_ms, 3),
        "flame_graph": svg.name,
        "parts": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["get", "handshake"])
    parser.add_argument("--store", choices=["memory", "redis+postgres"], default="memory")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        print(f"profiling {mode} ({args.seconds:.0f} s) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="kbsprofile-") as tmp:
            result = profile(mode, args.tag, args.seconds, args.output, Path(tmp), store=args.store)
        path = args.output / f"profile-{mode}-{args.tag}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"\n{mode}: {result['per_second']:.0f}/s, p99 {result['p99_ms']:.1f} ms, "
            f"{result['ms_cpu_per_request']:.2f} ms of CPU per request "
            f"(flame graph {result['flame_graph']})"
        )
        for row in result["parts"]:
            print(f"  {row['part']:<55} {row['ms_per_request']:>7.3f} ms  {row['share']:>6.1%}")


if __name__ == "__main__":
    main()

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
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kbsbench.__main__ import BENCH, loadgen
from kbsbench.servers import cluster

RATE = 100  # samples per second per thread
GUESTS = 64

# The parts a request's CPU is attributed to: (name, frame patterns), tried in order on each
# frame from the outermost; a frame is "function (path:line)" as py-spy writes it.
PARTS: list[tuple[str, list[str]]] = [
    ("attest: evidence, verifier, attestation policy, EAR token", [r"\battest\b.*kbs/app\.py"]),
    ("auth: nonce and session", [r"\bauth\b.*kbs/app\.py"]),
    ("audit record", [r"kbs/audit\.py", r"kbs/auditing\.py"]),
    ("token: verify or recall", [r"kbs/tokens\.py"]),
    ("session store", [r"kbs/sessions\.py", r"storage/session"]),
    ("resource policy decision", [r"kbs/resource_policy\.py", r"policy/"]),
    ("resource read (version record and bytes)", [r"plugins/resource", r"storage/"]),
    ("seal: ECDH and AES-GCM (JWE)", [r"protocol/jwe\.py"]),
    ("metrics", [r"prometheus_client", r"kbs/metrics\.py"]),
    ("request parse, pydantic, response", [r"kbs/app\.py", r"kbs/calls\.py", r"pydantic"]),
    ("HTTP server (uvicorn, httptools, starlette)", [r"uvicorn", r"httptools", r"starlette"]),
    ("event loop and other", [r".*"]),
]
_COMPILED = [(name, [re.compile(p) for p in patterns]) for name, patterns in PARTS]


def attribute(collapsed: str) -> Counter[str]:
    """Samples per part, from py-spy's collapsed stacks (``frame;frame;... count``)."""
    parts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        parts[_part(frames)] += int(count)
    return parts


def _part(frames: list[str]) -> str:
    for frame in frames:
        if frame.startswith(("process ", "thread ")):
            continue  # py-spy's labels of the process and thread
        for name, patterns in _COMPILED[:-1]:
            if any(p.search(frame) for p in patterns):
                return name
    return PARTS[-1][0]


def profile(mode: str, tag: str, seconds: float, output: Path, workdir: Path) -> dict[str, Any]:
    with cluster(workdir, replicas=1, workers=2, store="memory", audit_fsync="always") as (
        url,
        servers,
    ):
        pid = str(servers[0].process.pid)
        svg = output / f"profile-{mode}-{tag}.svg"
        raw = workdir / f"profile-{mode}-{tag}.txt"
        # both samplers start a little after the load and stop before it ends: steady state
        lead = 3.0
        common = ["--subprocesses", "--nonblocking", "--rate", str(RATE), "-p", pid]
        common += ["--duration", str(int(seconds))]
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
        measured = loadgen(url, mode, GUESTS, duration=seconds + 2 * lead, warmup=lead)
        for sampler in samplers:
            sampler.wait(timeout=60)
    parts = attribute(raw.read_text())
    sampled = sum(parts.values()) / RATE  # CPU seconds, both workers
    # requests completed while the samplers ran (the load ran ``seconds + lead`` after warm-up)
    requests = measured["completed"] * seconds / (seconds + lead)
    requests *= 3 if mode == "handshake" else 1
    per_request_ms = 1000 * sampled / requests if requests else 0.0
    rows = [
        {
            "part": name,
            "share": round(parts[name] / sum(parts.values()), 4),
            "ms_per_request": round(per_request_ms * parts[name] / sum(parts.values()), 3),
        }
        for name, _ in PARTS
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
        "ms_cpu_per_request": round(per_request_ms, 3),
        "flame_graph": svg.name,
        "parts": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["get", "handshake"])
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        print(f"profiling {mode} ({args.seconds:.0f} s) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="kbsprofile-") as tmp:
            result = profile(mode, args.tag, args.seconds, args.output, Path(tmp))
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

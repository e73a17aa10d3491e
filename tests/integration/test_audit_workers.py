"""Several worker processes extend one keyed audit chain under ``flock``, and keep it one chain
when the log is rotated (renamed) under them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from keybroker.cli.kbs import main as kbs_main

WORKERS = 3
PER_PHASE = 25

# One worker: records phase 1 (some alone, some in concurrent batches), says it is ready, waits
# for the test to rotate the log, then records phase 2.
WORKER = """
import asyncio, sys, time
from pathlib import Path
from keybroker.kbs.audit import AuditLog, Chain, Checkpoints, FileSink, load_key

log, key, ready, go, name = sys.argv[1:]
audit = AuditLog(FileSink(Path(log), chain=Chain(load_key(Path(key)), Checkpoints(7, 3600))))

async def phase(number):
    async def one(i):
        await audit.record(action="attest", decision="success", target=f"{name}-{number}-{i}",
                           subject=None, request_id="r", peer=None)
    for i in range(0, PER_PHASE, 5):
        await one(i)
        await asyncio.gather(*(one(j) for j in range(i + 1, min(i + 5, PER_PHASE))))

asyncio.run(phase(1))
Path(ready).touch()
deadline = time.monotonic() + 60
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go on")
    time.sleep(0.01)
asyncio.run(phase(2))
""".replace("PER_PHASE", str(PER_PHASE))


def _wait_for(paths: list[Path]) -> None:
    deadline = time.monotonic() + 60  # a no-hang bound, not a timing assertion
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, "workers never finished their first phase"
        time.sleep(0.01)


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worker_processes_extend_one_keyed_chain_across_rotation(tmp_path: Path) -> None:
    log, key, go = tmp_path / "audit.log", tmp_path / "audit.key", tmp_path / "go"
    assert kbs_main(["audit", "keygen", "--out", str(key)]) == 0
    ready = [tmp_path / f"ready-{n}" for n in range(WORKERS)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(log), str(key), str(ready[n]), str(go), f"w{n}"]
        )
        for n in range(WORKERS)
    ]
    try:
        _wait_for(ready)
        rotated = tmp_path / "audit.log.1"
        log.rename(rotated)  # logrotate's default: rename, then the writers reopen
        go.touch()
        assert [w.wait(timeout=60) for w in workers] == [0] * WORKERS
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    assert kbs_main(["audit", "verify", "--key", str(key), str(rotated)]) == 0
    assert kbs_main(["audit", "verify", "--key", str(key), str(log)]) == 0
    old, new = _records(rotated), _records(log)
    assert [r.get("checkpoint") for r in old].count("rotated") == 1
    assert old[-1]["checkpoint"] == "rotated"
    assert new[0]["checkpoint"] == "continued" and new[0]["prev"] == old[-1]["hash"]
    assert [r.get("checkpoint") for r in new].count("continued") == 1
    assert any(r.get("checkpoint") == "interval" for r in old)

    def targets(records: list[dict[str, object]]) -> list[str]:
        return sorted(str(r["target"]) for r in records if r["action"] != "audit.checkpoint")

    def expected(phase: int) -> list[str]:
        return sorted(f"w{n}-{phase}-{i}" for n in range(WORKERS) for i in range(PER_PHASE))

    assert targets(old) == expected(1) and targets(new) == expected(2)

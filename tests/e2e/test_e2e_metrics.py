"""``/metrics`` of a real ``kbs`` with ``worker_count = 2``: the totals are the server's,
whichever worker counted a request and whichever answers the scrape, and survive a worker's
death."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from kbs_process import running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"counted, never shown"
BATCH = 8  # guest rounds at once
MAX_ROUNDS = 400  # the kernel picks the worker for each connection: stop once both have some
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n'
        "worker_count = 2\n\n"
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n\n'
        '[attestation_service]\ntype = "coco_as_builtin"\ntimeout = 5\n\n'
        '[storage_backend]\nstorage_type = "Memory"\n\n'
        '[audit]\nsink = "stdout"\n'
    )
    return config


def _no_keepalive(url: str) -> httpx.Client:
    # a fresh connection per request: uvicorn's workers share the socket, so either may answer
    return httpx.Client(
        base_url=url, limits=httpx.Limits(max_keepalive_connections=0), timeout=60.0
    )


def _guest_round(url: str) -> bytes:
    guest = KbsClient(url, http=_no_keepalive(url))
    try:
        return guest.get_resource("default/key/one")
    finally:
        guest.close()


def _scrape(url: str) -> Samples:
    with _no_keepalive(url) as http:
        reply = http.get("/metrics")
    assert reply.status_code == 200, reply.text
    return _parse(reply.text)


def _parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def _workers(pid: int) -> list[int]:
    """The server's uvicorn workers (multiprocessing's resource tracker is a child too)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _metrics_dir(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    (entry,) = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(entry.partition(b"=")[2].decode())


def _per_worker_requests(directory: Path, scratch: Path) -> dict[int, float]:
    """``kbs_http_requests_total`` as each worker counted it, from its own file alone."""
    counts = {}
    for source in directory.glob("counter_*.db"):
        pid = int(source.stem.rsplit("_", 1)[1])
        alone = scratch / str(pid)
        alone.mkdir(exist_ok=True)
        shutil.copyfile(source, alone / source.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        found = _parse(generate_latest(registry).decode())
        counts[pid] = _value(found, "kbs_http_requests_total")
    return counts


def _assert_exact_totals(found: Samples, rounds: int) -> None:
    requests = 2 + 3 * rounds  # 2 admin requests, then /auth, /attest and a GET per round
    assert _value(found, "kbs_http_requests_total") == requests
    assert _value(found, "kbs_http_request_duration_seconds_count") == requests
    assert _value(found, "kbs_http_request_size_bytes_count") == requests
    assert _value(found, "kbs_http_response_size_bytes_count") == requests
    assert _value(found, "kbs_http_active_connections") == 0
    assert _value(found, "kbs_auth_requests_total") == rounds
    assert _value(found, "kbs_auth_successes_total") == rounds
    assert _value(found, "kbs_auth_errors_total") == 0
    assert _value(found, "kbs_attestation_requests_total") == rounds
    assert _value(found, "kbs_attestation_successes_total", tee_type="sample") == rounds
    assert _value(found, "kbs_policy_evaluations_total") == rounds
    assert _value(found, "kbs_policy_approvals_total") == rounds
    assert _value(found, "kbs_resource_reads_total", resource_path="default/key/one") == rounds
    assert _value(found, "kbs_resource_writes_total", resource_path="default/key/one") == 1
    assert _value(found, "kbs_plugin_requests_total", plugin_name="resource") == rounds + 1
    assert _value(found, "kbs_build_info", **_build_labels(found)) == 1


def _build_labels(found: Samples) -> dict[str, str]:
    (labels,) = [dict(k[1]) for k in found if k[0] == "kbs_build_info"]
    return labels


def test_two_workers_give_exact_totals_and_keep_them_past_a_worker_death(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with running_kbs(["-c", str(_config(tmp_path, port))], tmp_path, url) as server:
        workers, directory = _wait_both_workers(server.pid)
        assert directory.parent.stat().st_mode & 0o777 == 0o700  # the server's private dir
        admin = AdminClient(url, http=_no_keepalive(url))
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        rounds = 0
        with ThreadPoolExecutor(max_workers=BATCH) as pool:
            while rounds < MAX_ROUNDS:
                done = list(pool.map(lambda _: _guest_round(url), range(BATCH)))
                assert done == [SECRET] * BATCH
                rounds += BATCH
                per_worker = _per_worker_requests(directory, scratch)
                if sorted(per_worker) == sorted(workers) and min(per_worker.values()) > 0:
                    break
        # the load really was spread: each worker counted some of it, in its own file
        assert sorted(per_worker) == sorted(workers) and min(per_worker.values()) > 0, per_worker
        assert sum(per_worker.values()) == 2 + 3 * rounds

        # every scrape, whichever worker answers it, sees the server's totals
        for _ in range(6):
            _assert_exact_totals(_scrape(url), rounds)

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        replacement = _wait_replaced(server.pid, victim)
        assert replacement not in workers
        _assert_exact_totals(_scrape(url), rounds)  # the dead worker's counts stay
        assert not list(directory.glob(f"gauge_livesum_{victim}.db"))  # its live gauge went
    assert not directory.exists()  # removed with the server's runtime directory


def _wait_both_workers(server: int) -> tuple[list[int], Path]:
    """Both workers, once each has built its app (and so its metric files)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = _workers(server)
        if len(workers) == 2:
            directory = _metrics_dir(workers[0])
            counting = {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("counter_*.db")}
            if counting == set(workers):
                return workers, directory
        time.sleep(0.2)
    raise AssertionError("the two workers did not both start")


def _wait_replaced(server: int, victim: int) -> int:
    """The worker the supervisor started in place of ``victim`` (it checks every 0.5 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = _workers(server)
        fresh = [w for w in workers if w != victim]
        if len(workers) == 2 and victim not in workers:
            return fresh[-1]
        time.sleep(0.2)
    raise AssertionError(f"worker {victim} was not replaced")

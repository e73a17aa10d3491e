"""The handshake rate limit in a real ``kbs`` with several worker processes: the workers share
one bucket per client through the server's private directory, whichever worker a connection
reaches."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kbs_process import running_kbs
from ports import free_port

pytestmark = pytest.mark.e2e

AUTH = {"version": "0.4.0", "tee": "sample", "extra-params": {}}
BURST = 6


def test_auth_flood_is_limited_across_worker_processes(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true
worker_count = 2

[rate_limit]
requests_per_second = 0.001
burst = {BURST}
"""
    )
    with running_kbs(["-c", str(config)], tmp_path, url):
        statuses, retry_after = [], set()
        for _ in range(4 * BURST):
            # A new connection each time: the kernel hands it to either worker.
            with httpx.Client(base_url=url, timeout=30) as client:
                reply = client.post("/kbs/v0/auth", json=AUTH)
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                retry_after.add(reply.headers["retry-after"])
                assert reply.json()["type"].endswith("/TooManyRequests")
    assert statuses == [200] * BURST + [429] * (3 * BURST)
    assert all(int(value) >= 1 for value in retry_after)

"""What an operator reads when ``kbs`` starts: one summary line after the sockets are bound,
every line (the workers' too) with its time and level, and an optional access log."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from kbs_process import running_kbs
from ports import free_port

pytestmark = pytest.mark.e2e

# "2026-12-07 06:10:08,705 WARNING keybroker.kbs.server: ..."
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def test_two_workers_log_a_summary_stamped_lines_and_requests(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\nworker_count = 2\n\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n\n'
        '[attestation_service]\ntype = "coco_as_builtin"\n\n'
        f'[audit]\npath = "{tmp_path / "audit.log"}"\n'
    )
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(config), "--access-log"], tmp_path, url):
        for _ in range(4):  # new connections: both workers answer some
            assert httpx.get(f"{url}/healthz").status_code == 200
    lines = (tmp_path / "kbs.log").read_text().splitlines()
    unstamped = [line for line in lines if line.strip() and not STAMPED.match(line)]
    assert unstamped == []
    [summary] = [line for line in lines if " serving http://" in line]
    for part in (
        f"serving http://127.0.0.1:{port} with 2 worker(s)",
        "attestation: builtin CoCo AS",
        "resources: Memory",
        "sessions: Memory",
        "admin: InsecureAllowAll",
        "tokens trusted: 0 certificate file(s), 0 JWK set(s), this server's own signer",
        f"audit: {tmp_path / 'audit.log'} (unkeyed, fsync always)",
        "/metrics: loopback",
        "console: off",
    ):
        assert part in summary
    assert any("WARNING" in line and "InsecureAllowAll" in line for line in lines)
    assert sum('"GET /healthz HTTP/1.1" 200' in line for line in lines) >= 4
    # no worker was found hung and replaced by uvicorn's supervisor while starting
    assert not any("died" in line for line in lines)

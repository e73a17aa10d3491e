"""The test harness only talks to servers it started: a server already on the port (a
developer's ``make run``, another test run) is detected, never used."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kbs_process import holds_listening_port, open_kbs_config, running_kbs, wait_healthy
from ports import free_port, worker_block


@contextmanager
def _child(code: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_health_wait_refuses_a_kbs_it_did_not_start(tmp_path: Path) -> None:
    """Another KBS answers on the port (as `make run` would on 8080): the wait fails at once
    and no request of the test reaches it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "other.toml").write_text(open_kbs_config(port, ""))
    with (
        running_kbs(["-c", str(tmp_path / "other.toml")], tmp_path, url, log_name="other.log"),
        _child("import time; time.sleep(60)") as ours,
        pytest.raises(AssertionError, match="answered by another server"),
    ):
        wait_healthy(url, ours, tmp_path / "ours.log", instance="test-ours")


def test_health_wait_stops_when_its_process_exits(tmp_path: Path) -> None:
    (tmp_path / "kbs.log").write_text("kbs: error: cannot listen on 127.0.0.1:1: denied\n")
    with (
        _child("raise SystemExit(3)") as dead,
        pytest.raises(AssertionError, match=r"exited with 3:\n.*cannot listen"),
    ):
        dead.wait()
        wait_healthy(f"http://127.0.0.1:{free_port()}", dead, tmp_path / "kbs.log", instance="x")


def test_port_holder_is_the_process_itself() -> None:
    port = free_port()
    listen = (
        "import socket, sys, time\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)\n"
    )
    with _child(listen) as server, _child("import time; time.sleep(60)") as idle:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        assert holds_listening_port(server, port)
        assert not holds_listening_port(idle, port)
    with (
        socket.create_server(("127.0.0.1", 0)) as mine,
        _child("import time; time.sleep(60)") as other,
    ):
        assert not holds_listening_port(other, mine.getsockname()[1])


def test_parallel_workers_draw_ports_from_disjoint_blocks_below_the_ephemeral_range() -> None:
    blocks = [set(worker_block(index)) for index in range(8)]
    assert all(len(block) > 1000 for block in blocks)
    assert all(not a & b for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    floor = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(max(block) for block in blocks) < floor
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # free when handed out
        pass

"""Start ``kbs`` as a real process on a free loopback port, wait for it, stop it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, verify: str | bool = True
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"kbs exited with {process.returncode}:\n{log.read_text()}")
        try:
            context = (
                ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
            )
            if httpx.get(f"{url}/healthz", timeout=1, verify=context).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"kbs did not become healthy:\n{log.read_text()}")


@contextmanager
def running_kbs(
    args: list[str],
    workdir: Path,
    url: str,
    *,
    verify: str | bool = True,
    log_name: str = "kbs.log",
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    log = workdir / log_name
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "kbs"), *args],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        wait_healthy(url, process, log, verify)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kbs_client(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kbs-client"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        env={**os.environ, **(env or {})},
    )


def kbs(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``kbs`` subcommand that exits (``audit``, ``self-signed-cert``)."""
    return subprocess.run(
        [str(BIN / "kbs"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def open_kbs_config(port: int, rest: str) -> str:
    """A test KBS config: plain HTTP on loopback ``port``, an open admin API, then ``rest``."""
    return (
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n\n'
        f'[admin]\nauthorization_mode = "InsecureAllowAll"\n\n{rest}'
    )

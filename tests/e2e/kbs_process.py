"""Start ``kbs`` as a real process on a free loopback port, wait for it, stop it.

A test only ever talks to a server it started: ``running_kbs`` names the process with a fresh
``KBS_INSTANCE_ID`` and waits until ``/healthz`` answers with that name (another server on the
port, such as a developer's ``make run``, never does); ``wait_listening`` checks that a gRPC
server's port is held by the process the test started.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from keybroker.kbs.app import INSTANCE_HEADER
from keybroker.kbs.server import INSTANCE_ENV

BIN = Path(sys.executable).parent


def wait_healthy(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    verify: str | bool = True,
    *,
    instance: str,
) -> None:
    """Until ``url`` answers ``/healthz`` as ``instance``; fails at once if the process exits
    and when a server that is not ours answers."""
    context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    deadline = time.monotonic() + 60  # a generous start-up bound for a loaded machine
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"kbs exited with {process.returncode}:\n{log.read_text()}")
        try:
            response = httpx.get(f"{url}/healthz", timeout=1, verify=context)
        except httpx.HTTPError:
            time.sleep(0.1)
            continue
        answered = response.headers.get(INSTANCE_HEADER)
        if answered != instance:
            raise AssertionError(
                f"{url} is answered by another server (instance {answered!r}, not {instance!r})"
            )
        if response.status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"kbs did not become healthy:\n{log.read_text()}")


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on TCP ``port`` (Linux ``/proc/net/tcp*``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def holds_listening_port(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` itself holds the socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    fds = Path(f"/proc/{process.pid}/fd")
    try:
        return any(os.readlink(fd) in wanted for fd in fds.iterdir())
    except FileNotFoundError:  # the process is gone (or one of its fds closed meanwhile)
        return False


def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until ``process`` listens on ``port``; fails at once if it exits first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        if holds_listening_port(process, port):
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not listen on {port}:\n{log.read_text()}")


@contextmanager
def running_kbs(
    args: list[str],
    workdir: Path,
    url: str,
    *,
    verify: str | bool = True,
    log_name: str = "kbs.log",
    env: dict[str, str] | None = None,
    bin_dir: Path = BIN,
    command: list[str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``kbs`` from ``bin_dir`` (this environment's, or one ``make background-check-kbs``
    built) with ``args``, until it answers ``/healthz``; stopped on exit. ``command`` runs
    another server that takes the same arguments instead (the benchmark's granian trial,
    ``bench/kbsbench/granian_server.py``)."""
    log = workdir / log_name
    instance = f"test-{uuid.uuid4().hex}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*(command or [str(bin_dir / "kbs")]), *args],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), INSTANCE_ENV: instance},
        )
    try:
        wait_healthy(url, process, log, verify, instance=instance)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kbs_client(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, bin_dir: Path = BIN
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "kbs-client"), *args],
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


def self_signed_cert(directory: Path, stem: str, *names: str) -> tuple[Path, Path]:
    """``kbs self-signed-cert`` into ``directory/<stem>.pem`` and ``<stem>.key`` (for ``names``,
    else its defaults): (certificate, key)."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    flags = [flag for name in names for flag in ("--name", name)]
    made = kbs("self-signed-cert", *flags, "--key-out", str(key), "--cert-out", str(cert))
    assert made.returncode == 0, made.stderr
    return cert, key


def open_kbs_config(port: int, rest: str) -> str:
    """A test KBS config: plain HTTP on loopback ``port``, an open admin API, then ``rest``."""
    return (
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n\n'
        f'[admin]\nauthorization_mode = "InsecureAllowAll"\n\n{rest}'
    )

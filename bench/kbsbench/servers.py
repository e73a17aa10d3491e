"""Real ``kbs`` processes for the benchmark: configs, start-up, provisioning, RSS, nginx.

Every server is configured as a production guest would meet it: the builtin AS with the
default attestation policy, the sample TEE's reference values registered through the admin
API (so the guest is affirming), the builtin ``affirming`` resource policy (a secret only for
a guest every submodule of whose token is affirming: the default resource policy refuses the
sample TEE outright), and the audit log on. Only the admin API is open (InsecureAllowAll), to
provision.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kbsbench.loadgen import SECRET
from keybroker.client.admin import AdminClient
from keybroker.kbs.resource_policy import builtin_policy

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
STORES = ("memory", "redis+postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signing_key(workdir: Path) -> Path:
    """One EC P-256 EAR signing key, shared by replicas (generated here, never committed)."""
    path = workdir / "token-signer.pem"
    if not path.exists():
        path.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Shared:
    """Where replicas with the ``redis+postgres`` store keep sessions and resources."""

    redis_url: str
    database: str


def write_config(
    workdir: Path,
    port: int,
    *,
    workers: int,
    store: str,
    shared: Shared | None,
    audit_fsync: str,
) -> Path:
    if store == "memory":
        storage = f'[storage_backend]\nstorage_type = "LocalFs"\nsession_storage_type = "Memory"\n\n[storage_backend.backends.local_fs]\ndir_path = "{workdir / "repository"}"\n'  # noqa: E501
    elif store == "redis+postgres" and shared is not None:
        storage = f"""[storage_backend]
storage_type = "Postgres"
session_storage_type = "Redis"

[storage_backend.backends.postgres]
db = "{shared.database}"
host = "127.0.0.1"
port = 5432

[storage_backend.backends.redis]
url = "{shared.redis_url}"
"""
    else:
        raise ValueError(f"unknown store {store!r}")
    config = workdir / f"kbs-{port}.toml"
    config.write_text(
        f"""[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true
worker_count = {workers}

[admin]
authorization_mode = "InsecureAllowAll"

[attestation_service]
type = "coco_as_builtin"
timeout = 1

[attestation_service.attestation_token_broker.signer]
key_path = "{signing_key(workdir)}"

{storage}
[audit]
sink = "file"
path = "{workdir / f"audit-{port}.log"}"
fsync = "{audit_fsync}"
"""
    )
    return config


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kbs exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"kbs did not become healthy:\n{log.read_text()}")


@dataclass
class Kbs:
    url: str
    process: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        """Resident memory of the server and its worker processes."""
        return sum(_rss(pid) for pid in _tree(self.process.pid))


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            pids += _tree(int(child))
    return pids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


@contextmanager
def running_kbs(config: Path, port: int, workdir: Path) -> Iterator[Kbs]:
    log = workdir / f"kbs-{port}.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "kbs"), "-c", str(config)],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_healthy(url, process, log)
        yield Kbs(url, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def provision(url: str) -> None:
    """The secret, the affirming resource policy, and the sample TEE's reference values: the
    guest is then affirming under the default attestation policy and gets the secret."""
    admin = AdminClient(url)
    try:
        admin.set_resource("default/bench/secret", SECRET)
        admin.set_resource_policy(builtin_policy("affirming"))
        admin.set_sample_reference_value("svn", ["1"])
        admin.set_sample_reference_value("launch_digest", ["abcde"])
        admin.set_sample_reference_value("major_version", 1)
        admin.set_sample_reference_value("minimum_minor_version", 1)
    finally:
        admin.close()


@contextmanager
def shared_stores(workdir: Path) -> Iterator[Shared]:
    sys.path.insert(0, str(ROOT / "tests"))
    from databases import fresh_postgres_database, private_redis  # noqa: PLC0415

    with fresh_postgres_database() as database, private_redis(workdir) as redis_server:
        yield Shared(redis_server.url, database)


@contextmanager
def cluster(
    workdir: Path, *, replicas: int, workers: int, store: str, audit_fsync: str
) -> Iterator[tuple[str, list[Kbs]]]:
    """``replicas`` servers (behind nginx when more than one); yields the URL guests use."""
    with ExitStack() as stack:
        shared = stack.enter_context(shared_stores(workdir)) if store != "memory" else None
        servers = []
        for _ in range(replicas):
            port = free_port()
            config = write_config(
                workdir, port, workers=workers, store=store, shared=shared, audit_fsync=audit_fsync
            )
            servers.append(stack.enter_context(running_kbs(config, port, workdir)))
        provision(servers[0].url)
        url = servers[0].url
        if replicas > 1:
            url = stack.enter_context(nginx(workdir, [s.url for s in servers]))
        yield url, servers


@contextmanager
def nginx(workdir: Path, upstreams: list[str]) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    root = workdir / f"nginx-{port}"
    root.mkdir()
    servers = "\n".join(f"    server {u.removeprefix('http://')};" for u in upstreams)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  upstream kbs {{
{servers}
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://kbs;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""
    )
    user = ["-g", "user root;"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(root), "-e", str(root / "error.log"), *user],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)

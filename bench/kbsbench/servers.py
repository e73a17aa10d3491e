"""Real ``kbs`` processes for the benchmark: configs, start-up, provisioning, RSS, nginx.

Every server is configured as a production guest would meet it: the builtin AS with the
default attestation policy, the sample TEE's reference values registered through the admin
API (so the guest is affirming), the builtin ``affirming`` resource policy (a secret only for
a guest every submodule of whose token is affirming: the default resource policy refuses the
sample TEE outright), and the audit log on, keyed (an HMAC-SHA256 chain with checkpoints). Only
the admin API is open (InsecureAllowAll), to provision, and the per-client handshake rate limit
is raised out of reach (every bench guest comes from 127.0.0.1), though still checked on every
request.

The ``upstream`` style is the configuration an operator porting an upstream ``kbs-config.toml``
writes: ``storage_type = "LocalFs"`` with no ``session_storage_type`` (so sessions are files
on disk too), the builtin AS with no signer configured (the workers share an ephemeral key),
the ``allow_all`` resource policy, and the audit log left at its default (unkeyed, ``fsync =
"always"``). Only the admin API and the rate limit are set as in every other server, for the
same reasons. ``ceiling_cluster`` runs the bare-HTTP ceiling (``kbsbench.ceiling``) on the same
stack instead of ``kbs``.

Every server is ``kbs`` (uvicorn) unless ``server="granian"`` is asked: then the same config file,
or the same ceiling app, is served by granian (``kbsbench.granian_server``, the issue 23 trial).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# the test suite's helpers for real processes: PostgreSQL, Redis, kbs, nginx
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from databases import fresh_postgres_database, private_redis  # noqa: E402
from kbs_process import running_kbs  # noqa: E402
from kbsbench.loadgen import SECRET  # noqa: E402
from keybroker.client.admin import AdminClient  # noqa: E402
from keybroker.kbs.audit import generate_key  # noqa: E402
from keybroker.kbs.resource_policy import builtin_policy  # noqa: E402
from nginx import running_nginx  # noqa: E402
from ports import free_port  # noqa: E402


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


def audit_key(workdir: Path) -> Path:
    """One audit HMAC key, shared by replicas and workers (generated here, never committed)."""
    path = workdir / "audit.key"
    if not path.exists():
        generate_key(path)
    return path


@dataclass(frozen=True)
class Shared:
    """Where replicas with the ``redis+postgres`` store keep sessions and resources."""

    redis_url: str
    database: str
    redis_port: int


# Every guest of the benchmark is 127.0.0.1: a limit per client address would throttle them all
# as one. Limits as high as the bench can reach, kept on so their cost is measured.
RATE_LIMIT = """[rate_limit]
requests_per_second = 1000000
burst = 1000000
"""


def write_config(
    workdir: Path,
    port: int,
    *,
    workers: int,
    store: str,
    shared: Shared | None,
    audit_fsync: str,
    metrics: str = "loopback",
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
{RATE_LIMIT}
[audit]
sink = "file"
path = "{workdir / f"audit-{port}.log"}"
fsync = "{audit_fsync}"
key_path = "{audit_key(workdir)}"

# Prometheus metrics: "loopback" (the default) or "off" (no HTTP metrics, no metric files)
[metrics]
access = "{metrics}"
"""
    )
    return config


def write_upstream_config(workdir: Path, port: int, *, workers: int, audit_fsync: str) -> Path:
    """The upstream-style configuration (see the module docstring)."""
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

[storage_backend]
storage_type = "LocalFs"

[storage_backend.backends.local_fs]
dir_path = "{workdir / "repository"}"

{RATE_LIMIT}
[audit]
path = "{workdir / f"audit-{port}.log"}"
fsync = "{audit_fsync}"
"""
    )
    return config


@dataclass
class Kbs:
    url: str
    process: subprocess.Popen[bytes]
    redis_port: int | None = None  # its Redis server's, in the redis+postgres store

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


SERVERS = ("uvicorn", "granian")  # what serves the app: kbs itself, or the granian trial
GRANIAN = [sys.executable, "-m", "kbsbench.granian_server"]
CEILING = [sys.executable, "-m", "kbsbench.ceiling"]


def _check_server(server: str) -> None:
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}: one of {', '.join(SERVERS)}")


@contextmanager
def running_server(
    config: Path, port: int, workdir: Path, server: str = "uvicorn"
) -> Iterator[Kbs]:
    """``kbs -c config`` or, with ``server="granian"``, the same config under granian."""
    _check_server(server)
    url = f"http://127.0.0.1:{port}"
    granian = server == "granian"
    with running_kbs(
        ["-c", str(config)],
        workdir,
        url,
        log_name=f"kbs-{port}.log",
        command=GRANIAN if granian else None,
        env={"PYTHONPATH": str(BENCH)} if granian else None,
    ) as process:
        yield Kbs(url, process)


def provision(url: str, resource_policy: str = "affirming") -> None:
    """The secret, the resource policy (by default ``affirming``), and the sample TEE's
    reference values: the guest is then affirming under the default attestation policy and
    gets the secret."""
    admin = AdminClient(url)
    try:
        admin.set_resource("default/bench/secret", SECRET)
        admin.set_resource_policy(builtin_policy(resource_policy))
        admin.set_sample_reference_value("svn", ["1"])
        admin.set_sample_reference_value("launch_digest", ["abcde"])
        admin.set_sample_reference_value("major_version", 1)
        admin.set_sample_reference_value("minimum_minor_version", 1)
    finally:
        admin.close()


@contextmanager
def shared_stores(workdir: Path) -> Iterator[Shared]:
    with fresh_postgres_database() as database, private_redis(workdir) as redis_server:
        yield Shared(redis_server.url, database, redis_server.port)


@contextmanager
def cluster(
    workdir: Path,
    *,
    replicas: int,
    workers: int,
    store: str,
    audit_fsync: str,
    metrics: str = "loopback",
    server: str = "uvicorn",
) -> Iterator[tuple[str, list[Kbs]]]:
    """``replicas`` servers (behind nginx when more than one); yields the URL guests use.
    ``store``: ``memory``, ``redis+postgres``, or ``upstream`` (one server configured in the
    upstream style, see the module docstring). ``server``: ``uvicorn`` or ``granian``."""
    with ExitStack() as stack:
        shared = stack.enter_context(shared_stores(workdir)) if store == "redis+postgres" else None
        servers = []
        for _ in range(replicas):
            port = free_port()
            if store == "upstream":
                config = write_upstream_config(
                    workdir, port, workers=workers, audit_fsync=audit_fsync
                )
            else:
                config = write_config(
                    workdir,
                    port,
                    workers=workers,
                    store=store,
                    shared=shared,
                    audit_fsync=audit_fsync,
                    metrics=metrics,
                )
            server_process = stack.enter_context(running_server(config, port, workdir, server))
            server_process.redis_port = shared.redis_port if shared is not None else None
            servers.append(server_process)
        provision(servers[0].url, "allow_all" if store == "upstream" else "affirming")
        url = servers[0].url
        if replicas > 1:
            url = stack.enter_context(_proxy(workdir, servers))
        yield url, servers


@contextmanager
def _proxy(workdir: Path, servers: list[Kbs]) -> Iterator[str]:
    proxy_dir = workdir / "nginx"
    proxy_dir.mkdir()
    ports = [int(s.url.rsplit(":", 1)[1]) for s in servers]
    with running_nginx(proxy_dir, ports) as url:
        yield url


@contextmanager
def running_ceiling(
    port: int, workers: int, workdir: Path, server: str = "uvicorn"
) -> Iterator[Kbs]:
    """The bare-HTTP ceiling server (``kbsbench.ceiling``) with ``workers`` workers, on
    Keybroker's uvicorn stack or under granian, started and stopped as ``kbs`` is."""
    _check_server(server)
    url = f"http://127.0.0.1:{port}"
    ceiling = [*GRANIAN, "--ceiling"] if server == "granian" else CEILING
    with running_kbs(
        ["--port", str(port), "--workers", str(workers)],
        workdir,
        url,
        log_name=f"ceiling-{port}.log",
        command=ceiling,
        env={"PYTHONPATH": str(BENCH)},
    ) as process:
        yield Kbs(url, process)


@contextmanager
def ceiling_cluster(
    workdir: Path, *, replicas: int, workers: int, server: str = "uvicorn"
) -> Iterator[tuple[str, list[Kbs]]]:
    """Like ``cluster``, with the ceiling server in place of ``kbs``."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(running_ceiling(free_port(), workers, workdir, server))
            for _ in range(replicas)
        ]
        url = servers[0].url if replicas == 1 else stack.enter_context(_proxy(workdir, servers))
        yield url, servers

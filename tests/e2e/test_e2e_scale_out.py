"""Scale-out: three ``kbs`` processes share PostgreSQL (resources, policies, reference values),
Redis (sessions) and one token-signing key; any request of a handshake may land on any replica.

- Through nginx round-robin (Debian's package, started here): guests use one URL, no sticky
  sessions.
- Through a client that rotates endpoints: each guest does ``/auth`` on one replica,
  ``/attest`` on the next and the resource GET on the third; a replica is killed (SIGKILL)
  mid-run, the guests fail over and every one of them gets exactly its own bytes.

The counts are printed (run with ``-s``) and quoted in docs/storage.md.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from databases import fresh_postgres_database, private_redis
from kbs_process import open_kbs_config, running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import ClientError, KbsRejectedError
from keybroker.kbs.resource_policy import builtin_policy
from nginx import running_nginx
from ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUESTS = 200
REPLICAS = 3


def _secret(guest: int) -> bytes:
    return f"secret of guest {guest}:".encode() + bytes([guest % 256]) * 64


@dataclass
class Cluster:
    ports: list[int]
    processes: list[subprocess.Popen[bytes]]
    workdir: Path

    def url(self, replica: int) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}"


def _replica_config(workdir: Path, port: int, db: str, redis_url: str, key: Path) -> Path:
    config = workdir / f"kbs-{port}.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[attestation_service]
type = "coco_as_builtin"
timeout = 5

[attestation_service.attestation_token_broker.signer]
key_path = "{key}"

[storage_backend]
storage_type = "Postgres"
session_storage_type = "Redis"

[storage_backend.backends.postgres]
db = "{db}"
host = "127.0.0.1"
port = 5432
timeout = 5

[storage_backend.backends.redis]
url = "{redis_url}"
timeout = 5

[audit]
sink = "file"
path = "{workdir / f"audit-{port}.log"}"
fsync = "never"
""",
        )
    )
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("scale-out")
    key = workdir / "token-signer.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    with ExitStack() as stack:
        db = stack.enter_context(fresh_postgres_database())
        redis_server = stack.enter_context(private_redis(workdir))
        ports = [free_port() for _ in range(REPLICAS)]
        processes = []
        for port in ports:
            config = _replica_config(workdir, port, db, redis_server.url, key)
            processes.append(
                stack.enter_context(
                    running_kbs(
                        ["-c", str(config)],
                        workdir,
                        f"http://127.0.0.1:{port}",
                        log_name=f"kbs-{port}.log",
                    )
                )
            )
        cluster = Cluster(ports, processes, workdir)
        admin = AdminClient(cluster.url(0))
        admin.set_resource_policy(builtin_policy("allow_all"))
        for guest in range(GUESTS):  # written through every replica in turn
            AdminClient(cluster.url(guest % REPLICAS)).set_resource(
                f"default/guest/{guest}", _secret(guest)
            )
        yield cluster


# --- nginx round-robin ------------------------------------------------------------------------


@pytest.fixture
def nginx(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    with running_nginx(tmp_path, cluster.ports, access_log=True) as url:
        yield url


def test_guests_behind_nginx_round_robin(cluster: Cluster, nginx: str, tmp_path: Path) -> None:
    def guest(number: int) -> bool:
        client = KbsClient(nginx)
        try:
            return client.get_resource(f"default/guest/{number}") == _secret(number)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(guest, range(GUESTS)))
    assert results.count(True) == GUESTS

    lines = (tmp_path / "access.log").read_text().splitlines()
    per_replica = Counter(line.split()[-1] for line in lines if "/kbs/v0/" in line)
    statuses = Counter(line.split()[2] for line in lines if "/kbs/v0/" in line)
    # round-robin spread every kind of request over all three replicas
    assert len(per_replica) == REPLICAS
    assert statuses == Counter({"200": 3 * GUESTS})
    print(  # quoted in docs/storage.md
        f"\nnginx: {GUESTS} guests succeeded; requests per replica {dict(per_replica)}"
    )


# --- rotating client, one replica killed --------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    served: Counter[int] = field(default_factory=Counter)
    failovers: int = 0
    restarts: int = 0


class RotatingTransport(httpx.HTTPTransport):
    """Sends each request of a guest to the next replica; skips a replica that refuses
    connections (a killed process), as a client with a list of endpoints would."""

    def __init__(self, ports: list[int], first: int, tally: Tally) -> None:
        super().__init__()
        self._ports = ports
        self._next = first
        self._tally = tally

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(len(self._ports)):
            replica = self._next % len(self._ports)
            self._next += 1
            request.url = request.url.copy_with(port=self._ports[replica])
            try:
                response = super().handle_request(request)
            except httpx.ConnectError:
                with self._tally.lock:
                    self._tally.failovers += 1
                continue
            with self._tally.lock:
                self._tally.served[replica] += 1
            return response
        raise httpx.ConnectError("no replica accepted the connection", request=request)


def test_handshake_spans_three_replicas_and_survives_a_killed_one(cluster: Cluster) -> None:
    tally = Tally()
    victim = 1
    completed = threading.Semaphore(0)
    wrong_bytes: list[int] = []

    def guest(number: int) -> bool:
        for _attempt in range(3):
            transport = RotatingTransport(cluster.ports, number % REPLICAS, tally)
            client = KbsClient(
                cluster.url(0),
                http=httpx.Client(base_url=cluster.url(0), transport=transport, timeout=10),
            )
            try:
                data = client.get_resource(f"default/guest/{number}")
            except (ClientError, KbsRejectedError):
                # the replica died in the middle of this guest's handshake: start again
                with tally.lock:
                    tally.restarts += 1
                continue
            finally:
                client.close()
            completed.release()
            if data != _secret(number):
                wrong_bytes.append(number)
                return False
            return True
        return False

    def killer() -> None:
        for _ in range(GUESTS // 3):
            completed.acquire()
        cluster.processes[victim].send_signal(signal.SIGKILL)

    assassin = threading.Thread(target=killer)
    assassin.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(guest, range(GUESTS)))
    assassin.join()

    assert cluster.processes[victim].wait(timeout=10) == -signal.SIGKILL
    assert wrong_bytes == []
    assert results.count(True) == GUESTS
    assert tally.failovers > 0  # the killed replica was really in the rotation afterwards
    assert all(tally.served[replica] > 0 for replica in range(REPLICAS))
    print(  # quoted in docs/storage.md
        f"\nrotating client: {results.count(True)}/{GUESTS} guests got their own bytes, "
        f"0 wrong; replica {victim} killed after {GUESTS // 3} guests; "
        f"requests served per replica {dict(tally.served)}; connection failovers "
        f"{tally.failovers}; handshakes restarted {tally.restarts}"
    )

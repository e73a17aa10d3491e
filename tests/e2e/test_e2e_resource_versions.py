"""Versioned resources with real processes: two ``kbs`` replicas sharing PostgreSQL, or Redis,
race writes to one resource; an operator drives listing, metadata, rollback, delete, undelete
and purge through ``kbs-client``; a guest fetches ``--version N`` under a policy that pins one;
the audit log names each version released; a resource stored before versioning is served and
migrated; the Vault backend does the same on KV v2's own versions."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from databases import fresh_postgres_database, private_redis
from kbs_process import kbs_client, open_kbs_config, running_kbs
from keybroker.client.admin import AdminClient
from ports import free_port
from standins.vault import RunningStandIn, VaultStandIn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WRITES_PER_REPLICA = 40
PATH = "tenant-a/keys/raced"
PIN_VERSION_2 = """package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	data.version == 2
}
"""


@dataclass
class Replicas:
    urls: list[str]
    workdir: Path
    backend: str
    database: str

    def audit_records(self) -> list[dict[str, object]]:
        records = []
        for log in sorted(self.workdir.glob("audit-*.log")):
            records += [json.loads(line) for line in log.read_text().splitlines()]
        return records


def _storage(backend: str, database: str) -> str:
    if backend == "postgres":
        return f"""[storage_backend]
storage_type = "Postgres"

[storage_backend.backends.postgres]
db = "{database}"
host = "127.0.0.1"
port = 5432
timeout = 5
"""
    return f"""[storage_backend]
storage_type = "Redis"

[storage_backend.backends.redis]
url = "{database}"
timeout = 5
"""


@pytest.fixture(params=["postgres", "redis"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicas]:
    with ExitStack() as stack:
        if request.param == "postgres":
            database = stack.enter_context(fresh_postgres_database())
            # a resource stored before versioning: a row in upstream's table and layout
            with psycopg.connect(
                f"host=127.0.0.1 user=postgres dbname={database}", autocommit=True
            ) as connection:
                connection.execute(
                    "CREATE TABLE repository (key TEXT PRIMARY KEY, value BYTEA NOT NULL)"
                )
                connection.execute(
                    "INSERT INTO repository VALUES (%s, %s)", ("old/key/one", b"from before")
                )
        else:
            database = stack.enter_context(private_redis(tmp_path)).url
        urls = []
        for _ in range(2):
            port = free_port()
            config = tmp_path / f"kbs-{port}.toml"
            config.write_text(
                open_kbs_config(
                    port,
                    _storage(request.param, database)
                    + f'\n[audit]\nsink = "file"\npath = "{tmp_path / f"audit-{port}.log"}"\n'
                    + 'fsync = "never"\n',
                )
            )
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(
                running_kbs(["-c", str(config)], tmp_path, url, log_name=f"kbs-{port}.log")
            )
            urls.append(url)
        yield Replicas(urls, tmp_path, request.param, database)


def _cli(replicas: Replicas, replica: int, *args: str) -> str:
    done = kbs_client("--url", replicas.urls[replica], *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_replicas_racing_writes_lose_no_version(replicas: Replicas) -> None:
    def write(index: int) -> int | None:
        admin = AdminClient(replicas.urls[index % 2])
        try:
            return admin.set_resource(PATH, f"write {index}".encode())
        finally:
            admin.close()

    total = 2 * WRITES_PER_REPLICA
    with ThreadPoolExecutor(max_workers=8) as pool:
        numbers = list(pool.map(write, range(total)))
    assert sorted(n for n in numbers if n is not None) == list(range(1, total + 1))

    meta = json.loads(_cli(replicas, 1, "config", "get-resource-meta", "--path", PATH))
    assert meta["current_version"] == total  # current = last
    # the default retention keeps the last 10, contiguous
    assert [v["version"] for v in meta["versions"]] == list(range(total - 9, total + 1))
    print(f"\n{replicas.backend}: {total} racing writes on 2 replicas -> versions 1..{total}")


def test_operator_and_guest_versions_with_real_processes(replicas: Replicas) -> None:
    workdir = replicas.workdir
    for content in (b"first", b"second", b"third"):
        (workdir / "secret").write_bytes(content)
        _cli(
            replicas,
            0,
            "config",
            "set-resource",
            "--path",
            PATH,
            "--resource-file",
            str(workdir / "secret"),
        )
    (workdir / "pin.rego").write_text(PIN_VERSION_2)
    _cli(replicas, 1, "config", "set-resource-policy", "--policy-file", str(workdir / "pin.rego"))

    # a guest asking for the pinned version gets it; the current one (3) is denied
    got = _cli(replicas, 1, "get-resource", "--path", PATH, "--version", "2")
    assert base64.b64decode(got.strip()) == b"second"
    denied = kbs_client("--url", replicas.urls[0], "get-resource", "--path", PATH)
    assert denied.returncode == 1 and "403" in denied.stderr

    _cli(replicas, 0, "config", "set-resource-policy", "--allow-all")
    _cli(replicas, 1, "config", "rollback-resource", "--path", PATH, "--version", "1")
    got = _cli(replicas, 0, "get-resource", "--path", PATH)
    assert base64.b64decode(got.strip()) == b"first"

    _cli(replicas, 0, "config", "delete-resource", "--path", PATH)
    gone = kbs_client("--url", replicas.urls[1], "get-resource", "--path", PATH)
    assert gone.returncode == 1 and "404" in gone.stderr
    _cli(replicas, 1, "config", "undelete-resource", "--path", PATH, "--version", "4")
    got = _cli(replicas, 1, "get-resource", "--path", PATH)
    assert base64.b64decode(got.strip()) == b"first"

    listed = json.loads(_cli(replicas, 0, "config", "list-resources", "--prefix", "tenant-a"))
    assert [r["name"] for r in listed["resources"]] == [PATH]
    assert listed["resources"][0]["current_version"] == 4
    assert "first" not in json.dumps(listed)  # names and versions, never values

    _cli(replicas, 1, "config", "purge-resource", "--path", PATH)
    missing = kbs_client("--url", replicas.urls[0], "config", "get-resource-meta", "--path", PATH)
    assert missing.returncode == 1 and "404" in missing.stderr

    releases = [
        (r["target"], r["reason"])
        for r in replicas.audit_records()
        if r["action"] == "release GET resource" and r["decision"] == "allow"
    ]
    assert (PATH, "version 2") in releases and (PATH, "version 4") in releases


def test_resource_stored_before_versioning_is_served_and_migrated(replicas: Replicas) -> None:
    if replicas.backend == "redis":  # the Postgres fixture seeded its table before start-up
        client = redis.Redis.from_url(replicas.database)
        client.hset("repository:old/key/one", mapping={"v": b"from before"})  # Keybroker's
        client.close()  # Redis layout, as an unversioned write left it
    _cli(replicas, 0, "config", "set-resource-policy", "--allow-all")
    got = _cli(replicas, 1, "get-resource", "--path", "old/key/one")
    assert base64.b64decode(got.strip()) == b"from before"
    listed = json.loads(_cli(replicas, 1, "config", "list-resources"))
    assert listed["resources"][0]["versioned"] is False

    (replicas.workdir / "new").write_bytes(b"new")
    _cli(
        replicas,
        0,
        "config",
        "set-resource",
        "--path",
        "old/key/one",
        "--resource-file",
        str(replicas.workdir / "new"),
    )
    got = _cli(replicas, 1, "get-resource", "--path", "old/key/one", "--version", "1")
    assert base64.b64decode(got.strip()) == b"from before"
    got = _cli(replicas, 1, "get-resource", "--path", "old/key/one")
    assert base64.b64decode(got.strip()) == b"new"


def test_vault_kv2_versions_through_a_real_kbs(tmp_path: Path) -> None:
    """The Vault backend maps versions onto KV v2's own (the Vault stand-in over HTTP)."""
    server = RunningStandIn(VaultStandIn())
    server.start()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = tmp_path / "kbs.toml"
        config.write_text(
            open_kbs_config(
                port,
                f"""[[plugins]]
name = "resource"
storage_backend_type = "vault"
vault_url = "{server.url}"
token = "{server.stand_in.root_token}"
mount_path = "kv2"
kv_version = 2
""",
            )
        )
        with running_kbs(["-c", str(config)], tmp_path, url):
            replicas = Replicas([url], tmp_path, "vault", "")
            for content in (b"first", b"second"):
                (tmp_path / "secret").write_bytes(content)
                _cli(
                    replicas,
                    0,
                    "config",
                    "set-resource",
                    "--path",
                    PATH,
                    "--resource-file",
                    str(tmp_path / "secret"),
                )
            _cli(replicas, 0, "config", "set-resource-policy", "--allow-all")
            got = _cli(replicas, 0, "get-resource", "--path", PATH, "--version", "1")
            assert base64.b64decode(got.strip()) == b"first"
            _cli(replicas, 0, "config", "rollback-resource", "--path", PATH, "--version", "1")
            meta = json.loads(_cli(replicas, 0, "config", "get-resource-meta", "--path", PATH))
            assert meta["current_version"] == 3 and meta["versioned"] is True
            assert [v["version"] for v in meta["versions"]] == [1, 2, 3]
            _cli(replicas, 0, "config", "delete-resource", "--path", PATH)
            gone = kbs_client("--url", url, "get-resource", "--path", PATH)
            assert gone.returncode == 1 and "404" in gone.stderr
            _cli(replicas, 0, "config", "undelete-resource", "--path", PATH, "--version", "3")
            got = _cli(replicas, 0, "get-resource", "--path", PATH)
            assert base64.b64decode(got.strip()) == b"first"
            listed = json.loads(
                _cli(replicas, 0, "config", "list-resources", "--prefix", "tenant-a")
            )
            assert [r["name"] for r in listed["resources"]] == [PATH]
            _cli(replicas, 0, "config", "purge-resource", "--path", PATH)
            assert "tenant-a/keys/raced" not in server.stand_in.mounts["kv2"].v2
    finally:
        server.stop()

"""The read caches across real ``kbs`` processes: replicas A and B share PostgreSQL
(resources, policies, the generation stamp) and Redis (sessions). B caches what a guest's
GET reads; an admin's change on A is what the guest's very next GET on B gets, with no wait
(the stamp A writes after each change is read by B at the start of each release)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from databases import fresh_postgres_database, private_redis
from kbs_process import open_kbs_config, running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = [pytest.mark.e2e]

ALLOW, DENY = builtin_policy("allow_all"), builtin_policy("deny_all")


@dataclass
class Pair:
    admin_a: AdminClient
    guest_b: KbsClient
    workdir: Path

    def status_on_b(self, path: str) -> int:
        try:
            self.guest_b.get_resource(path)
        except KbsRejectedError as e:
            return e.http_status
        return 200


def _config(workdir: Path, port: int, db: str, redis_url: str) -> Path:
    config = workdir / f"kbs-{port}.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[attestation_service]
type = "coco_as_builtin"

[storage_backend]
storage_type = "Postgres"
session_storage_type = "Redis"

[storage_backend.backends.postgres]
db = "{db}"
host = "127.0.0.1"
port = 5432

[storage_backend.backends.redis]
url = "{redis_url}"

[storage_cache]
enabled = true
max_age_seconds = 300

[audit]
sink = "file"
path = "{workdir / f"audit-{port}.log"}"
fsync = "never"
""",
        )
    )
    return config


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("read-cache")
    with ExitStack() as stack:
        db = stack.enter_context(fresh_postgres_database())
        redis_server = stack.enter_context(private_redis(workdir))
        urls = []
        for name in ("a", "b"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = _config(workdir, port, db, redis_server.url)
            stack.enter_context(
                running_kbs(["-c", str(config)], workdir, url, log_name=f"kbs-{name}.log")
            )
            urls.append(url)
        admin_a = AdminClient(urls[0])
        admin_a.set_resource_policy(ALLOW)
        guest_b = KbsClient(urls[1])
        guest_b.attest()
        yield Pair(admin_a, guest_b, workdir)
        admin_a.close()
        guest_b.close()


def test_both_replicas_run_with_the_cache_on(pair: Pair) -> None:
    for name in ("a", "b"):
        assert "storage cache on" in (pair.workdir / f"kbs-{name}.log").read_text()


def test_a_new_value_written_on_a_is_the_next_get_on_b(pair: Pair) -> None:
    path = "default/e2e-cache/value"
    pair.admin_a.set_resource(path, b"first")
    for _ in range(3):  # B holds it in memory now (max_age is 300 s here)
        assert pair.guest_b.get_resource(path) == b"first"
    pair.admin_a.set_resource(path, b"second")
    assert pair.guest_b.get_resource(path) == b"second"


def test_a_denying_policy_set_on_a_makes_the_next_get_on_b_403(pair: Pair) -> None:
    path = "denied/e2e-cache/value"
    pair.admin_a.set_resource(path, b"secret")
    assert pair.guest_b.get_resource(path) == b"secret"
    pair.admin_a.set_resource_policy(DENY, prefix="denied")
    try:
        assert pair.status_on_b(path) == 403
        assert pair.status_on_b("default/e2e-cache/value") == 200  # other tenants unchanged
    finally:
        pair.admin_a.delete_resource_policy("denied")
    assert pair.guest_b.get_resource(path) == b"secret"


def test_a_delete_on_a_makes_the_next_get_on_b_404(pair: Pair) -> None:
    path = "default/e2e-cache/deleted"
    pair.admin_a.set_resource(path, b"soon gone")
    assert pair.guest_b.get_resource(path) == b"soon gone"
    pair.admin_a.delete_resource(path)
    assert pair.status_on_b(path) == 404

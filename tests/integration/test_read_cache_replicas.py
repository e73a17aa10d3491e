"""The read caches across replicas on the real stores: two independent KBS apps ("replica A"
and "replica B", each its own services and caches) on one fresh PostgreSQL database
(resources, policies, the generation stamp) and one private Redis (sessions). Every change an
admin makes on A is seen by the guest's next read on B; B's reads come from its cache in
between (the stamp is the only PostgreSQL read of a repeated GET)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from databases import fresh_postgres_database, private_redis
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.app import create_app, kbs_state
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.storage.read_cache import STAMP_KEY, STAMP_NAMESPACE

PATH = "default/key/one"
ALLOW, DENY = builtin_policy("allow_all"), builtin_policy("deny_all")


@dataclass
class Replicas:
    admin_a: AdminClient
    guest_b: KbsClient
    b: TestClient
    db: str

    def status_on_b(self) -> int:
        try:
            self.guest_b.get_resource(PATH)
        except KbsRejectedError as e:
            return e.http_status
        return 200

    def stamp(self) -> bytes:
        with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={self.db}") as c:
            row = c.execute(
                f"SELECT value FROM {STAMP_NAMESPACE} WHERE key = %s",  # noqa: S608 - a constant
                (STAMP_KEY,),
            ).fetchone()
        assert row is not None
        return bytes(row[0])


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    with ExitStack() as stack:
        db = stack.enter_context(fresh_postgres_database())
        redis_server = stack.enter_context(private_redis(tmp_path))
        storage = {
            "storage_type": "Postgres",
            "session_storage_type": "Redis",
            "backends": {
                "postgres": {"db": db, "host": "127.0.0.1", "port": 5432, "timeout": 5},
                "redis": {"url": redis_server.url, "timeout": 5},
            },
        }
        a = stack.enter_context(TestClient(create_app(kbs_config(storage_backend=storage))))
        b = stack.enter_context(TestClient(create_app(kbs_config(storage_backend=storage))))
        assert kbs_state(a.app).services.read_cache.enabled
        admin_a = AdminClient("http://testserver", http=a)
        admin_a.set_resource_policy(ALLOW)
        guest_b = KbsClient("http://testserver", http=b)
        guest_b.attest()
        yield Replicas(admin_a, guest_b, b, db)


def test_resource_changes_on_a_are_seen_by_b_s_next_get(replicas: Replicas) -> None:
    admin, guest = replicas.admin_a, replicas.guest_b
    admin.set_resource(PATH, b"v1")
    assert guest.get_resource(PATH) == b"v1"
    assert guest.get_resource(PATH) == b"v1"  # from B's cache now
    cache = kbs_state(replicas.b.app).services.read_cache
    assert len(cache.records) >= 2  # the record and the policy texts
    assert len(cache.blobs) == 1  # the version's bytes
    admin.set_resource(PATH, b"v2")  # a write
    assert guest.get_resource(PATH) == b"v2"
    assert admin.rollback_resource(PATH, 1) == 3  # a rollback
    assert guest.get_resource(PATH) == b"v1"
    admin.delete_resource(PATH)  # a (soft) delete
    assert replicas.status_on_b() == 404
    admin.undelete_resource(PATH, 3)
    assert guest.get_resource(PATH) == b"v1"
    admin.purge_resource(PATH)  # a purge
    assert replicas.status_on_b() == 404
    admin.set_resource(PATH, b"after the purge")
    assert guest.get_resource(PATH) == b"after the purge"


def test_policy_changes_on_a_are_enforced_by_b_s_next_get(replicas: Replicas) -> None:
    admin = replicas.admin_a
    admin.set_resource(PATH, b"v1")
    assert replicas.status_on_b() == 200
    admin.set_resource_policy(DENY)  # the global policy
    assert replicas.status_on_b() == 403
    admin.set_resource_policy(ALLOW, prefix="default")  # a tenant policy added
    assert replicas.status_on_b() == 200
    admin.set_resource_policy(DENY, prefix="default/key")  # a more specific one
    assert replicas.status_on_b() == 403
    admin.delete_resource_policy("default/key")  # removed
    assert replicas.status_on_b() == 200
    admin.delete_resource_policy("default")
    assert replicas.status_on_b() == 403


def test_every_change_on_a_writes_a_new_stamp_in_postgres(replicas: Replicas) -> None:
    admin = replicas.admin_a
    seen = {replicas.stamp()}
    changes: list[Callable[[], object]] = [
        lambda: admin.set_resource(PATH, b"v1"),
        lambda: admin.set_resource(PATH, b"v2"),
        lambda: admin.rollback_resource(PATH, 1),
        lambda: admin.delete_resource(PATH),
        lambda: admin.purge_resource(PATH),
        lambda: admin.set_resource_policy(DENY),
        lambda: admin.set_resource_policy(ALLOW, prefix="default"),
        lambda: admin.delete_resource_policy("default"),
    ]
    for change in changes:
        change()
        stamp = replicas.stamp()
        assert stamp not in seen, "a change must leave a stamp never seen before"
        seen.add(stamp)

"""The read caches on the release path, through the real services: two service stacks
("replica A" and "replica B", each with its own caches) over one LocalFs store, every store
wrapped to count its reads and fail on demand. A guest releases through ``ReleaseService``
after the real handshake; admins change resources and policies through the same services
the admin API calls."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FakeClock, kbs_config
from keybroker.attestation.service import BuiltinAttestationService
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.config import KbsConfig
from keybroker.errors import (
    PolicyDeniedError,
    ResourceNotFoundError,
    ServiceUnavailableError,
)
from keybroker.kbs.calls import ApiCall
from keybroker.kbs.release import ReleaseService
from keybroker.kbs.resource_policy import TenantPrefix, builtin_policy
from keybroker.kbs.services import KbsServices, build_services
from keybroker.kbs.sessions import SESSION_NAMESPACE
from keybroker.kbs.tokens import pointer
from keybroker.plugins.resource import ResourcePlugin
from keybroker.protocol.canonical import runtime_data, runtime_data_digest
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import PROTOCOL_VERSION, JsonValue
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.provider import StorageProvider
from keybroker.storage.read_cache import STAMP_NAMESPACE
from keybroker.storage.secrets import SecretBackend

PATH = ("default", "key", "one")
RESOURCE = ResourcePath.from_segments(PATH)
ALLOW, DENY = builtin_policy("allow_all"), builtin_policy("deny_all")


@dataclass
class Watch:
    """Reads per namespace, and the (namespace, operation) pairs made to fail."""

    reads: Counter[str] = field(default_factory=Counter)
    failing: set[tuple[str, str]] = field(default_factory=set)


class Watched(KeyValueStorage):
    """A real LocalFs store, counted and faulted by ``watch``."""

    def __init__(self, inner: KeyValueStorage, namespace: str, watch: Watch) -> None:
        self._inner, self._namespace, self._watch = inner, namespace, watch

    def _fail(self, operation: str) -> None:
        if (self._namespace, operation) in self._watch.failing:
            raise OSError(5, "Input/output error")

    async def _get(self, key: str) -> bytes | None:
        self._fail("get")
        self._watch.reads[self._namespace] += 1
        return await self._inner.get(key)

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        self._fail("get")
        self._watch.reads[self._namespace] += 1
        return await self._inner.get_many(keys)

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        self._fail("set")
        return await self._inner.set(key, value, overwrite=overwrite, ttl=ttl)

    async def _delete(self, key: str) -> bytes | None:
        self._fail("set")
        return await self._inner.delete(key)

    async def _list(self) -> list[str]:
        return await self._inner.list_keys()

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        self._fail("set")
        return await self._inner.compare_and_set(key, expected, new)


@dataclass
class Replica:
    services: KbsServices
    release: ReleaseService
    watch: Watch
    key: TeeKey
    session_id: str = ""

    @property
    def backend(self) -> SecretBackend:
        plugin = self.services.plugins["resource"]
        assert isinstance(plugin, ResourcePlugin)
        return plugin.backend

    async def get(self, path: tuple[str, ...] = PATH) -> bytes:
        answer = await self.release.plugin(_call("GET", *path, session_id=self.session_id))
        assert isinstance(answer, dict)
        return self.key.decrypt(answer)

    async def put(self, value: bytes, path: tuple[str, ...] = PATH) -> None:
        await self.release.plugin(_call("POST", *path, body=value))


def _call(method: str, *rest: str, body: bytes = b"", session_id: str | None = None) -> ApiCall:
    return ApiCall(
        method=method,
        name="resource",
        rest=rest,
        query={},
        body=body,
        raw_path="/kbs/v0/resource/" + "/".join(rest),
        peer="192.0.2.7",
        session_id=session_id,
        authorization=None,
    )


def _config(store: Path, tmp_path: Path, name: str, **cache: object) -> KbsConfig:
    return kbs_config(
        storage_backend={"storage_type": "LocalFs", "backends": {"local_fs": {"dir_path": store}}},
        audit={"path": str(tmp_path / f"audit-{name}.log"), "fsync": "never"},
        storage_cache={"max_age_seconds": 4, **cache},
    )


@asynccontextmanager
async def _replica(config: KbsConfig, store: Path, clock: FakeClock) -> AsyncIterator[Replica]:
    watch = Watch()
    provider = StorageProvider(
        lambda namespace: Watched(LocalFsKeyValueStorage(store, namespace, clock), namespace, watch)
    )
    services = build_services(config, clock=clock, storage=provider)
    await services.start()
    try:
        replica = Replica(services, ReleaseService(services), watch, TeeKey.generate())
        replica.session_id = await _attest(replica)
        yield replica
    finally:
        await services.stop()


async def _attest(replica: Replica) -> str:
    return (await _attest_with_token(replica))[0]


async def _attest_with_token(replica: Replica) -> tuple[str, str]:
    handshake = replica.services.handshake
    assert handshake is not None
    request = {"version": PROTOCOL_VERSION, "tee": "sample", "extra-params": {}}
    challenge, session = await handshake.auth(json.dumps(request).encode())
    tee_pubkey = replica.key.public_jwk()
    data = runtime_data(challenge.nonce, tee_pubkey, "")
    evidence = SampleAttester().evidence(runtime_data_digest(data, session.hash_algorithm))
    body: JsonValue = {
        "init-data": None,
        "runtime-data": {"nonce": challenge.nonce, "tee-pubkey": tee_pubkey},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }
    token, _ = await handshake.attest(json.dumps(body).encode(), session.id)
    return session.id, token


async def _status(replica: Replica) -> JsonValue:
    """The EAR status of a fresh attestation of ``replica``'s guest."""
    _, token = await _attest_with_token(replica)
    _, claims = decode_unverified(token)
    return pointer(claims, "/submods/cpu0/ear.status")


def _sample_values(**values: JsonValue) -> str:
    payload = base64.b64encode(json.dumps(values).encode()).decode()
    return json.dumps({"version": "0.1.0", "type": "sample", "payload": payload})


AFFIRMING = 'package policy\ntrust_claims := {"hardware": 2}\n'


def _run(
    tmp_path: Path, test: Callable[[Replica, Replica, FakeClock], Awaitable[None]], **cache: object
) -> None:
    async def main() -> None:
        store, clock = tmp_path / "store", FakeClock()
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(
                _replica(_config(store, tmp_path, "a", **cache), store, clock)
            )
            b = await stack.enter_async_context(
                _replica(_config(store, tmp_path, "b", **cache), store, clock)
            )
            await a.services.resource_policy.set(ALLOW)
            await test(a, b, clock)

    asyncio.run(main())


def _store_reads(watch: Watch) -> Counter[str]:
    """The reads of a release besides its session's."""
    return Counter({ns: n for ns, n in watch.reads.items() if ns != SESSION_NAMESPACE})


def test_a_second_get_with_nothing_changed_reads_only_the_stamp(tmp_path: Path) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"value")
        b.watch.reads.clear()
        assert await b.get() == b"value"
        cold = _store_reads(b.watch)
        # the stamp once; the record, the policy texts (one get_many), the version's bytes
        assert cold == {
            STAMP_NAMESPACE: 1,
            "repository_meta": 1,
            "kbs": 1,
            "repository_versions": 1,
        }
        b.watch.reads.clear()
        assert await b.get() == b"value"
        assert _store_reads(b.watch) == {STAMP_NAMESPACE: 1}

    _run(tmp_path, test)


def test_with_the_cache_off_every_get_reads_the_store(tmp_path: Path) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        assert not b.services.read_cache.enabled
        await a.put(b"value")
        assert await b.get() == b"value"
        b.watch.reads.clear()
        assert await b.get() == b"value"
        assert _store_reads(b.watch) == {"repository_meta": 1, "kbs": 1, "repository_versions": 1}

    _run(tmp_path, test, enabled=False)


def test_changes_on_replica_a_are_seen_by_replica_b_s_next_get(tmp_path: Path) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"v1")
        assert await b.get() == b"v1"
        await a.put(b"v2")  # a write
        assert await b.get() == b"v2"
        await a.backend.rollback(RESOURCE, 1)  # a rollback
        assert await b.get() == b"v1"
        await a.backend.delete(RESOURCE)  # a delete
        with pytest.raises(ResourceNotFoundError):
            await b.get()
        await a.backend.undelete(RESOURCE, 3)
        assert await b.get() == b"v1"
        await a.backend.purge(RESOURCE, None)  # a purge
        with pytest.raises(ResourceNotFoundError):
            await b.get()

    _run(tmp_path, test)


def test_policy_changes_on_replica_a_are_enforced_by_replica_b_s_next_get(
    tmp_path: Path,
) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"v1")
        assert await b.get() == b"v1"
        await a.services.resource_policy.set(DENY)  # the global policy
        with pytest.raises(PolicyDeniedError):
            await b.get()
        tenant = TenantPrefix.parse(["default"])
        await a.services.resource_policy.set(ALLOW, tenant)  # a tenant policy added
        assert await b.get() == b"v1"
        await a.services.resource_policy.delete(tenant)  # and removed
        with pytest.raises(PolicyDeniedError):
            await b.get()

    _run(tmp_path, test)


def test_a_stamp_write_failure_answers_the_admin_503_and_b_is_stale_for_max_age_only(
    tmp_path: Path,
) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"v1")
        assert await b.get() == b"v1"
        a.watch.failing.add((STAMP_NAMESPACE, "set"))
        with pytest.raises(ServiceUnavailableError) as refused:
            await a.put(b"v2")
        assert "the change was stored" in refused.value.detail
        assert "up to 4 seconds" in refused.value.detail
        record = json.loads((tmp_path / "audit-a.log").read_text().splitlines()[-1])
        assert (record["action"], record["decision"]) == ("admin POST resource", "failure")
        assert await a.get() == b"v2"  # the writer's process dropped its own entries
        assert await b.get() == b"v1"  # stale on B ...
        clock.advance(4.5)
        assert await b.get() == b"v2"  # ... for max_age at most

    _run(tmp_path, test)


def test_stamp_read_failure_fails_the_release_closed(tmp_path: Path) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"v1")
        assert await b.get() == b"v1"  # B has it in memory now
        b.watch.failing.add((STAMP_NAMESPACE, "get"))
        with pytest.raises(ServiceUnavailableError) as refused:
            await b.get()
        assert refused.value.status == 503
        record = json.loads((tmp_path / "audit-b.log").read_text().splitlines()[-1])
        assert (record["action"], record["decision"]) == ("release GET resource", "failure")
        assert "generation stamp could not be read" in record["reason"]

    _run(tmp_path, test)


def test_the_memory_store_is_never_cached(tmp_path: Path) -> None:
    services = build_services(kbs_config(), clock=FakeClock())
    assert not services.read_cache.enabled


def test_a_secret_backend_outside_the_kv_store_is_never_cached(tmp_path: Path) -> None:
    """The directory tree (like Vault, AWS, GCP, Aliyun and PKCS#11) changes outside the
    KBS: no stamp would tell, so its bytes are read on every GET, cache on or not."""
    store, tree = tmp_path / "store", tmp_path / "tree"
    config = kbs_config(
        storage_backend={"storage_type": "LocalFs", "backends": {"local_fs": {"dir_path": store}}},
        plugins=[{"name": "resource", "type": "LocalFs", "dir_path": str(tree)}],
    )
    resource = tree.joinpath(*PATH)
    resource.parent.mkdir(parents=True)

    async def main() -> None:
        async with _replica(config, store, FakeClock()) as replica:
            assert replica.services.read_cache.enabled  # for the policies
            await replica.services.resource_policy.set(ALLOW)
            resource.write_bytes(b"v1")
            assert await replica.get() == b"v1"
            resource.write_bytes(b"edited by the operator")
            assert await replica.get() == b"edited by the operator"

    asyncio.run(main())


def test_a_policy_set_whose_stamp_cannot_be_written_is_a_503_and_b_follows_within_max_age(
    tmp_path: Path,
) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await a.put(b"v1")
        assert await b.get() == b"v1"
        a.watch.failing.add((STAMP_NAMESPACE, "set"))
        with pytest.raises(ServiceUnavailableError, match="the change was stored"):
            await a.services.resource_policy.set(DENY)
        assert await b.get() == b"v1"  # B still holds the allowing policy ...
        clock.advance(4.5)
        with pytest.raises(PolicyDeniedError):  # ... for max_age at most
            await b.get()

    _run(tmp_path, test)


def _attestation(replica: Replica) -> BuiltinAttestationService:
    attestation = replica.services.attestation
    assert isinstance(attestation, BuiltinAttestationService)
    return attestation


def test_a_second_attestation_with_nothing_changed_reads_only_the_stamp(tmp_path: Path) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        await _attest(b)  # the first of this generation fills the cache
        b.watch.reads.clear()
        await _attest(b)
        assert _store_reads(b.watch) == {STAMP_NAMESPACE: 1}

    _run(tmp_path, test)


def test_attestation_policy_and_reference_values_changed_on_a_are_b_s_next_attestation(
    tmp_path: Path,
) -> None:
    async def test(a: Replica, b: Replica, clock: FakeClock) -> None:
        assert await _status(b) == "contraindicated"  # no reference values yet
        names = await _attestation(a).register_reference_value(
            _sample_values(svn=["1"], launch_digest=["abcde"], major_version=1)
        )
        await _attestation(a).register_reference_value(_sample_values(minimum_minor_version=1))
        assert await _status(b) == "affirming"
        assert await _attestation(a).delete_reference_value(names[0])
        assert await _status(b) == "contraindicated"
        await _attestation(a).set_policy("default_cpu", AFFIRMING)
        assert await _status(b) == "affirming"
        await _attestation(a).delete_policy("default_cpu")  # the shipped text again
        assert await _status(b) == "contraindicated"
        # the cached reads were real: with nothing changed, B reads only the stamp
        await _status(b)
        b.watch.reads.clear()
        await _status(b)
        assert set(_store_reads(b.watch)) == {STAMP_NAMESPACE}

    _run(tmp_path, test)

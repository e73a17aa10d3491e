"""Flood defences of the handshake: per-client rate limits on /auth and /attest (429 with
Retry-After), X-Forwarded-For believed only from trusted proxies, and a cap on unattested
sessions that sheds the oldest, in process and across replicas sharing Redis."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from test_kbs_attacks import AUTH, _attestation, _problem

from conftest import FakeClock, kbs_config
from databases import private_redis
from keybroker.client.keys import TeeKey
from keybroker.config import KbsConfig
from keybroker.kbs.app import create_app
from keybroker.kbs.limits import (
    MAX_FORWARDED_HOPS,
    Bucket,
    LocalBuckets,
    LocalUnattested,
    SharedFileBuckets,
    client_key,
    spend,
)

FLOODER = ("203.0.113.7", 40000)
NEIGHBOUR = ("198.51.100.9", 40001)
PROXY = ("10.0.0.1", 40002)
TOO_MANY = "TooManyRequests"


def _config(tmp_path: Path | None = None, **rate_limit: object) -> KbsConfig:
    sections: dict[str, object] = {"rate_limit": rate_limit}
    if tmp_path is not None:  # sessions on disk, as in the reported flood
        sections["storage_backend"] = {
            "storage_type": "LocalFs",
            "backends": {"local_fs": {"dir_path": str(tmp_path)}},
        }
    return kbs_config(**sections)


@contextmanager
def _clients(app: Any, *addresses: tuple[str, int]) -> Iterator[list[TestClient]]:
    """One client per address, all on ``app`` (the first runs the app's lifespan)."""
    with ExitStack() as stack:
        yield [stack.enter_context(TestClient(app, client=address)) for address in addresses]


def _auth(client: TestClient, headers: dict[str, str] | None = None) -> int:
    status: int = client.post("/kbs/v0/auth", json=AUTH, headers=headers).status_code
    return status


def _handshake(client: TestClient) -> int:
    reply = client.post("/kbs/v0/auth", json=AUTH)
    if reply.status_code != 200:
        return int(reply.status_code)
    attestation = _attestation(reply.json()["nonce"], TeeKey.generate())
    return int(client.post("/kbs/v0/attest", json=attestation).status_code)


# --- rate limit -------------------------------------------------------------------------------


def test_auth_flood_from_one_client_is_429_with_retry_after(clock: FakeClock) -> None:
    app = create_app(_config(requests_per_second=0.5, burst=5), clock=clock)
    with _clients(app, FLOODER) as [flooder]:
        assert [_auth(flooder) for _ in range(5)] == [200] * 5
        reply = flooder.post("/kbs/v0/auth", json=AUTH)
        detail = _problem(reply, 429, TOO_MANY)
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.headers["retry-after"] == "2"  # one token every 2 s
        assert "203.0.113.7" in detail
        # /attest draws on the same bucket, and is refused before its body is even read.
        reply = flooder.post("/kbs/v0/attest", content=b"x" * 100)
        _problem(reply, 429, TOO_MANY)
        clock.advance(2)  # time is injected: the bucket refills by the clock, not by sleeping
        assert _auth(flooder) == 200
        assert _auth(flooder) == 429


def test_other_clients_are_not_throttled_by_a_flooder(clock: FakeClock) -> None:
    app = create_app(_config(requests_per_second=1, burst=3), clock=clock)
    with _clients(app, FLOODER, NEIGHBOUR) as [flooder, neighbour]:
        assert [_auth(flooder) for _ in range(6)] == [200] * 3 + [429] * 3
        assert _handshake(neighbour) == 200


def test_ipv6_flooder_cannot_rotate_addresses_within_its_64(clock: FakeClock) -> None:
    app = create_app(_config(requests_per_second=1, burst=3), clock=clock)
    hosts = [(f"2001:db8:1:2::{n:x}", 40000) for n in range(1, 5)]
    with _clients(app, *hosts, ("2001:db8:1:3::1", 40000)) as clients:
        assert [_auth(client) for client in clients[:4]] == [200] * 3 + [429]
        assert _auth(clients[4]) == 200  # another /64 is another client


def test_rate_limit_can_be_disabled(clock: FakeClock) -> None:
    app = create_app(_config(enabled=False, burst=1), clock=clock)
    with _clients(app, FLOODER) as [flooder]:
        assert [_auth(flooder) for _ in range(5)] == [200] * 5


def test_rate_limit_is_on_by_default_with_generous_values() -> None:
    limits = kbs_config().rate_limit
    assert limits.enabled and limits.burst >= 1000 and limits.requests_per_second >= 20
    assert limits.trusted_proxies == [] and limits.max_unattested_sessions >= 10_000


# --- X-Forwarded-For --------------------------------------------------------------------------


def test_x_forwarded_for_is_ignored_unless_from_a_trusted_proxy(clock: FakeClock) -> None:
    # No trusted proxy at all, then a trusted proxy that is not this peer: either way a
    # flooder writing a fresh X-Forwarded-For on every request stays in its own bucket.
    for trusted in ([], ["192.0.2.1", "10.1.0.0/16"]):
        app = create_app(
            _config(requests_per_second=1, burst=3, trusted_proxies=trusted), clock=clock
        )
        with _clients(app, FLOODER) as [flooder]:
            spoofed = [{"X-Forwarded-For": f"192.0.2.{n}"} for n in range(10, 16)]
            assert [_auth(flooder, h) for h in spoofed] == [200] * 3 + [429] * 3


def test_x_forwarded_for_from_trusted_proxy_is_used(clock: FakeClock) -> None:
    app = create_app(
        _config(requests_per_second=1, burst=3, trusted_proxies=["10.0.0.0/8"]), clock=clock
    )
    with _clients(app, PROXY) as [proxy]:
        behind_flooder = {"X-Forwarded-For": "203.0.113.7"}
        assert [_auth(proxy, behind_flooder) for _ in range(4)] == [200] * 3 + [429]
        # Another guest behind the same proxy has its own bucket.
        assert _auth(proxy, {"X-Forwarded-For": "198.51.100.9"}) == 200
        # The flooder prepending a forged hop: the proxy appended the real address last.
        assert _auth(proxy, {"X-Forwarded-For": "192.0.2.77, 203.0.113.7"}) == 429
        # A chain of trusted proxies is walked from the right to the first untrusted hop.
        assert _auth(proxy, {"X-Forwarded-For": "203.0.113.7, 10.9.9.9"}) == 429


def test_trusting_every_peer_as_a_proxy_is_named_unsafe(caplog: pytest.LogCaptureFixture) -> None:
    create_app(_config(trusted_proxies=["10.0.0.0/8", "::/0"]))
    assert "any client can set X-Forwarded-For" in caplog.text


def test_forwarded_for_garbage_or_overlong_chain_buys_no_fresh_bucket() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_key("10.0.0.1", ["not-an-ip"], trusted_proxies=trusted) == "ip:10.0.0.1"
    assert client_key("10.0.0.1", ["203.0.113.7, junk, 10.0.0.2"], trusted_proxies=trusted) == (
        "ip:10.0.0.2"
    )
    # Only the last hops are read: a client cannot make the KBS walk a huge header.
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.9"] * (MAX_FORWARDED_HOPS + 5))
    assert client_key("10.0.0.1", [chain], trusted_proxies=trusted) == "ip:10.0.0.9"
    assert client_key("::ffff:203.0.113.7", [], trusted_proxies=[]) == "ip:203.0.113.7"
    assert client_key(None, [], trusted_proxies=trusted) == "host:unknown"


def test_token_bucket_refills_by_the_injected_clock_and_tolerates_a_clock_going_back() -> None:
    bucket, wait = spend(None, 100.0, rate=2.0, burst=2)
    assert (bucket, wait) == (Bucket(1.0, 100.0), 0.0)
    bucket, wait = spend(bucket, 100.0, rate=2.0, burst=2)
    bucket, wait = spend(bucket, 90.0, rate=2.0, burst=2)  # backwards: nothing refilled
    assert wait == 0.5
    bucket, wait = spend(bucket, 1e6, rate=2.0, burst=2)  # a long pause refills to the burst
    assert bucket.tokens == 1.0 and wait == 0.0


def test_tracked_clients_are_bounded() -> None:
    buckets = LocalBuckets(1.0, 1, max_clients=3)

    async def scenario() -> None:
        for n in range(10):
            await buckets.take(f"ip:192.0.2.{n}", 0.0)

    asyncio.run(scenario())
    assert buckets.tracked_clients == 3


# --- across the workers of one server -----------------------------------------------------------


def test_rate_limit_holds_across_workers_sharing_the_memory_dir(
    clock: FakeClock, tmp_path: Path
) -> None:
    # Each worker process builds its own app on the directory the server shares with them
    # (kbs.server.worker_app); two apps on one directory are two workers.
    config = _config(requests_per_second=1, burst=4)
    workers = [create_app(config, clock=clock, memory_dir=tmp_path) for _ in range(2)]
    with _clients(workers[0], FLOODER) as [on_1], _clients(workers[1], FLOODER) as [on_2]:
        assert [_auth(c) for c in (on_1, on_2, on_1, on_2, on_1, on_2)] == [200] * 4 + [429] * 2
        with _clients(workers[1], NEIGHBOUR) as [neighbour]:
            assert _auth(neighbour) == 200


def test_shared_bucket_table_is_bounded_and_reuses_the_stalest_slot(tmp_path: Path) -> None:
    table = tmp_path / "buckets"
    first = SharedFileBuckets(table, rate=0.001, burst=1, slots=4)
    second = SharedFileBuckets(table, rate=0.001, burst=1, slots=4)  # another worker

    async def scenario() -> list[bool]:
        for now, client in enumerate("abcd"):
            assert await first.take(client, float(now)) == 0.0
        admitted = [await second.take("d", 4.0) == 0.0]  # d is known: its bucket is empty
        admitted.append(await second.take("e", 5.0) == 0.0)  # a fifth client: a's slot goes
        admitted.append(await first.take("a", 6.0) == 0.0)  # so a starts again, full
        return admitted

    try:
        assert asyncio.run(scenario()) == [False, True, True]
        assert table.stat().st_size == 48 + 4 * 32 and table.stat().st_mode & 0o777 == 0o600
    finally:
        first.close()
        second.close()


# --- unattested sessions ----------------------------------------------------------------------


def _session_files(tmp_path: Path) -> set[str]:
    """Session records on disk (not the ``.attempt`` markers of claimed nonces)."""
    directory = tmp_path / "kbs_protocol_session"
    return {p.name for p in directory.iterdir() if len(p.name) == 32}


def test_unattested_session_cap_sheds_the_oldest(clock: FakeClock, tmp_path: Path) -> None:
    app = create_app(_config(tmp_path, max_unattested_sessions=3), clock=clock)
    addresses = [(f"192.0.2.{n}", 40000) for n in range(1, 11)]
    with _clients(app, *addresses) as clients:
        first, second, *rest = clients
        nonces = [c.post("/kbs/v0/auth", json=AUTH).json()["nonce"] for c in (first, second)]
        attested = first.post("/kbs/v0/attest", json=_attestation(nonces[0], TeeKey.generate()))
        assert attested.status_code == 200  # attested: no longer counts against the cap
        assert [_auth(client) for client in rest] == [200] * 8
        # Only the three newest unattested sessions (and the attested one) are left on disk.
        assert len(_session_files(tmp_path)) == 4
        reply = second.post("/kbs/v0/attest", json=_attestation(nonces[1], TeeKey.generate()))
        assert "start again with /auth" in _problem(reply, 401, "AttestationError")
        # The newest ones still complete, and the attested guest keeps its session.
        for client in rest[-3:]:
            nonce = client.post("/kbs/v0/auth", json=AUTH).json()["nonce"]
            reply = client.post("/kbs/v0/attest", json=_attestation(nonce, TeeKey.generate()))
            assert reply.status_code == 200
        assert first.cookies.get("kbs-session-id") in _session_files(tmp_path)


def test_unattested_index_drops_claimed_sessions_and_sheds_in_arrival_order() -> None:
    index = LocalUnattested(2)

    async def scenario() -> list[list[str]]:
        shed = [await index.add("a"), await index.add("b")]
        await index.remove("a")
        shed += [await index.add("c"), await index.add("d")]
        return shed

    assert asyncio.run(scenario()) == [[], [], [], ["b"]]


# --- across replicas sharing Redis ------------------------------------------------------------


def test_rate_limit_and_session_cap_hold_across_two_replicas_sharing_redis(
    clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with private_redis(tmp_path) as redis_server:
        config = kbs_config(
            storage_backend={
                "storage_type": "Memory",
                "session_storage_type": "Redis",
                "backends": {"redis": {"url": redis_server.url}},
            },
            rate_limit={"requests_per_second": 1, "burst": 4, "max_unattested_sessions": 2},
        )
        replicas = [create_app(config, clock=clock, instance_id=f"r{n}") for n in (1, 2)]
        with ExitStack() as stack:

            def client(replica: int, address: tuple[str, int]) -> TestClient:
                return stack.enter_context(TestClient(replicas[replica], client=address))

            on_a, on_b = client(0, FLOODER), client(1, FLOODER)
            # One bucket for the flooder whichever replica it reaches.
            assert [_auth(c) for c in (on_a, on_b, on_a, on_b, on_a, on_b)] == [200] * 4 + [429] * 2
            reply = on_b.post("/kbs/v0/auth", json=AUTH)
            assert reply.headers["retry-after"] == "1"
            clock.advance(1)
            assert _auth(on_a) == 200 and _auth(on_b) == 429

            # One cap for both: the third unattested session, on either replica, sheds the
            # oldest, opened on the other one.
            guests = [client(n % 2, (f"192.0.2.{n}", 40000)) for n in range(3)]
            nonces = [g.post("/kbs/v0/auth", json=AUTH).json()["nonce"] for g in guests]
            moved = client(1, ("192.0.2.0", 40000))
            moved.cookies.update(guests[0].cookies)
            reply = moved.post("/kbs/v0/attest", json=_attestation(nonces[0], TeeKey.generate()))
            assert "start again with /auth" in _problem(reply, 401, "AttestationError")
            for guest, nonce in zip(guests[1:], nonces[1:], strict=True):
                reply = guest.post("/kbs/v0/attest", json=_attestation(nonce, TeeKey.generate()))
                assert reply.status_code == 200

"""The one collateral fetcher (keybroker.verifiers.collateral_fetch), driven through its real
interfaces against a real HTTPS server on loopback that counts what it is asked: bounded memory
and disk caches, expiry, single-flight, the offline directory, deadlines, size caps, and damaged
cache files."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.kbs.tls import self_signed_certificate
from keybroker.verifiers.collateral_fetch import (
    FOREVER,
    CacheLimits,
    CollateralCache,
    HttpsSource,
    Keeping,
    OfflineDirectory,
    keep_bytes,
)
from standins.server import ServedApp

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
MAX_BYTES = 4096


class Origin:
    """A collateral service for these tests (not a stand-in for any vendor's): ``GET /item/<name>``
    answers ``items[name]``; ``POST`` or ``DELETE /item/<name>`` answers it too, with status
    ``status_of_sent`` and the request kept in ``sent``. Instrumentation: ``requests`` (paths
    served, in order), ``hold`` (answers wait on it), ``available`` (False: 503), ``drip`` (the
    body one byte at a time, a byte every 50 ms, for up to 10 s)."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.hold: threading.Event | None = None
        self.available = True
        self.drip = False
        self.sent: list[Sent] = []
        self.status_of_sent = 200

    def count(self, name: str) -> int:
        return self.requests.count(f"/item/{name}")

    async def item(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        status = 200
        if request.method != "GET":
            body = await request.body()
            self.sent.append(Sent(request.method, request.url.query, dict(request.headers), body))
            status = self.status_of_sent
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 10)
        if not self.available:
            return Response("unavailable", status_code=503)
        found = self.items.get(request.path_params["name"])
        if found is None:
            return Response(status_code=404)
        if self.drip:
            return StreamingResponse(_drip(), status_code=status)
        return Response(found, status_code=status)

    def app(self) -> Starlette:
        methods = ["GET", "POST", "DELETE"]
        return Starlette(routes=[Route("/item/{name:str}", self.item, methods=methods)])


@dataclass(frozen=True)
class Sent:
    method: str
    query: str
    headers: dict[str, str]
    body: bytes


async def _drip() -> AsyncIterator[bytes]:
    for _ in range(200):
        yield b"x"
        await asyncio.sleep(0.05)


@dataclass
class Served:
    origin: Origin
    server: ServedApp
    ca_pem: bytes
    opened: list[HttpsSource] = field(default_factory=list)

    def source(self, **options: object) -> HttpsSource:
        settings: dict[str, object] = {"ca_pem": self.ca_pem, "timeout": 5.0, **options}
        source = HttpsSource(
            self.server.url,
            service="the test origin",
            max_bytes=MAX_BYTES,
            **settings,  # type: ignore[arg-type]
        )
        self.opened.append(source)
        return source


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
    (tmp_path / "origin.key").write_bytes(key_pem)
    (tmp_path / "origin.crt").write_bytes(cert_pem)
    origin = Origin()
    origin.items = {name: f"item {name}".encode() for name in "abcdefgh"}
    server = ServedApp(
        origin.app(), certfile=tmp_path / "origin.crt", keyfile=tmp_path / "origin.key"
    )
    server.start()
    served = Served(origin, server, cert_pem)
    try:
        yield served
    finally:
        if origin.hold is not None:
            origin.hold.set()
        for source in served.opened:
            source.close()
        server.stop()


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


FOR_A_DAY = keep_bytes(lambda _: NOW + datetime.timedelta(days=1))
FOR_GOOD = keep_bytes(lambda _: FOREVER)
NEVER = keep_bytes(lambda _: None)


def _getter(
    cache: CollateralCache, source: HttpsSource, keeping: Keeping[bytes] = FOR_A_DAY
) -> Callable[[str], bytes]:
    return lambda name: cache.get(name, lambda: source.get(f"/item/{name}").body, keeping)


def _wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (bounded: a stuck test fails instead of hanging)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.01)


# --- memory cache --------------------------------------------------------------------------------


def test_memory_cache_is_bounded_in_entries_and_evicts_the_least_recently_used(
    served: Served,
) -> None:
    cache = CollateralCache(limits=CacheLimits(memory_entries=2), clock=Clock(NOW))
    get = _getter(cache, served.source())
    get("a"), get("b"), get("a")  # a is now more recent than b
    assert get("c") == b"item c"
    assert cache.held() == 2
    get("a")  # still held
    get("b")  # evicted: fetched again
    assert served.origin.requests == ["/item/a", "/item/b", "/item/c", "/item/b"]


def test_memory_cache_is_bounded_in_bytes(served: Served) -> None:
    cache = CollateralCache(limits=CacheLimits(memory_bytes=13), clock=Clock(NOW))
    get = _getter(cache, served.source())
    get("a"), get("b")  # six bytes each: both fit
    assert cache.held() == 2
    get("c")  # a third would be 18 bytes: a goes
    assert cache.held() == 2
    get("a")
    assert served.origin.count("a") == 2 and served.origin.count("c") == 1


def test_item_larger_than_the_memory_bound_is_served_but_not_held(served: Served) -> None:
    cache = CollateralCache(limits=CacheLimits(memory_bytes=5), clock=Clock(NOW))
    get = _getter(cache, served.source())
    assert get("a") == b"item a" and cache.held() == 0


# --- disk cache ----------------------------------------------------------------------------------


def _memoryless(**limits: object) -> CacheLimits:
    """Every get reaches the disk cache."""
    return CacheLimits(memory_entries=0, **limits)  # type: ignore[arg-type]


def test_disk_cache_is_bounded_in_files_and_evicts_the_least_recently_used(
    served: Served, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    cache = CollateralCache(directory, limits=_memoryless(disk_entries=2), clock=Clock(NOW))
    get = _getter(cache, served.source())
    get("a"), get("b"), get("a")  # a read from its file: now more recent than b
    assert served.origin.requests == ["/item/a", "/item/b"]
    get("c")
    assert sorted(os.listdir(directory)) == ["a", "c"]
    get("b")
    assert served.origin.count("b") == 2


def test_disk_cache_is_bounded_in_bytes(served: Served, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = CollateralCache(directory, limits=_memoryless(disk_bytes=15), clock=Clock(NOW))
    get = _getter(cache, served.source())
    for name in "abcde":
        get(name)
    assert sorted(os.listdir(directory)) == ["d", "e"]  # 12 bytes; a third file would be 18


def test_disk_cache_survives_a_restart_with_private_files(served: Served, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    _getter(CollateralCache(directory, clock=Clock(NOW)), served.source())("a")
    served.origin.available = False
    again = _getter(CollateralCache(directory, clock=Clock(NOW)), served.source())
    assert again("a") == b"item a"  # another process: from the file, no request
    assert served.origin.requests == ["/item/a"]
    assert stat.S_IMODE((directory / "a").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def _json_keeping() -> Keeping[dict[str, str]]:
    return Keeping(
        encode=lambda value: json.dumps(value).encode(),
        decode=lambda data: dict(json.loads(data)),
        expires=lambda _: NOW + datetime.timedelta(days=1),
    )


@pytest.mark.parametrize("damage", [b"{not json", b"", b"\x00" * (MAX_BYTES + 1)])
def test_corrupt_disk_cache_file_is_ignored_and_fetched_again(
    served: Served, tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "a").write_bytes(damage)
    served.origin.items["a"] = b'{"good": "yes"}'
    cache = CollateralCache(directory, limits=CacheLimits(item_bytes=MAX_BYTES), clock=Clock(NOW))
    source = served.source()
    fetch = lambda: json.loads(source.get("/item/a").body)  # noqa: E731
    with caplog.at_level(logging.WARNING):
        assert cache.get("a", fetch, _json_keeping()) == {"good": "yes"}
    assert served.origin.requests == ["/item/a"]
    assert json.loads((directory / "a").read_bytes()) == {"good": "yes"}  # replaced
    assert "collateral cache file" in caplog.text


def test_symlink_planted_in_the_cache_directory_is_not_followed(
    served: Served, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (tmp_path / "elsewhere").write_bytes(b"planted")
    (directory / "a").symlink_to(tmp_path / "elsewhere")
    cache = CollateralCache(directory, clock=Clock(NOW))
    assert _getter(cache, served.source())("a") == b"item a"
    assert served.origin.requests == ["/item/a"]
    assert (tmp_path / "elsewhere").read_bytes() == b"planted"  # replaced the link, not its target


def test_cache_key_naming_a_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    cache = CollateralCache(tmp_path / "cache", clock=Clock(NOW))
    with pytest.raises(ServiceUnavailableError, match="refusing the collateral cache key"):
        cache.get("../escaped", lambda: b"x", FOR_GOOD)
    assert not (tmp_path / "escaped").exists()


# --- expiry --------------------------------------------------------------------------------------


def test_expired_item_is_fetched_again_from_memory_and_disk(served: Served, tmp_path: Path) -> None:
    clock = Clock(NOW)
    cache = CollateralCache(tmp_path / "cache", clock=clock)
    get = _getter(cache, served.source())
    get("a"), get("a")
    assert served.origin.count("a") == 1
    clock.now = NOW + datetime.timedelta(days=1)  # the item's own expiry
    get("a")
    assert served.origin.count("a") == 2


def test_expired_disk_file_is_not_trusted_after_a_restart(served: Served, tmp_path: Path) -> None:
    _getter(CollateralCache(tmp_path / "cache", clock=Clock(NOW)), served.source())("a")
    later = Clock(NOW + datetime.timedelta(days=2))
    _getter(CollateralCache(tmp_path / "cache", clock=later), served.source())("a")
    assert served.origin.count("a") == 2


def test_max_age_caps_an_item_kept_for_good(served: Served, tmp_path: Path) -> None:
    clock = Clock(NOW)
    limits = CacheLimits(max_age=datetime.timedelta(hours=1))
    get = _getter(CollateralCache(limits=limits, clock=clock), served.source(), FOR_GOOD)
    get("a")
    clock.now = NOW + datetime.timedelta(minutes=59)
    get("a")
    assert served.origin.count("a") == 1
    clock.now = NOW + datetime.timedelta(hours=1)
    get("a")
    assert served.origin.count("a") == 2


def test_max_age_of_a_disk_file_counts_from_when_it_was_written(
    served: Served, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    limits = CacheLimits(max_age=datetime.timedelta(hours=1))
    written = datetime.datetime.now(datetime.UTC)
    _getter(CollateralCache(directory, limits=limits, clock=lambda: written), served.source())("a")
    two_hours_on = Clock(written + datetime.timedelta(hours=2))
    _getter(CollateralCache(directory, limits=limits, clock=two_hours_on), served.source())("a")
    assert served.origin.count("a") == 2


def test_item_without_an_expiry_is_served_but_kept_nowhere(served: Served, tmp_path: Path) -> None:
    cache = CollateralCache(tmp_path / "cache", clock=Clock(NOW))
    get = _getter(cache, served.source(), NEVER)
    assert get("a") == b"item a" and get("a") == b"item a"
    assert served.origin.count("a") == 2
    assert cache.held() == 0 and not (tmp_path / "cache").exists()


# --- single-flight -------------------------------------------------------------------------------


def _concurrently(callers: int, call: Callable[[], bytes]) -> list[bytes | BaseException]:
    results: list[bytes | BaseException] = [b""] * callers

    def run(index: int) -> None:
        try:
            results[index] = call()
        except BaseException as e:  # handed back to the test
            results[index] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return results


def _release_when_waiting(
    cache: CollateralCache, key: str, followers: int, hold: threading.Event
) -> threading.Thread:
    """Opens ``hold`` once ``followers`` callers wait for the fetch of ``key`` in progress."""

    def release() -> None:
        _wait_for(lambda: cache.waiting(key) == followers)
        hold.set()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_concurrent_callers_share_one_upstream_request(served: Served) -> None:
    served.origin.hold = threading.Event()
    cache = CollateralCache(clock=Clock(NOW))
    get = _getter(cache, served.source())
    callers = 8
    release = _release_when_waiting(cache, "a", callers - 1, served.origin.hold)
    results = _concurrently(callers, lambda: get("a"))
    release.join(20)
    assert results == [b"item a"] * callers
    assert served.origin.requests == ["/item/a"]


def test_callers_sharing_a_failed_fetch_all_get_503(served: Served) -> None:
    served.origin.hold = threading.Event()
    served.origin.available = False
    cache = CollateralCache(clock=Clock(NOW))
    get = _getter(cache, served.source())
    release = _release_when_waiting(cache, "a", 3, served.origin.hold)
    results = _concurrently(4, lambda: get("a"))
    release.join(20)
    assert all(isinstance(r, ServiceUnavailableError) and "HTTP 503" in r.detail for r in results)
    assert served.origin.requests == ["/item/a"]
    served.origin.available = True
    assert get("a") == b"item a"  # a failure is not kept


def test_concurrent_coroutines_in_worker_threads_share_one_request(served: Served) -> None:
    """The way the attestation service calls verifiers: asyncio.to_thread."""
    served.origin.hold = threading.Event()
    cache = CollateralCache(clock=Clock(NOW))
    get = _getter(cache, served.source())

    async def main() -> list[bytes]:
        calls = [asyncio.to_thread(get, "a") for _ in range(3)]
        waiting = asyncio.to_thread(_wait_for, lambda: cache.waiting("a") == 2)
        gathered = asyncio.gather(*calls)
        await waiting
        served.origin.hold.set()  # type: ignore[union-attr]
        return list(await gathered)

    assert asyncio.run(main()) == [b"item a"] * 3
    assert served.origin.requests == ["/item/a"]


def test_a_slow_fetch_of_one_key_does_not_hold_up_another(served: Served) -> None:
    cache = CollateralCache(clock=Clock(NOW))
    get = _getter(cache, served.source())
    get("b")
    served.origin.hold = threading.Event()
    slow = threading.Thread(target=get, args=("a",))
    slow.start()
    _wait_for(lambda: served.origin.count("a") == 1)
    assert get("b") == b"item b"  # from memory while a's fetch is still held
    assert slow.is_alive()
    served.origin.hold.set()
    slow.join(20)
    assert served.origin.requests == ["/item/b", "/item/a"]


# --- HTTPS ---------------------------------------------------------------------------------------


def test_timeout_is_503_before_the_service_answers(served: Served) -> None:
    served.origin.hold = threading.Event()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        served.source(timeout=0.3).get("/item/a")
    assert not served.origin.hold.is_set()  # the service had not answered yet


def test_service_dripping_bytes_is_cut_off_at_the_deadline(served: Served) -> None:
    served.origin.drip = True  # each byte well within the read timeout, the whole far beyond
    with pytest.raises(ServiceUnavailableError, match=r"no full answer within 0\.5 s"):
        served.source(timeout=0.5).get("/item/a")


def test_oversized_response_is_refused(served: Served) -> None:
    served.origin.items["big"] = b"x" * (MAX_BYTES + 1)
    with pytest.raises(ServiceUnavailableError, match=f"sent more than {MAX_BYTES} bytes"):
        served.source().get("/item/big")
    served.origin.items["fits"] = b"x" * MAX_BYTES
    assert len(served.source().get("/item/fits").body) == MAX_BYTES


def test_error_status_is_503(served: Served) -> None:
    with pytest.raises(ServiceUnavailableError, match="HTTP 404"):
        served.source().get("/item/unknown")


def test_unreachable_service_is_503(served: Served) -> None:
    source = served.source()
    served.server.stop()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        source.get("/item/a")


def test_untrusted_tls_certificate_is_503(served: Served) -> None:
    source = HttpsSource(served.server.url, service="the test origin", max_bytes=MAX_BYTES)
    served.opened.append(source)
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        source.get("/item/a")


def test_plain_http_is_refused_unless_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="not HTTPS"):
        HttpsSource("http://collateral.example", service="x", max_bytes=1)
    with pytest.raises(ConfigError, match="not HTTPS"):
        HttpsSource("ftp://collateral.example", service="x", max_bytes=1, insecure_http=True)
    source = HttpsSource("https://collateral.example", service="x", max_bytes=1)
    with pytest.raises(ConfigError, match="not HTTPS"):  # an absolute URL is held to it too
        source.get("http://elsewhere.example/crl")
    origin = Origin()
    origin.items["a"] = b"item a"
    server = ServedApp(origin.app())
    server.start()
    insecure = HttpsSource(server.url, service="x", max_bytes=MAX_BYTES, insecure_http=True)
    try:
        with caplog.at_level(logging.WARNING):
            assert insecure.get("/item/a").body == b"item a"
    finally:
        insecure.close()
        server.stop()
    assert "INSECURE" in caplog.text


def test_send_posts_a_json_body_and_answers_any_status(served: Served) -> None:
    served.origin.status_of_sent = 400  # e.g. a verification service refusing the evidence
    answer = served.source().send(
        "POST", "/item/a", params={"nonce": "AQI"}, json={"evidence": ["x", 1]}
    )
    assert (answer.status, answer.body) == (400, b"item a")
    assert answer.url == f"{served.server.url}/item/a?nonce=AQI"
    (sent,) = served.origin.sent
    assert (sent.method, sent.query) == ("POST", "nonce=AQI")
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.body) == {"evidence": ["x", 1]}


def test_send_posts_bytes_with_headers_and_deletes(served: Served) -> None:
    source = served.source()
    media_type = 'application/eat-collection; profile="x"'
    answer = source.send(
        "POST", "/item/b", content=b"\x00token", headers={"Content-Type": media_type}
    )
    assert answer.body == b"item b" and answer.headers["content-length"] == "6"
    source.send("DELETE", f"{served.server.url}/item/b")
    posted, deleted = served.origin.sent
    assert (posted.body, posted.headers["content-type"]) == (b"\x00token", media_type)
    assert (deleted.method, deleted.body) == ("DELETE", b"")


def test_oversized_answer_to_a_post_is_refused(served: Served) -> None:
    served.origin.items["big"] = b"x" * (MAX_BYTES + 1)
    with pytest.raises(ServiceUnavailableError, match=f"sent more than {MAX_BYTES} bytes"):
        served.source().send("POST", "/item/big", json={})
    served.origin.status_of_sent = 400  # a refusal is held to the same cap
    with pytest.raises(ServiceUnavailableError, match=f"sent more than {MAX_BYTES} bytes"):
        served.source().send("POST", "/item/big", json={})


def test_post_timeout_is_503_naming_the_service(served: Served) -> None:
    served.origin.hold = threading.Event()
    with pytest.raises(ServiceUnavailableError, match=r"the test origin .* cannot be reached"):
        served.source(timeout=0.3).send("POST", "/item/a", json={})
    assert not served.origin.hold.is_set()  # the service had not answered yet


def test_post_answer_dripping_bytes_is_cut_off_at_the_deadline(served: Served) -> None:
    served.origin.drip = True
    with pytest.raises(ServiceUnavailableError, match=r"no full answer within 0\.5 s"):
        served.source(timeout=0.5).send("POST", "/item/a", content=b"evidence")


def test_send_to_an_unreachable_service_is_503(served: Served) -> None:
    source = served.source()
    served.server.stop()
    with pytest.raises(ServiceUnavailableError, match="cannot be reached"):
        source.send("POST", "/item/a", json={})


def test_send_over_plain_http_is_refused_unless_insecure() -> None:
    source = HttpsSource("https://service.example", service="x", max_bytes=1)
    with pytest.raises(ConfigError, match="not HTTPS"):
        source.send("POST", "http://service.example/session", json={})


# --- offline directory ---------------------------------------------------------------------------


def test_offline_directory_hit_and_miss(tmp_path: Path) -> None:
    (tmp_path / "crl").mkdir()
    (tmp_path / "crl" / "Genoa.der").write_bytes(b"crl")
    offline = OfflineDirectory(tmp_path, max_bytes=MAX_BYTES)
    assert offline.read("crl/Genoa.der") == b"crl"
    assert offline.read_if_present("crl/Milan.der") is None
    with pytest.raises(ServiceUnavailableError, match="No such file in the offline collateral"):
        offline.read("crl/Milan.der")


def test_offline_name_outside_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"not collateral")
    offline = OfflineDirectory(tmp_path / "store", max_bytes=MAX_BYTES)
    for name in ("../secret", "crl/../../secret", "/etc/passwd", ".hidden", ""):
        with pytest.raises(ServiceUnavailableError, match="refusing the offline collateral name"):
            offline.read(name)


def test_oversized_offline_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.der").write_bytes(b"x" * (MAX_BYTES + 1))
    with pytest.raises(ServiceUnavailableError, match=f"larger than {MAX_BYTES} bytes"):
        OfflineDirectory(tmp_path, max_bytes=MAX_BYTES).read("big.der")

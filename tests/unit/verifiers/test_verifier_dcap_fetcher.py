"""DCAP collateral fetchers: the production PcsFetcher against a PCS stand-in on loopback
HTTPS, the on-disk cache in front of it, and the offline directory layout. What they fetch is
handed to the verifier, which must accept it; every failure is a ServiceUnavailableError."""

from __future__ import annotations

import datetime
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import vector
from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.kbs.tls import self_signed_certificate
from keybroker.verifiers.intel.dcap import Quote, parse_quote
from keybroker.verifiers.intel.dcap_collateral import (
    Collateral,
    CollateralRequest,
    collateral_request,
    signed_member,
    verify_collateral,
)
from keybroker.verifiers.intel.dcap_fetcher import (
    CachingFetcher,
    CollateralFetcher,
    DirectoryFetcher,
    PcsFetcher,
    crl_der,
)
from standins.intel_pcs import PcsStandIn
from standins.intel_pki import IntelPki
from standins.server import ServedApp

NOW = datetime.datetime(2025, 11, 1, tzinfo=datetime.UTC)
NEXT_UPDATE = datetime.datetime(2025, 11, 26, 13, 7, 17, tzinfo=datetime.UTC)  # TCB Info's


@dataclass
class World:
    pki: IntelPki
    quote: Quote
    request: CollateralRequest
    collateral: Collateral


@pytest.fixture(scope="module")
def world() -> World:
    pki = IntelPki()
    recorded = parse_quote(vector("verifier", "tdx_quote_6.dat").read_bytes())
    quote = pki.quote(recorded, pki.pck(recorded.pck_chain[0]))
    verifier = vector("verifier")
    collateral = pki.collateral(
        tcb_info_body=signed_member((verifier / "tcbInfo.json").read_bytes(), "tcbInfo")[0],
        qe_identity_body=signed_member(
            (verifier / "enclaveIdentity.json").read_bytes(), "enclaveIdentity"
        )[0],
        now=NOW,
    )
    return World(pki, quote, collateral_request(quote, quote.pck_chain[0]), collateral)


@dataclass
class Pcs:
    stand_in: PcsStandIn
    server: ServedApp
    ca_pem: bytes
    opened: list[PcsFetcher] = field(default_factory=list)

    def fetcher(self, **options: object) -> PcsFetcher:
        settings: dict[str, object] = {"ca_pem": self.ca_pem, "timeout": 5.0, **options}
        fetcher = PcsFetcher(self.server.url, **settings)  # type: ignore[arg-type]
        self.opened.append(fetcher)
        return fetcher


@pytest.fixture
def pcs(world: World, tmp_path: Path) -> Iterator[Pcs]:
    key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
    (tmp_path / "pcs.key").write_bytes(key_pem)
    (tmp_path / "pcs.crt").write_bytes(cert_pem)
    stand_in = PcsStandIn()
    stand_in.serve(world.request, world.collateral)
    server = ServedApp(stand_in.app(), certfile=tmp_path / "pcs.crt", keyfile=tmp_path / "pcs.key")
    server.start()
    pcs = Pcs(stand_in, server, cert_pem)
    try:
        yield pcs
    finally:
        if stand_in.hold is not None:
            stand_in.hold.set()
        for fetcher in pcs.opened:  # idle keep-alive connections would hold up the shutdown
            fetcher.close()
        server.stop()


def _verifies(world: World, collateral: Collateral) -> None:
    verdict = verify_collateral(world.quote, collateral, NOW, root=world.pki.root.cert)
    assert verdict.claims()["tcb_status"] == "OutOfDate"


# --- PcsFetcher --------------------------------------------------------------------------------


def test_pcs_fetcher_brings_what_the_verifier_accepts(world: World, pcs: Pcs) -> None:
    fetched = pcs.fetcher().fetch(world.request)
    assert fetched == world.collateral  # the hex Root CA CRL of a PCCS is back to DER
    _verifies(world, fetched)


def test_pcs_fetcher_speaks_the_v4_api(world: World, pcs: Pcs) -> None:
    pcs.fetcher().fetch(world.request)
    assert pcs.stand_in.requests == [
        "/tdx/certification/v4/tcb?fmspc=00A06D080000&update=early",
        "/tdx/certification/v4/qe/identity?update=early",
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/sgx/certification/v4/rootcacrl",
    ]


def test_root_ca_crl_from_the_distribution_point_as_intel_serves_it(world: World, pcs: Pcs) -> None:
    fetcher = pcs.fetcher(root_ca_crl_url=f"{pcs.server.url}/IntelSGXRootCA.der", update="standard")
    _verifies(world, fetcher.fetch(world.request))
    assert pcs.stand_in.requests[0].endswith("update=standard")
    assert pcs.stand_in.requests[-1] == "/IntelSGXRootCA.der"


def test_api_path_in_the_base_url_is_tolerated(world: World, pcs: Pcs) -> None:
    fetcher = PcsFetcher(f"{pcs.server.url}/sgx/certification/v4/", ca_pem=pcs.ca_pem)
    pcs.opened.append(fetcher)
    assert fetcher.fetch(world.request) == world.collateral


def test_unavailable_service_is_service_unavailable(world: World, pcs: Pcs) -> None:
    pcs.stand_in.available = False
    with pytest.raises(ServiceUnavailableError, match="HTTP 503"):
        pcs.fetcher().fetch(world.request)


def test_unreachable_service_is_service_unavailable(world: World, pcs: Pcs) -> None:
    fetcher = pcs.fetcher()
    pcs.server.stop()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        fetcher.fetch(world.request)


def test_unknown_fmspc_is_service_unavailable(world: World, pcs: Pcs) -> None:
    other = replace(world.request, fmspc=bytes.fromhex("90C06F000000"))
    with pytest.raises(ServiceUnavailableError, match="HTTP 404"):
        pcs.fetcher().fetch(other)


def test_missing_issuer_chain_is_service_unavailable(world: World, pcs: Pcs) -> None:
    pcs.stand_in.omit_chains = True
    with pytest.raises(ServiceUnavailableError, match="no TCB-Info-Issuer-Chain header"):
        pcs.fetcher().fetch(world.request)


def test_oversized_response_is_refused(world: World, pcs: Pcs) -> None:
    pcs.stand_in.oversize = True
    with pytest.raises(ServiceUnavailableError, match="more than 1048576 bytes"):
        pcs.fetcher().fetch(world.request)


def test_slow_service_times_out(world: World, pcs: Pcs) -> None:
    pcs.stand_in.hold = threading.Event()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        pcs.fetcher(timeout=0.3).fetch(world.request)


def test_plain_http_is_refused_unless_insecure(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="not HTTPS"):
        PcsFetcher("http://pcs.example")
    stand_in = PcsStandIn()
    stand_in.serve(world.request, world.collateral)
    server = ServedApp(stand_in.app())
    server.start()
    fetcher = PcsFetcher(server.url, insecure_http=True)
    try:
        with caplog.at_level(logging.WARNING):
            fetched = fetcher.fetch(world.request)
    finally:
        fetcher.close()
        server.stop()
    assert fetched == world.collateral
    assert "INSECURE" in caplog.text


def test_crls_are_read_as_der_pem_or_hex(world: World) -> None:
    der = world.collateral.pck_crl
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    assert crl_der(der) == der and crl_der(der.hex().encode() + b"\n") == der
    assert crl_der(pem) == pem  # the verifier reads PEM itself
    with pytest.raises(ServiceUnavailableError):
        crl_der(b"not a CRL")


# --- CachingFetcher ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def test_cache_serves_until_the_earliest_next_update(
    world: World, pcs: Pcs, tmp_path: Path
) -> None:
    clock = Clock(NOW)
    cache = CachingFetcher(pcs.fetcher(), tmp_path / "cache", clock=clock)
    assert cache.fetch(world.request) == world.collateral
    assert cache.fetch(world.request) == world.collateral
    assert len(pcs.stand_in.requests) == 4  # one round of four requests
    clock.now = NEXT_UPDATE
    cache.fetch(world.request)
    assert len(pcs.stand_in.requests) == 8


def test_cache_file_is_private_and_replaced_atomically(
    world: World, pcs: Pcs, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    clock = Clock(NOW)
    cache = CachingFetcher(pcs.fetcher(), directory, clock=clock)
    cache.fetch(world.request)
    clock.now = NEXT_UPDATE
    cache.fetch(world.request)
    files = os.listdir(directory)
    assert files == ["tdx-00a06d080000-platform.json"]  # no temporary file left behind
    assert stat.S_IMODE((directory / files[0]).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_second_process_reads_the_cache_file_and_then_holds_it(
    world: World, pcs: Pcs, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    clock = Clock(NOW)
    CachingFetcher(pcs.fetcher(), directory, clock=clock).fetch(world.request)
    second = CachingFetcher(pcs.fetcher(), directory, clock=clock)
    assert second.fetch(world.request) == world.collateral  # from the file: no request
    (directory / "tdx-00a06d080000-platform.json").unlink()
    assert second.fetch(world.request) == world.collateral  # held in memory: no file read
    assert len(pcs.stand_in.requests) == 4
    clock.now = NEXT_UPDATE
    assert second.fetch(world.request) == world.collateral  # the held copy expired too
    assert len(pcs.stand_in.requests) == 8


def test_damaged_cache_file_is_fetched_again(world: World, pcs: Pcs, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "tdx-00a06d080000-platform.json").write_text("{not json")
    cache = CachingFetcher(pcs.fetcher(), directory, clock=Clock(NOW))
    assert cache.fetch(world.request) == world.collateral
    assert len(pcs.stand_in.requests) == 4


def test_failed_refresh_is_an_error_not_stale_collateral(
    world: World, pcs: Pcs, tmp_path: Path
) -> None:
    clock = Clock(NOW)
    cache = CachingFetcher(pcs.fetcher(), tmp_path / "cache", clock=clock)
    cache.fetch(world.request)
    pcs.stand_in.available = False
    assert cache.fetch(world.request) == world.collateral  # still fresh: no request made
    clock.now = NEXT_UPDATE
    with pytest.raises(ServiceUnavailableError):
        cache.fetch(world.request)


def test_concurrent_quotes_share_one_round_of_pcs_requests(world: World, pcs: Pcs) -> None:
    pcs.stand_in.hold = threading.Event()
    cache = CachingFetcher(pcs.fetcher(), None, clock=Clock(NOW))
    results: list[Collateral] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch(world.request)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10  # bounded: a broken single-flight fails, never hangs
    while cache.cache.waiting("tdx-00a06d080000-platform.json") != 3:
        assert time.monotonic() < deadline, "the other quotes never waited for the first fetch"
        time.sleep(0.01)
    pcs.stand_in.hold.set()
    for thread in threads:
        thread.join(20)
    assert results == [world.collateral] * 4
    assert len(pcs.stand_in.requests) == 4  # one round of four requests


# --- DirectoryFetcher --------------------------------------------------------------------------


def _lay_out(directory: Path, collateral: Collateral) -> None:
    """The offline layout, as an operator copies it from PCS responses."""
    (directory / "fmspc" / "00A06D080000").mkdir(parents=True)
    files = {
        "fmspc/00A06D080000/tdx-tcb-info.json": collateral.tcb_info,
        "fmspc/00A06D080000/tdx-tcb-info-issuer-chain.pem": collateral.tcb_info_issuer_chain,
        "tdx-qe-identity.json": collateral.qe_identity,
        "tdx-qe-identity-issuer-chain.pem": collateral.qe_identity_issuer_chain,
        "pck-crl-platform.der": collateral.pck_crl,
        "pck-crl-platform-issuer-chain.pem": collateral.pck_crl_issuer_chain,
        "root-ca-crl.der": collateral.root_ca_crl.hex().encode(),  # as a PCCS serves it
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)


def test_directory_fetcher_reads_the_layout_per_fmspc(world: World, tmp_path: Path) -> None:
    _lay_out(tmp_path, world.collateral)
    fetched = DirectoryFetcher(tmp_path).fetch(world.request)
    assert fetched == world.collateral
    _verifies(world, fetched)


def test_directory_fetcher_without_the_fmspc_is_service_unavailable(
    world: World, tmp_path: Path
) -> None:
    _lay_out(tmp_path, world.collateral)
    other = replace(world.request, fmspc=bytes.fromhex("90C06F000000"))
    fetcher: CollateralFetcher = DirectoryFetcher(tmp_path)
    with pytest.raises(ServiceUnavailableError, match="90C06F000000"):
        fetcher.fetch(other)

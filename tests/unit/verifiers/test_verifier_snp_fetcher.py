"""SNP collateral: the production KdsFetcher against a KDS stand-in on loopback HTTPS, the
on-disk cache in front of it, the offline directory, the fallback list, and the settings that
build them (ours and upstream's). What they fetch is handed to the appraiser, which must accept
it; every fetch failure is a ServiceUnavailableError."""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeClock, vector
from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.kbs.tls import self_signed_certificate
from keybroker.verifiers.amd.snp import SnpAppraiser, SnpVerifier, parse_evidence, parse_report
from keybroker.verifiers.amd.snp_certs import KeyKind, pinned_roots
from keybroker.verifiers.amd.snp_fetcher import (
    KdsFetcher,
    SnpCachingFetcher,
    SnpDirectoryFetcher,
    SnpFallbackFetcher,
    VcekRequest,
)
from keybroker.verifiers.amd.snp_report import Product, SnpReport, TcbVersion
from keybroker.verifiers.amd.snp_settings import build_snp_appraiser, build_snp_fetcher
from standins.amd_kds import KdsStandIn
from standins.amd_pki import AmdPki, build_report
from standins.server import ServedApp

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)
NEXT_UPDATE = NOW + datetime.timedelta(days=7)


def _e2e() -> dict[str, Any]:
    document = json.loads(vector("attestation-service", "e2e-evidence.json").read_text())
    assert isinstance(document, dict)
    return document


@dataclass
class Real:
    """The e2e Genoa report and the VCEK KDS files it under (AMD's, from the vectors)."""

    report: SnpReport
    vcek: bytes
    request: VcekRequest


@pytest.fixture(scope="module")
def real() -> Real:
    document = _e2e()
    report, _ = parse_evidence({**document, "cert_chain": None})
    vcek = bytes(document["cert_chain"][0]["data"])
    return Real(report, vcek, VcekRequest(Product.GENOA, report.chip_id, report.reported_tcb))


@pytest.fixture(scope="module")
def pki() -> AmdPki:
    return AmdPki(Product.GENOA)


@dataclass
class Kds:
    stand_in: KdsStandIn
    server: ServedApp
    ca_pem: bytes
    opened: list[KdsFetcher] = field(default_factory=list)

    def fetcher(self, **options: Any) -> KdsFetcher:
        settings: dict[str, Any] = {"ca_pem": self.ca_pem, "timeout": 5.0, **options}
        fetcher = KdsFetcher(self.server.url, **settings)
        self.opened.append(fetcher)
        return fetcher


@pytest.fixture
def kds(real: Real, pki: AmdPki, tmp_path: Path) -> Iterator[Kds]:
    key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
    (tmp_path / "kds.key").write_bytes(key_pem)
    (tmp_path / "kds.crt").write_bytes(cert_pem)
    stand_in = KdsStandIn()
    stand_in.serve_vcek(Product.GENOA, real.report.chip_id, real.report.reported_tcb, real.vcek)
    stand_in.crls["Genoa"] = pki.crl(this_update=NOW, next_update=NEXT_UPDATE)
    stand_in.cert_chains["vcek", "Genoa"] = pki.ask.pem() + pki.ark.pem()
    stand_in.cert_chains["vlek", "Genoa"] = pki.asvk.pem() + pki.ark.pem()
    server = ServedApp(stand_in.app(), certfile=tmp_path / "kds.crt", keyfile=tmp_path / "kds.key")
    server.start()
    kds = Kds(stand_in, server, cert_pem)
    try:
        yield kds
    finally:
        if stand_in.hold is not None:
            stand_in.hold.set()
        for fetcher in kds.opened:  # idle keep-alive connections would hold up the shutdown
            fetcher.close()
        server.stop()


# --- KdsFetcher ----------------------------------------------------------------------------------


def test_kds_fetcher_brings_the_vcek_the_appraiser_accepts(real: Real, kds: Kds) -> None:
    fetcher = kds.fetcher()
    assert fetcher.vcek(real.request) == real.vcek
    SnpAppraiser(fetcher, insecure_skip_crl=True).verify(real.report, [], NOW)


def test_kds_fetcher_speaks_the_documented_api(real: Real, kds: Kds) -> None:
    fetcher = kds.fetcher()
    fetcher.vcek(real.request)
    fetcher.crl(Product.GENOA)
    fetcher.cert_chain(Product.GENOA, KeyKind.VCEK)
    fetcher.cert_chain(Product.GENOA, KeyKind.VLEK)
    assert kds.stand_in.requests == [
        f"/vcek/v1/Genoa/{real.report.chip_id.hex()}?blSPL=10&teeSPL=00&snpSPL=23&ucodeSPL=25",
        "/vcek/v1/Genoa/crl",
        "/vcek/v1/Genoa/cert_chain",
        "/vlek/v1/Genoa/cert_chain",
    ]


def test_turin_vcek_url_has_the_short_hwid_and_the_fmc_spl(kds: Kds) -> None:
    tcb = TcbVersion(bootloader=1, tee=0, snp=4, microcode=70, fmc=2)
    hwid = bytes.fromhex("0123456789abcdef")
    kds.stand_in.serve_vcek(Product.TURIN, hwid, tcb, b"0\x00")
    assert kds.fetcher().vcek(VcekRequest(Product.TURIN, hwid, tcb)) == b"0\x00"
    assert kds.stand_in.requests == [
        "/vcek/v1/Turin/0123456789abcdef?fmcSPL=02&blSPL=01&teeSPL=00&snpSPL=04&ucodeSPL=70"
    ]


def test_kds_with_the_crl_and_the_stand_in_pki_verifies_end_to_end(pki: AmdPki, kds: Kds) -> None:
    tcb = TcbVersion(bootloader=10, tee=0, snp=23, microcode=25)
    chip = os.urandom(64)
    vcek = pki.endorsement_key(tcb, chip_id=chip)
    kds.stand_in.serve_vcek(Product.GENOA, chip, tcb, vcek.der())
    report = build_report(vcek.signer(), tcb=tcb, chip_id=chip)
    appraiser = SnpAppraiser(kds.fetcher(), roots=pki.roots())
    appraiser.verify(parse_report(report), [], NOW)
    assert kds.stand_in.requests[-1] == "/vcek/v1/Genoa/crl"


def test_kds_unavailable_is_service_unavailable(real: Real, kds: Kds) -> None:
    kds.stand_in.available = False
    with pytest.raises(ServiceUnavailableError, match="HTTP 503"):
        SnpAppraiser(kds.fetcher(), insecure_skip_crl=True).verify(real.report, [], NOW)


def test_unreachable_kds_is_service_unavailable(real: Real, kds: Kds) -> None:
    fetcher = kds.fetcher()
    kds.server.stop()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        fetcher.vcek(real.request)


def test_unknown_vcek_is_service_unavailable(real: Real, kds: Kds) -> None:
    other = VcekRequest(Product.GENOA, real.report.chip_id, TcbVersion(10, 0, 24, 25))
    with pytest.raises(ServiceUnavailableError, match="HTTP 404"):
        kds.fetcher().vcek(other)


def test_oversized_kds_response_is_refused(real: Real, kds: Kds) -> None:
    kds.stand_in.oversize = True
    with pytest.raises(ServiceUnavailableError, match="more than 262144 bytes"):
        kds.fetcher().vcek(real.request)


def test_slow_kds_times_out(real: Real, kds: Kds) -> None:
    kds.stand_in.hold = threading.Event()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        kds.fetcher(timeout=0.3).crl(Product.GENOA)


def test_plain_http_is_refused_unless_insecure(
    real: Real, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="not HTTPS"):
        KdsFetcher("http://kds.example")
    stand_in = KdsStandIn()
    stand_in.serve_vcek(Product.GENOA, real.report.chip_id, real.report.reported_tcb, real.vcek)
    server = ServedApp(stand_in.app())
    server.start()
    fetcher = KdsFetcher(server.url + "/", insecure_http=True)
    try:
        with caplog.at_level(logging.WARNING):
            fetched = fetcher.vcek(real.request)
    finally:
        fetcher.close()
        server.stop()
    assert fetched == real.vcek
    assert "INSECURE" in caplog.text


# --- SnpCachingFetcher -----------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def test_vcek_is_cached_on_disk_for_good(real: Real, kds: Kds, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    clock = Clock(NOW)
    assert SnpCachingFetcher(kds.fetcher(), directory, clock=clock).vcek(real.request) == real.vcek
    name = f"vcek-Genoa-{real.report.chip_id.hex()}-bl10_tee00_snp23_ucode25.der"
    assert os.listdir(directory) == [name]  # no temporary file left behind
    assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    clock.now = NOW + datetime.timedelta(days=3650)
    kds.stand_in.available = False
    second = SnpCachingFetcher(kds.fetcher(), directory, clock=clock)  # another process
    assert second.vcek(real.request) == real.vcek
    assert len(kds.stand_in.requests) == 1


def test_crl_is_cached_until_its_next_update(pki: AmdPki, kds: Kds, tmp_path: Path) -> None:
    clock = Clock(NOW)
    cache = SnpCachingFetcher(kds.fetcher(), tmp_path / "cache", clock=clock)
    first = cache.crl(Product.GENOA)
    assert cache.crl(Product.GENOA) == first
    (tmp_path / "cache" / "crl-Genoa.der").unlink()
    assert cache.crl(Product.GENOA) == first  # held in memory: no file read
    assert kds.stand_in.requests == ["/vcek/v1/Genoa/crl"]
    clock.now = NEXT_UPDATE
    newer = pki.crl(this_update=NEXT_UPDATE, next_update=NEXT_UPDATE + datetime.timedelta(days=7))
    kds.stand_in.crls["Genoa"] = newer
    assert cache.crl(Product.GENOA) == newer
    assert len(kds.stand_in.requests) == 2
    assert (tmp_path / "cache" / "crl-Genoa.der").read_bytes() == newer


def test_failed_crl_refresh_is_an_error_not_a_stale_crl(kds: Kds, tmp_path: Path) -> None:
    clock = Clock(NOW)
    cache = SnpCachingFetcher(kds.fetcher(), tmp_path / "cache", clock=clock)
    cache.crl(Product.GENOA)
    kds.stand_in.available = False
    cache.crl(Product.GENOA)  # still fresh: no request made
    clock.now = NEXT_UPDATE
    with pytest.raises(ServiceUnavailableError, match="HTTP 503"):
        cache.crl(Product.GENOA)


def test_damaged_cached_vcek_is_fetched_again(real: Real, kds: Kds, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    name = f"vcek-Genoa-{real.report.chip_id.hex()}-bl10_tee00_snp23_ucode25.der"
    (directory / name).write_bytes(b"half a certific")
    cache = SnpCachingFetcher(kds.fetcher(), directory, clock=Clock(NOW))
    assert cache.vcek(real.request) == real.vcek
    assert (directory / name).read_bytes() == real.vcek
    assert len(kds.stand_in.requests) == 1


def test_something_that_is_no_certificate_is_not_kept(real: Real, kds: Kds, tmp_path: Path) -> None:
    kds.stand_in.serve_vcek(Product.GENOA, real.report.chip_id, real.report.reported_tcb, b"<html>")
    cache = SnpCachingFetcher(kds.fetcher(), tmp_path / "cache", clock=Clock(NOW))
    with pytest.raises(ServiceUnavailableError, match="no certificate"):
        cache.vcek(real.request)
    assert not (tmp_path / "cache").exists()


def test_concurrent_reports_share_one_kds_request(real: Real, kds: Kds) -> None:
    kds.stand_in.hold = threading.Event()
    cache = SnpCachingFetcher(kds.fetcher(), None, clock=Clock(NOW))
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.vcek(real.request))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    name = f"vcek-Genoa-{real.report.chip_id.hex()}-bl10_tee00_snp23_ucode25.der"
    deadline = time.monotonic() + 10  # bounded: a broken single-flight fails, never hangs
    while cache.cache.waiting(name) != 3:
        assert time.monotonic() < deadline, "the other reports never waited for the first fetch"
        time.sleep(0.01)
    kds.stand_in.hold.set()
    for thread in threads:
        thread.join(20)
    assert results == [real.vcek] * 4
    assert len(kds.stand_in.requests) == 1


# --- SnpDirectoryFetcher and SnpFallbackFetcher --------------------------------------------------


def test_directory_reads_upstreams_offline_store_layout(real: Real, tmp_path: Path) -> None:
    folder = tmp_path / "vcek" / real.report.chip_id.hex()
    folder.mkdir(parents=True)
    (folder / "vcek.der").write_bytes(b"fallback")
    store = SnpDirectoryFetcher(tmp_path)
    assert store.vcek(real.request) == b"fallback"
    (folder / "bl10_tee00_snp23_ucode25_vcek.der").write_bytes(real.vcek)
    assert store.vcek(real.request) == real.vcek  # the TCB-named file wins
    SnpAppraiser(store, insecure_skip_crl=True).verify(real.report, [], NOW)


def test_directory_without_the_crl_is_service_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ServiceUnavailableError, match="Genoa CRL could not be fetched"):
        SnpDirectoryFetcher(tmp_path).crl(Product.GENOA)
    (tmp_path / "crl").mkdir()
    (tmp_path / "crl" / "Genoa.der").write_bytes(b"crl")
    assert SnpDirectoryFetcher(tmp_path).crl(Product.GENOA) == b"crl"


def test_fallback_takes_the_first_source_that_answers(real: Real, kds: Kds, tmp_path: Path) -> None:
    fetcher = SnpFallbackFetcher([SnpDirectoryFetcher(tmp_path), kds.fetcher()])
    assert fetcher.vcek(real.request) == real.vcek
    kds.stand_in.available = False
    with pytest.raises(ServiceUnavailableError, match=r"No such file.*HTTP 503"):
        fetcher.vcek(real.request)


# --- settings ------------------------------------------------------------------------------------


def test_offline_settings_build_an_appraiser_that_verifies(real: Real, tmp_path: Path) -> None:
    folder = tmp_path / "store" / "vcek" / real.report.chip_id.hex()
    folder.mkdir(parents=True)
    (folder / "vcek.der").write_bytes(real.vcek)
    appraiser = build_snp_appraiser(
        {"snp": {"offline_dir": str(tmp_path / "store"), "insecure_skip_crl": True}}
    )
    document = _e2e()
    verifier = SnpVerifier(appraiser, clock=FakeClock(NOW.timestamp()))
    (claims,) = verifier.verify(
        {**document, "cert_chain": None}, expected_report_data=None, expected_init_data=None
    )
    assert claims.claims["measurement"] == real.report.measurement.hex()


def test_settings_build_kds_with_cache(kds: Kds, real: Real, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(kds.ca_pem)
    fetcher, settings = build_snp_fetcher(
        {
            "snp": {
                "kds_url": kds.server.url,
                "ca_cert": str(tmp_path / "ca.pem"),
                "cache_dir": str(tmp_path / "cache"),
                "timeout": 5,
            }
        },
        clock=FakeClock(NOW.timestamp()),
    )
    assert isinstance(fetcher, SnpCachingFetcher) and not settings.insecure_skip_crl
    assert fetcher.vcek(real.request) == real.vcek
    assert fetcher.vcek(real.request) == real.vcek
    assert len(kds.stand_in.requests) == 1


def test_upstreams_vcek_sources_are_read(kds: Kds, real: Real, tmp_path: Path) -> None:
    fetcher, _ = build_snp_fetcher(
        {
            "snp_verifier": {
                "vcek_sources": [
                    {"type": "OfflineStore", "path": str(tmp_path)},
                    {"type": "KDS", "base_url": "https://kdsintf.amd.com"},
                ]
            }
        }
    )
    assert isinstance(fetcher.inner, SnpFallbackFetcher)
    folder = tmp_path / "vcek" / real.report.chip_id.hex()
    folder.mkdir(parents=True)
    (folder / "vcek.der").write_bytes(real.vcek)
    assert fetcher.vcek(real.request) == real.vcek  # from the store, before any KDS request
    default, _ = build_snp_fetcher({"snp_verifier": {}})
    assert isinstance(default.inner, KdsFetcher)
    default.close()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"snp": {"kds": "x"}}, r"verifier_config.snp\] kds: Extra inputs"),
        ({"snp": {"timeout": 0}}, "timeout"),
        ({"snp": {"kds_url": "http://kds.internal"}}, "not HTTPS"),
        ({"snp": {}, "snp_verifier": {}}, "not both"),
        ({"snp_verifier": {"vcek_sources": [{"type": "Cache"}]}}, "snp_verifier"),
        ({"snp_verifier": {"vcek_sources": []}}, "no vcek_sources"),
        ({"snp": {"ca_cert": "/nonexistent/ca.pem"}}, "cannot read snp ca_cert"),
    ],
)
def test_bad_settings_are_config_errors(config: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        build_snp_appraiser(config)


def test_default_settings_use_amds_kds_and_the_pinned_roots() -> None:
    fetcher, settings = build_snp_fetcher(None)
    assert isinstance(fetcher.inner, KdsFetcher) and settings.kds_url is None
    assert set(pinned_roots()) == {Product.MILAN, Product.GENOA, Product.TURIN}
    fetcher.close()

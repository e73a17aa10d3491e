"""Where HSK/CEK files come from: Hygon's KDS (a stand-in over real HTTP, the production
fetcher), an offline directory in upstream's layout, the disk cache, and the configuration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.verifiers.hygon.collateral import (
    HskCekFallbackFetcher,
    HygonDirectoryFetcher,
)
from keybroker.verifiers.hygon.kds_fetcher import HskCekCachingFetcher, HygonKdsFetcher
from keybroker.verifiers.hygon.settings import build_hygon_fetcher
from standins.hygon_kds import HygonKdsStandIn
from standins.hygon_pki import HygonPki
from standins.server import ServedApp

CHIP = "KPA64911240507"


@dataclass
class Kds:
    stand_in: HygonKdsStandIn
    server: ServedApp

    def fetcher(self) -> HygonKdsFetcher:
        return HygonKdsFetcher(self.server.url, insecure_http=True)


@pytest.fixture(scope="module")
def pki() -> HygonPki:
    return HygonPki()


@pytest.fixture
def kds(pki: HygonPki) -> Iterator[Kds]:
    stand_in = HygonKdsStandIn()
    stand_in.hsk_ceks[CHIP] = pki.hsk_cek
    server = ServedApp(stand_in.app())
    server.start()
    yield Kds(stand_in, server)
    server.stop()


def test_kds_answers_the_chips_hsk_cek_at_upstreams_path(kds: Kds, pki: HygonPki) -> None:
    assert kds.fetcher().hsk_cek(CHIP) == pki.hsk_cek
    assert kds.stand_in.requests == [f"snumber={CHIP}"]
    assert kds.fetcher().url(CHIP) == f"{kds.server.url}/hsk_cek?snumber={CHIP}"


def test_kds_outage_is_a_service_error(kds: Kds) -> None:
    kds.stand_in.available = False
    with pytest.raises(ServiceUnavailableError, match="503"):
        kds.fetcher().hsk_cek(CHIP)


def test_oversized_kds_answer_is_refused(kds: Kds) -> None:
    kds.stand_in.oversize = True
    with pytest.raises(ServiceUnavailableError, match="more than"):
        kds.fetcher().hsk_cek(CHIP)


def test_unreachable_kds_is_a_service_error(kds: Kds) -> None:
    kds.server.stop()
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):
        kds.fetcher().hsk_cek(CHIP)


def test_plain_http_kds_is_refused_unless_insecure() -> None:
    with pytest.raises(ConfigError, match="not HTTPS"):
        HygonKdsFetcher("http://127.0.0.1:1")


def test_chip_id_that_is_no_plain_id_is_never_fetched(kds: Kds) -> None:
    with pytest.raises(EvidenceError, match="not a chip id"):
        kds.fetcher().hsk_cek("x&snumber=other")
    assert kds.stand_in.requests == []


def test_cache_serves_a_fetched_hsk_cek_when_kds_is_gone(
    kds: Kds, pki: HygonPki, tmp_path: Path
) -> None:
    assert HskCekCachingFetcher(kds.fetcher(), tmp_path).hsk_cek(CHIP) == pki.hsk_cek
    kds.server.stop()
    assert HskCekCachingFetcher(kds.fetcher(), tmp_path).hsk_cek(CHIP) == pki.hsk_cek
    (cached,) = tmp_path.iterdir()
    assert cached.stat().st_mode & 0o777 == 0o600


def test_cache_keeps_nothing_that_is_no_hsk_and_cek(kds: Kds, tmp_path: Path) -> None:
    kds.stand_in.hsk_ceks[CHIP] = bytes(2916)
    with pytest.raises(ServiceUnavailableError, match="not an HSK and a CEK"):
        HskCekCachingFetcher(kds.fetcher(), tmp_path).hsk_cek(CHIP)
    assert list(tmp_path.iterdir()) == []


def test_offline_directory_in_upstreams_layout(pki: HygonPki, tmp_path: Path) -> None:
    folder = tmp_path / "hsk_cek" / CHIP
    folder.mkdir(parents=True)
    (folder / "hsk_cek.cert").write_bytes(pki.hsk_cek)
    assert HygonDirectoryFetcher(tmp_path).hsk_cek(CHIP) == pki.hsk_cek
    with pytest.raises(ServiceUnavailableError, match="no HSK/CEK for chip OTHER"):
        HygonDirectoryFetcher(tmp_path).hsk_cek("OTHER")


def test_offline_directory_is_tried_before_kds(kds: Kds, pki: HygonPki, tmp_path: Path) -> None:
    folder = tmp_path / "hsk_cek" / CHIP
    folder.mkdir(parents=True)
    (folder / "hsk_cek.cert").write_bytes(pki.hsk_cek)
    fetcher = build_hygon_fetcher(
        {"hygon": {"offline_dir": str(tmp_path), "kds_url": kds.server.url, "insecure_http": True}}
    )
    assert isinstance(fetcher, HskCekFallbackFetcher)
    assert fetcher.hsk_cek(CHIP) == pki.hsk_cek
    assert kds.stand_in.requests == []
    kds.stand_in.hsk_ceks["OTHERCHIP"] = pki.hsk_cek
    assert fetcher.hsk_cek("OTHERCHIP") == pki.hsk_cek  # not offline: KDS answers
    assert kds.stand_in.requests == ["snumber=OTHERCHIP"]


def test_offline_directory_alone_never_reaches_kds(tmp_path: Path) -> None:
    fetcher = build_hygon_fetcher({"hygon": {"offline_dir": str(tmp_path)}})
    assert isinstance(fetcher, HygonDirectoryFetcher)


def test_cache_dir_wraps_the_sources(tmp_path: Path) -> None:
    fetcher = build_hygon_fetcher({"hygon": {"offline_dir": "/x", "cache_dir": str(tmp_path)}})
    assert isinstance(fetcher, HskCekCachingFetcher)


def test_unknown_hygon_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"verifier_config\.hygon\] kds"):
        build_hygon_fetcher({"hygon": {"kds": "https://example.invalid"}})

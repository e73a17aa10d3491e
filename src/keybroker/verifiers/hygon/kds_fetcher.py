"""Hygon's Key Distribution Service (KDS) and a cache in front of any HSK/CEK source.

Thin on purpose: only the URL and what an answer must be are here; HTTPS, the size cap, the
deadline and the bounded, single-flight cache (memory, and 0600 files given a directory) are the
shared :mod:`keybroker.verifiers.collateral_fetch`.

KDS path, as upstream's attester and verifier use it: ``GET /hsk_cek?snumber=<chip id>`` on
``https://cert.hygon.cn``, answering the 2916-byte HSK‖CEK file (a 832-byte HSK certificate,
then a 2084-byte CEK certificate). An HSK/CEK never changes for a chip, so the cache keeps it
for good (until evicted); it keeps only what parses as an HSK and a CEK, and the verifiers check
both against the pinned HRK on every use.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx

from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.verifiers.collateral_fetch import (
    FOREVER,
    CacheLimits,
    Clock,
    CollateralCache,
    HttpsSource,
    Keeping,
)
from keybroker.verifiers.hygon.certs import HSK_CEK_SIZE, split_hsk_cek
from keybroker.verifiers.hygon.collateral import HskCekFetcher

HYGON_KDS_URL = "https://cert.hygon.cn"
MAX_KDS_BYTES = 64 * 1024  # the answer is 2916 bytes


class HygonKdsFetcher(HskCekFetcher):
    """Hygon's KDS at ``base_url`` (default Hygon's own), or a mirror serving its path."""

    def __init__(
        self,
        base_url: str = HYGON_KDS_URL,
        *,
        timeout: float = 10.0,
        ca_pem: bytes | None = None,
        client: httpx.Client | None = None,
        insecure_http: bool = False,
    ) -> None:
        self._source = HttpsSource(
            base_url,
            service="the Hygon KDS",
            max_bytes=MAX_KDS_BYTES,
            timeout=timeout,
            ca_pem=ca_pem,
            client=client,
            insecure_http=insecure_http,
        )

    def url(self, chip_id: str) -> str:
        return f"{self._source.base}/hsk_cek?snumber={chip_id}"  # chip_id checked: [A-Za-z0-9_-]

    def close(self) -> None:
        self._source.close()

    def _hsk_cek(self, chip_id: str) -> bytes:
        return self._source.get("/hsk_cek", [("snumber", chip_id)]).body


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class HskCekCachingFetcher(HskCekFetcher):
    """Keeps what ``inner`` fetched in memory and, given a ``directory``, in
    ``hsk_cek-<chip id>.cert`` (0600, replaced atomically), for good. Concurrent reports of one
    chip share one KDS request."""

    def __init__(
        self,
        inner: HskCekFetcher,
        directory: Path | None,
        *,
        clock: Clock = _utc_now,
        limits: CacheLimits | None = None,
    ) -> None:
        self.inner = inner
        self.cache = CollateralCache(
            directory, limits=limits or CacheLimits(item_bytes=HSK_CEK_SIZE), clock=clock
        )

    def _hsk_cek(self, chip_id: str) -> bytes:
        def fetch() -> bytes:
            data = self.inner.hsk_cek(chip_id)
            if not _parses(data):
                raise ServiceUnavailableError(
                    f"the HSK/CEK served for chip {chip_id} is not an HSK and a CEK"
                )
            return data

        return self.cache.get(f"hsk_cek-{chip_id}.cert", fetch, _KEEP_HSK_CEK)


def _parses(data: bytes) -> bool:
    try:
        split_hsk_cek(data)
    except EvidenceError:
        return False
    return True


def _hsk_cek_file(data: bytes) -> bytes:
    """A cached file, if it still is an HSK and a CEK (anything else is fetched again)."""
    if not _parses(data):
        raise ValueError("not an HSK and a CEK")
    return data


_KEEP_HSK_CEK = Keeping(encode=bytes, decode=_hsk_cek_file, expires=lambda _: FOREVER)

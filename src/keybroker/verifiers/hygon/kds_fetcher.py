"""Hygon's Key Distribution Service (KDS) and a disk cache in front of any HSK/CEK source.

Kept thin on purpose (URL building and the reading of the answer): the HTTP client, size cap and
atomic cache files are the same as the SNP fetcher's.

KDS path, as upstream's attester and verifier use it: ``GET /hsk_cek?snumber=<chip id>`` on
``https://cert.hygon.cn``, answering the 2916-byte HSK‖CEK file (a 832-byte HSK certificate,
then a 2084-byte CEK certificate). An HSK/CEK never changes for a chip, so the cache keeps it
for good; it keeps only what parses as an HSK and a CEK, and the verifiers check both against
the pinned HRK on every use.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx

from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.storage.local_fs import write_atomically
from keybroker.verifiers.hygon.certs import HSK_CEK_SIZE, split_hsk_cek
from keybroker.verifiers.hygon.collateral import HskCekFetcher

logger = logging.getLogger(__name__)

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
        base = base_url.rstrip("/")
        scheme = httpx.URL(base).scheme
        if scheme not in ("https", "http") or (scheme == "http" and not insecure_http):
            raise ConfigError(
                f"the Hygon KDS {base_url!r} is not HTTPS (set insecure_http to allow plain HTTP)"
            )
        self._base, self._insecure_http = base, scheme == "http"
        verify: ssl.SSLContext | bool = True
        if ca_pem is not None:
            verify = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        self._client = client or httpx.Client(timeout=timeout, verify=verify)

    def url(self, chip_id: str) -> str:
        return f"{self._base}/hsk_cek?snumber={chip_id}"  # chip_id checked: [A-Za-z0-9_-]

    def close(self) -> None:
        self._client.close()

    def _hsk_cek(self, chip_id: str) -> bytes:
        if self._insecure_http:
            logger.warning("INSECURE: Hygon HSK/CEK fetched over plain HTTP from %s", self._base)
        url = self.url(chip_id)
        with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ServiceUnavailableError(f"{url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_KDS_BYTES:
                    raise ServiceUnavailableError(f"{url} sent more than {MAX_KDS_BYTES} bytes")
        return bytes(body)


class HskCekCachingFetcher(HskCekFetcher):
    """Keeps what ``inner`` fetched in ``directory`` (``hsk_cek-<chip id>.cert``, 0600, replaced
    atomically) and in memory, for good."""

    def __init__(self, inner: HskCekFetcher, directory: Path) -> None:
        self._inner, self._directory = inner, directory
        self._held: dict[str, bytes] = {}

    def _hsk_cek(self, chip_id: str) -> bytes:
        held = self._held.get(chip_id)
        if held is not None:
            return held
        path = self._directory / f"hsk_cek-{chip_id}.cert"
        data = self._load(path)
        if data is None:
            data = self._inner.hsk_cek(chip_id)
            if not _parses(data):
                raise ServiceUnavailableError(
                    f"the HSK/CEK served for chip {chip_id} is not an HSK and a CEK"
                )
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, data)
        self._held[chip_id] = data
        return data

    @staticmethod
    def _load(path: Path) -> bytes | None:
        try:
            with path.open("rb") as file:
                data = file.read(HSK_CEK_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:  # an unreadable cache file is a miss, not an outage
            logger.warning("ignoring unreadable Hygon HSK/CEK cache file %s: %s", path, e)
            return None
        return data if _parses(data) else None


def _parses(data: bytes) -> bool:
    try:
        split_hsk_cek(data)
    except EvidenceError:
        return False
    return True

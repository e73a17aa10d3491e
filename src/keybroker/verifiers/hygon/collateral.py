"""Where a chip's HSK and CEK come from: the interface the Hygon verifiers call, and a directory
prepared offline. (Hygon's KDS over HTTPS and the disk cache:
:mod:`keybroker.verifiers.hygon.kds_fetcher`.)

A source is trusted for availability, never for integrity: the verifiers check the HSK and CEK
against the pinned HRK, so a source only moves bytes.

::

    HskCekFetcher (ABC)       hsk_cek(chip_id) -> the 2916-byte HSK‖CEK file;
    │                         any failure -> ServiceUnavailableError
    ├── HygonDirectoryFetcher <dir>/hsk_cek/<chip id>/hsk_cek.cert (upstream's offline layout,
    │                         default /opt/hygon/csv)
    └── HskCekFallbackFetcher the first of several sources that answers
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.verifiers.hygon.certs import HSK_CEK_SIZE

# Chip serial numbers are short ASCII ids (e.g. KPA64911240507); they become a path and a URL
CHIP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UPSTREAM_OFFLINE_DIR = Path("/opt/hygon/csv")


def chip_id_text(unverified: bytes, what: str) -> str:
    """The serial number as upstream spells it (UTF-8, trailing NULs dropped), checked to be a
    plain id so that it is safe in a file name and a query string."""
    try:
        text = unverified.decode("utf-8").rstrip("\0")
    except UnicodeDecodeError:
        raise EvidenceError(f"the {what} is not UTF-8 text") from None
    if not CHIP_ID.fullmatch(text):
        raise EvidenceError(f"the {what} {text[:64]!r} is not a chip id of letters and digits")
    return text


class HskCekFetcher(ABC):
    """The HSK‖CEK file Hygon issues for one chip."""

    def hsk_cek(self, chip_id: str) -> bytes:
        if not CHIP_ID.fullmatch(chip_id):
            raise EvidenceError(f"{chip_id[:64]!r} is not a chip id")
        try:
            data = self._hsk_cek(chip_id)
        except ServiceUnavailableError:
            raise
        except Exception as e:  # any fetch failure is the service's, never the evidence's
            raise ServiceUnavailableError(
                f"the HSK/CEK for chip {chip_id} could not be fetched: {e}"
            ) from e
        if len(data) != HSK_CEK_SIZE:
            raise ServiceUnavailableError(
                f"the HSK/CEK for chip {chip_id} is {len(data)} bytes, not {HSK_CEK_SIZE}"
            )
        return data

    @abstractmethod
    def _hsk_cek(self, chip_id: str) -> bytes: ...


class HygonDirectoryFetcher(HskCekFetcher):
    def __init__(self, root: Path) -> None:
        self._root = root

    def path(self, chip_id: str) -> Path:
        return self._root / "hsk_cek" / chip_id / "hsk_cek.cert"

    def _hsk_cek(self, chip_id: str) -> bytes:
        path = self.path(chip_id)
        try:
            with path.open("rb") as file:
                return file.read(HSK_CEK_SIZE + 1)
        except OSError as e:
            raise ServiceUnavailableError(
                f"no HSK/CEK for chip {chip_id} in {self._root}: {e.strerror}"
            ) from None


class HskCekFallbackFetcher(HskCekFetcher):
    def __init__(self, sources: Sequence[HskCekFetcher]) -> None:
        if not sources:
            raise ValueError("no HSK/CEK source")
        self._sources = tuple(sources)

    def _hsk_cek(self, chip_id: str) -> bytes:
        failures = []
        for source in self._sources:
            try:
                return source.hsk_cek(chip_id)
            except ServiceUnavailableError as e:
                failures.append(e.detail)
        raise ServiceUnavailableError("; ".join(failures))

"""Where SNP collateral comes from: AMD's Key Distribution Service (KDS) over HTTPS, a directory
prepared offline, and a cache in front of either. Only KDS's paths, the offline store's layout
and what to keep for how long are here; HTTPS, size caps, deadlines, the offline directory and the
bounded, single-flight cache are the shared :mod:`keybroker.verifiers.collateral_fetch`.

A fetcher is trusted for availability and freshness, never for integrity: the verifier
(:mod:`keybroker.verifiers.amd.snp`) checks every certificate against the pinned AMD roots and the
CRL's signature and dates, so a fetcher only moves bytes. Plain HTTP is refused unless
``insecure_http`` is set, because someone on the path could replay an old (still unexpired)
CRL from before a revocation.

::

    SnpCollateralFetcher (ABC)  vcek / crl / cert_chain; any failure -> ServiceUnavailableError
    ├── KdsFetcher              AMD KDS (or a mirror with KDS's paths)
    ├── SnpDirectoryFetcher     files laid out as upstream Trustee's offline VCEK store
    ├── SnpFallbackFetcher      the first of several sources that answers (upstream's
    │                           ``vcek_sources`` list)
    └── SnpCachingFetcher       wraps another: in memory (and in 0600 files given a directory);
                                VCEKs and certificate chains kept for good, CRLs until their
                                nextUpdate

KDS paths (AMD 57230, "KDS Interface"): ``/vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=
&ucodeSPL=`` (DER; Turin adds ``fmcSPL`` and uses the first 8 bytes of CHIP_ID as hwid),
``/vcek/v1/{product}/cert_chain`` (PEM ASK then ARK), ``/vcek/v1/{product}/crl`` (DER CRL of
the ARK) and ``/vlek/v1/{product}/cert_chain`` (PEM ASVK then ARK).
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.verifiers.amd.snp_certs import KeyKind, load_certificates
from keybroker.verifiers.amd.snp_report import Product, TcbVersion
from keybroker.verifiers.collateral_fetch import (
    FOREVER,
    CacheLimits,
    Clock,
    CollateralCache,
    HttpsSource,
    OfflineDirectory,
    keep_bytes,
    unavailable_unless_fetched,
)

AMD_KDS_URL = "https://kdsintf.amd.com"
# a VCEK is ~1.4 kB, a certificate chain ~4.5 kB, the ARK's CRL a few kB
MAX_KDS_BYTES = 256 * 1024


@dataclass(frozen=True)
class VcekRequest:
    """The VCEK of one chip at one TCB: what KDS files it under."""

    product: Product
    hwid: bytes  # CHIP_ID (64 bytes), or its first 8 bytes on Turin
    tcb: TcbVersion

    def __post_init__(self) -> None:
        turin = self.product is Product.TURIN
        if len(self.hwid) != (8 if turin else 64):
            raise EvidenceError(f"a {self.product} hwid is not {len(self.hwid)} bytes")
        if self.hwid == bytes(len(self.hwid)):
            raise EvidenceError(
                "the report's CHIP_ID is masked (zero), so no VCEK can be fetched for it: "
                "launch the guest with MASK_CHIP_ID 0 or send the VCEK with the evidence"
            )
        if turin and self.tcb.fmc is None:
            raise EvidenceError("a Turin report's TCB has no FMC SVN")

    def query(self) -> list[tuple[str, str]]:
        """KDS's query parameters, in upstream Trustee's order and two-digit spelling."""
        tcb = self.tcb
        fmc = [("fmcSPL", f"{tcb.fmc:02}")] if self.product is Product.TURIN else []
        return [
            *fmc,
            ("blSPL", f"{tcb.bootloader:02}"),
            ("teeSPL", f"{tcb.tee:02}"),
            ("snpSPL", f"{tcb.snp:02}"),
            ("ucodeSPL", f"{tcb.microcode:02}"),
        ]

    def tcb_prefix(self) -> str:
        """The TCB part of an offline-store file name, as upstream spells it."""
        tcb = self.tcb
        prefix = f"bl{tcb.bootloader:02}_tee{tcb.tee:02}_snp{tcb.snp:02}_ucode{tcb.microcode:02}"
        return prefix + (f"_fmc{tcb.fmc:02}" if self.product is Product.TURIN else "")

    def describe(self) -> str:
        return f"{self.product} hwid {self.hwid.hex()[:16]}… {self.tcb_prefix()}"


class SnpCollateralFetcher(ABC):
    """VCEKs, the ARK's CRL and KDS certificate chains, from wherever this fetcher keeps them."""

    def vcek(self, request: VcekRequest) -> bytes:
        """The DER VCEK certificate."""
        return self._wrap(lambda: self._vcek(request), f"the VCEK for {request.describe()}")

    def crl(self, product: Product) -> bytes:
        """The ARK's CRL (DER) for ``product``."""
        return self._wrap(lambda: self._crl(product), f"the AMD {product} CRL")

    def cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        """PEM intermediate (ASK for VCEKs, ASVK for VLEKs) then ARK."""
        return self._wrap(
            lambda: self._cert_chain(product, kind), f"the AMD {product} {kind} cert_chain"
        )

    @staticmethod
    def _wrap(fetch: Callable[[], bytes], what: str) -> bytes:
        with unavailable_unless_fetched(what):
            return fetch()

    def close(self) -> None:  # noqa: B027 - optional: only network fetchers hold connections
        """Release connections, if any."""

    @abstractmethod
    def _vcek(self, request: VcekRequest) -> bytes: ...

    @abstractmethod
    def _crl(self, product: Product) -> bytes: ...

    @abstractmethod
    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes: ...


class KdsFetcher(SnpCollateralFetcher):
    """AMD KDS at ``base_url`` (default AMD's own), or anything serving KDS's paths."""

    def __init__(
        self,
        base_url: str = AMD_KDS_URL,
        *,
        timeout: float = 10.0,
        ca_pem: bytes | None = None,
        client: httpx.Client | None = None,
        insecure_http: bool = False,
    ) -> None:
        """``ca_pem``: the CA of a mirror's TLS certificate, when not a public one."""
        self._source = HttpsSource(
            base_url,
            service="the AMD KDS",
            max_bytes=MAX_KDS_BYTES,
            timeout=timeout,
            ca_pem=ca_pem,
            client=client,
            insecure_http=insecure_http,
        )

    def close(self) -> None:
        self._source.close()

    def _vcek(self, request: VcekRequest) -> bytes:
        path = f"/vcek/v1/{request.product}/{request.hwid.hex()}"
        return self._source.get(path, request.query()).body

    def _crl(self, product: Product) -> bytes:
        return self._source.get(f"/vcek/v1/{product}/crl").body

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        return self._source.get(f"/{kind.value.lower()}/v1/{product}/cert_chain").body


class SnpDirectoryFetcher(SnpCollateralFetcher):
    """Collateral prepared offline. VCEKs as upstream Trustee's offline store keeps them, so an
    existing store works unchanged; the rest beside them::

        vcek/<hwid hex>/<tcb>_vcek.der      e.g. bl03_tee00_snp08_ucode115[_fmc01]_vcek.der
        vcek/<hwid hex>/vcek.der            used when no file names the report's TCB
        crl/<Product>.der                   KDS /vcek/v1/<Product>/crl
        cert_chain/<Product>.pem            KDS /vcek/v1/<Product>/cert_chain
        cert_chain/vlek-<Product>.pem       KDS /vlek/v1/<Product>/cert_chain

    Every name is built from a validated request, never from input text."""

    def __init__(self, directory: Path) -> None:
        self._directory = OfflineDirectory(directory, max_bytes=MAX_KDS_BYTES)

    def _vcek(self, request: VcekRequest) -> bytes:
        folder = f"vcek/{request.hwid.hex()}"
        found = self._directory.read_if_present(f"{folder}/{request.tcb_prefix()}_vcek.der")
        return found if found is not None else self._directory.read(f"{folder}/vcek.der")

    def _crl(self, product: Product) -> bytes:
        return self._directory.read(f"crl/{product}.der")

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        prefix = "vlek-" if kind is KeyKind.VLEK else ""
        return self._directory.read(f"cert_chain/{prefix}{product}.pem")


class SnpFallbackFetcher(SnpCollateralFetcher):
    """Asks each source in turn and returns the first answer; fails only when all fail."""

    def __init__(self, sources: Sequence[SnpCollateralFetcher]) -> None:
        if not sources:
            raise ConfigError("an SNP collateral fallback needs at least one source")
        self._sources = tuple(sources)

    def _first(self, fetch: Callable[[SnpCollateralFetcher], bytes]) -> bytes:
        failures = []
        for source in self._sources:
            try:
                return fetch(source)
            except ServiceUnavailableError as e:
                failures.append(e.detail)
        raise ServiceUnavailableError("; ".join(failures))

    def _vcek(self, request: VcekRequest) -> bytes:
        return self._first(lambda source: source.vcek(request))

    def _crl(self, product: Product) -> bytes:
        return self._first(lambda source: source.crl(product))

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        return self._first(lambda source: source.cert_chain(product, kind))


def crl_next_update(unverified: bytes) -> datetime.datetime | None:
    """When a CRL should be fetched again, or None when it cannot be told (then it is not
    kept)."""
    try:
        if unverified.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(unverified).next_update_utc
        return x509.load_der_x509_crl(unverified).next_update_utc
    except ValueError:
        return None


class SnpCachingFetcher(SnpCollateralFetcher):
    """Keeps what ``inner`` fetched in memory and, given a ``directory``, in one 0600 file per
    item. A VCEK is keyed by product, hwid and TCB and never changes, nor does a product's
    certificate chain: both are kept for good (until evicted). A CRL is served until its
    nextUpdate, then fetched again; a failed refresh is an error, never a reason to serve the
    expired CRL (the verifier would refuse it anyway). Concurrent fetches of one item share one
    KDS request, which matters: KDS rate-limits its clients."""

    def __init__(
        self,
        inner: SnpCollateralFetcher,
        directory: Path | None,
        *,
        clock: Clock,
        limits: CacheLimits | None = None,
    ) -> None:
        self.inner = inner
        self.cache = CollateralCache(
            directory, limits=limits or CacheLimits(item_bytes=MAX_KDS_BYTES), clock=clock
        )

    def close(self) -> None:
        self.inner.close()

    def _vcek(self, request: VcekRequest) -> bytes:
        name = f"vcek-{request.product}-{request.hwid.hex()}-{request.tcb_prefix()}.der"
        return self.cache.get(
            name, lambda: _certificate(self.inner.vcek(request)), _KEEP_CERTIFICATES
        )

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        name = f"cert-chain-{kind.value.lower()}-{product}.pem"
        fetch = lambda: _certificate(self.inner.cert_chain(product, kind))  # noqa: E731
        return self.cache.get(name, fetch, _KEEP_CERTIFICATES)

    def _crl(self, product: Product) -> bytes:
        return self.cache.get(f"crl-{product}.der", lambda: self.inner.crl(product), _KEEP_CRLS)


def _forever_if_certificate(data: bytes) -> datetime.datetime | None:
    """Certificates are kept for good, if ``data`` is one (DER) or some (PEM)."""
    try:
        if not load_certificates(data):
            return None
    except ValueError:
        return None
    return FOREVER


def _certificate(data: bytes) -> bytes:
    """``data``, if it is a certificate: what is kept for good must at least be what it
    claims to be."""
    if _forever_if_certificate(data) is None:
        raise ServiceUnavailableError("AMD KDS served something that is no certificate")
    return data


_KEEP_CERTIFICATES = keep_bytes(_forever_if_certificate)
_KEEP_CRLS = keep_bytes(crl_next_update)

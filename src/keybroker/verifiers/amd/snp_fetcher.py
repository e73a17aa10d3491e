"""Where SNP collateral comes from: AMD's Key Distribution Service (KDS) over HTTPS, a directory
prepared offline, and an on-disk cache in front of either. All of Keybroker's SNP I/O is here.

A fetcher is trusted for availability and freshness, never for integrity: the verifier
(:mod:`keybroker.verifiers.amd.snp`) checks every certificate against the pinned AMD roots and the
CRL's signature and dates, so a fetcher only moves bytes. Plain HTTP is refused unless
``insecure_http`` is set, because someone on the path could replay an old (still unexpired)
CRL from before a revocation.

::

    SnpCollateralFetcher (ABC)  vcek / crl / cert_chain; any failure -> ServiceUnavailableError
    ├── KdsFetcher              AMD KDS (or a mirror with KDS's paths), httpx, timeout, size cap
    ├── SnpDirectoryFetcher     files laid out as upstream Trustee's offline VCEK store
    ├── SnpFallbackFetcher      the first of several sources that answers (upstream's
    │                           ``vcek_sources`` list)
    └── SnpCachingFetcher       wraps another: 0600 files replaced atomically; VCEKs and
                                certificate chains kept for good, CRLs until their nextUpdate

KDS paths (AMD 57230, "KDS Interface"): ``/vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=
&ucodeSPL=`` (DER; Turin adds ``fmcSPL`` and uses the first 8 bytes of CHIP_ID as hwid),
``/vcek/v1/{product}/cert_chain`` (PEM ASK then ARK), ``/vcek/v1/{product}/crl`` (DER CRL of
the ARK) and ``/vlek/v1/{product}/cert_chain`` (PEM ASVK then ARK).
"""

from __future__ import annotations

import datetime
import logging
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from keybroker.errors import ConfigError, EvidenceError, ServiceUnavailableError
from keybroker.storage.local_fs import write_atomically
from keybroker.verifiers.amd.snp_certs import KeyKind, load_certificates
from keybroker.verifiers.amd.snp_report import Product, TcbVersion
from keybroker.verifiers.intel.dcap_fetcher import read_bounded

logger = logging.getLogger(__name__)

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
        try:
            return fetch()
        except ServiceUnavailableError:
            raise
        except Exception as e:  # any fetch failure is the service's, never the evidence's
            raise ServiceUnavailableError(f"{what} could not be fetched: {e}") from e

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
        base = base_url.rstrip("/")
        scheme = httpx.URL(base).scheme
        if scheme not in ("https", "http") or (scheme == "http" and not insecure_http):
            raise ConfigError(
                f"the AMD KDS {base_url!r} is not HTTPS (set insecure_http to allow plain "
                "HTTP, which lets anyone on the path replay an old CRL)"
            )
        self._base, self._insecure_http = base, scheme == "http"
        verify: ssl.SSLContext | bool = True
        if ca_pem is not None:
            verify = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        self._client = client or httpx.Client(timeout=timeout, verify=verify)

    def close(self) -> None:
        self._client.close()

    def _vcek(self, request: VcekRequest) -> bytes:
        path = f"/vcek/v1/{request.product}/{request.hwid.hex()}"
        return self._get(path, request.query())

    def _crl(self, product: Product) -> bytes:
        return self._get(f"/vcek/v1/{product}/crl", [])

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        return self._get(f"/{kind.value.lower()}/v1/{product}/cert_chain", [])

    def _get(self, path: str, params: list[tuple[str, str]]) -> bytes:
        """The body of one GET, reading no more than MAX_KDS_BYTES."""
        if self._insecure_http:
            logger.warning(
                "INSECURE: AMD KDS collateral fetched over plain HTTP from %s", self._base
            )
        url = self._base + path
        with self._client.stream("GET", url, params=tuple(params)) as response:
            if response.status_code != 200:
                raise ServiceUnavailableError(f"{url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_KDS_BYTES:
                    raise ServiceUnavailableError(f"{url} sent more than {MAX_KDS_BYTES} bytes")
        return bytes(body)


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
        self._directory = directory

    def _read(self, relative: str) -> bytes:
        return read_bounded(self._directory / relative, MAX_KDS_BYTES)

    def _vcek(self, request: VcekRequest) -> bytes:
        folder = f"vcek/{request.hwid.hex()}"
        try:
            return self._read(f"{folder}/{request.tcb_prefix()}_vcek.der")
        except FileNotFoundError:
            return self._read(f"{folder}/vcek.der")

    def _crl(self, product: Product) -> bytes:
        return self._read(f"crl/{product}.der")

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        prefix = "vlek-" if kind is KeyKind.VLEK else ""
        return self._read(f"cert_chain/{prefix}{product}.pem")


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
    """Keeps what ``inner`` fetched in ``directory`` (one 0600 file per item, replaced
    atomically) and in memory. A VCEK is keyed by product, hwid and TCB and never changes, nor
    does a product's certificate chain: both are kept for good. A CRL is served until its
    nextUpdate, then fetched again; a failed refresh is an error, never a reason to serve the
    expired CRL (the verifier would refuse it anyway)."""

    def __init__(
        self,
        inner: SnpCollateralFetcher,
        directory: Path,
        *,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self._inner, self._directory, self._clock = inner, directory, clock
        self._held: dict[str, tuple[bytes, datetime.datetime]] = {}

    def _vcek(self, request: VcekRequest) -> bytes:
        name = f"vcek-{request.product}-{request.hwid.hex()}-{request.tcb_prefix()}.der"
        fetch = lambda: _certificate(self._inner.vcek(request))  # noqa: E731
        return self._kept(name, fetch, _forever_if_certificate)

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        name = f"cert-chain-{kind.value.lower()}-{product}.pem"
        fetch = lambda: _certificate(self._inner.cert_chain(product, kind))  # noqa: E731
        return self._kept(name, fetch, _forever_if_certificate)

    def _crl(self, product: Product) -> bytes:
        return self._kept(f"crl-{product}.der", lambda: self._inner.crl(product), crl_next_update)

    def _kept(
        self,
        name: str,
        fetch: Callable[[], bytes],
        expiry: Callable[[bytes], datetime.datetime | None],
    ) -> bytes:
        """``name`` from memory, else from its file, else fetched and stored; an item is used
        only before the moment ``expiry`` gives for it (None: unusable, fetch again)."""
        now = self._clock()
        held = self._held.get(name)
        if held is not None and now < held[1]:
            return held[0]
        data = self._load(self._directory / name)
        if data is not None:
            until = expiry(data)
            if until is not None and now < until:
                self._held[name] = (data, until)
                return data
        data = fetch()
        until = expiry(data)
        self._store(self._directory / name, data)
        if until is not None and now < until:
            self._held[name] = (data, until)
        else:
            self._held.pop(name, None)
        return data

    @staticmethod
    def _load(path: Path) -> bytes | None:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_KDS_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:  # an unreadable cache file is a miss, not an outage
            logger.warning("ignoring unreadable SNP collateral cache file %s: %s", path, e)
            return None
        return data if 0 < len(data) <= MAX_KDS_BYTES else None

    def _store(self, path: Path, data: bytes) -> None:
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, data)  # 0600; a reader never sees half a file


def _forever_if_certificate(data: bytes) -> datetime.datetime | None:
    """Certificates are kept for good, if ``data`` is one (DER) or some (PEM)."""
    try:
        if not load_certificates(data):
            return None
    except ValueError:
        return None
    return datetime.datetime.max.replace(tzinfo=datetime.UTC)


def _certificate(data: bytes) -> bytes:
    """``data``, if it is a certificate: what is kept for good must at least be what it
    claims to be."""
    if _forever_if_certificate(data) is None:
        raise ServiceUnavailableError("AMD KDS served something that is no certificate")
    return data

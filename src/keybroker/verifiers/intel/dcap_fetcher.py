"""Where DCAP collateral comes from: Intel PCS or a PCCS over HTTPS, a directory prepared
offline, and a cache in front of either. Only the PCS API (URLs, issuer chain headers, CRL
encodings) and the offline layout are here; HTTPS, size caps, deadlines, the offline directory and
the bounded, single-flight cache are the shared :mod:`keybroker.verifiers.collateral_fetch`.

A fetcher is trusted for availability and freshness, never for integrity: the verifier
(:func:`~keybroker.verifiers.intel.dcap_collateral.verify_collateral`) checks every signature,
CRL and date of what it is handed, so a fetcher only moves bytes. What a fetcher can still do
wrong is serve old but validly signed collateral (a TCB Info from before a TCB recovery, until its
``nextUpdate``); that is why plain HTTP is refused unless ``insecure_http`` is set.

::

    CollateralFetcher (ABC)   fetch(request) -> Collateral; any failure -> ServiceUnavailableError
    ├── PcsFetcher            Intel PCS v4 API, or a PCCS (same API)
    ├── DirectoryFetcher      files laid out per FMSPC, for air-gapped deployments
    └── CachingFetcher        wraps another: the collateral of one TEE, FMSPC and PCK CA is one
                              cache item (memory, and a 0600 file when a directory is given),
                              reused until its earliest nextUpdate
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import httpx

from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.verifiers.collateral_fetch import (
    CacheLimits,
    Clock,
    CollateralCache,
    HttpsSource,
    Keeping,
    OfflineDirectory,
    unavailable_unless_fetched,
)
from keybroker.verifiers.intel.dcap_collateral import (
    MAX_ITEM_BYTES,
    Collateral,
    CollateralRequest,
    earliest_next_update,
)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
# the CRL distribution point of the pinned Intel SGX Root CA (Intel PCS has no rootcacrl API)
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
TCB_INFO_CHAIN = "TCB-Info-Issuer-Chain"
QE_IDENTITY_CHAIN = "SGX-Enclave-Identity-Issuer-Chain"
PCK_CRL_CHAIN = "SGX-PCK-CRL-Issuer-Chain"
_API_SUFFIX = re.compile(r"/(sgx|tdx)/certification/v[34]/?$")


class CollateralFetcher(ABC):
    """The collateral a quote needs, from wherever this fetcher keeps it."""

    def fetch(self, request: CollateralRequest) -> Collateral:
        what = f"DCAP collateral for {request.tee} FMSPC {request.fmspc.hex().upper()}"
        with unavailable_unless_fetched(what):
            return self._fetch(request)

    @abstractmethod
    def _fetch(self, request: CollateralRequest) -> Collateral: ...

    def close(self) -> None:  # noqa: B027 - optional: only network fetchers hold connections
        """Release connections, if any."""


def crl_der(body: bytes) -> bytes:
    """A CRL as DER, however it was served: DER, PEM, or hex text (as a PCCS serves the root
    CA CRL)."""
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        return body  # the verifier reads PEM as it is
    if stripped[:1] == b"\x30":
        return body
    try:
        return binascii.unhexlify(stripped)
    except (binascii.Error, ValueError):
        raise ServiceUnavailableError("a CRL was served neither as DER, PEM nor hex") from None


class PcsFetcher(CollateralFetcher):
    """Intel PCS (``PcsFetcher.intel()``) or a PCCS at ``base_url``: the v4 endpoints for TCB
    Info (SGX and TDX), QE Identity (SGX QE and TD QE), the PCK CRL of the PCK's CA and the Root
    CA CRL, with issuer chains from the URL-encoded PEM response headers."""

    def __init__(
        self,
        base_url: str,
        *,
        root_ca_crl_url: str | None = None,
        update: Literal["early", "standard"] = "early",
        timeout: float = 10.0,
        ca_pem: bytes | None = None,
        client: httpx.Client | None = None,
        insecure_http: bool = False,
    ) -> None:
        """``root_ca_crl_url``: where the Root CA CRL is; a PCCS's ``rootcacrl`` endpoint when
        None. ``update``: Intel's TCB update stream (upstream Trustee asks for "early").
        ``ca_pem``: the CA that signs the PCCS's TLS certificate, when not a public one."""
        if update not in ("early", "standard"):
            raise ConfigError(f"the TCB update stream is 'early' or 'standard', not {update!r}")
        self._source = HttpsSource(
            _API_SUFFIX.sub("", base_url.rstrip("/")),
            service="the DCAP collateral service",
            max_bytes=MAX_ITEM_BYTES,
            timeout=timeout,
            ca_pem=ca_pem,
            client=client,
            insecure_http=insecure_http,
        )
        self._update = update
        self._root_ca_crl_url = root_ca_crl_url or "/sgx/certification/v4/rootcacrl"
        if root_ca_crl_url is not None:
            self._source.check_url(root_ca_crl_url)

    @classmethod
    def intel(
        cls,
        *,
        update: Literal["early", "standard"] = "early",
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> PcsFetcher:
        """Intel's own PCS, with the Root CA CRL from the pinned root's distribution point."""
        return cls(
            INTEL_PCS_URL,
            root_ca_crl_url=INTEL_ROOT_CA_CRL_URL,
            update=update,
            timeout=timeout,
            client=client,
        )

    def close(self) -> None:
        self._source.close()

    def _fetch(self, request: CollateralRequest) -> Collateral:
        tee, fmspc = request.tee, request.fmspc.hex().upper()
        tcb_info, tcb_chain = self._get(
            f"/{tee}/certification/v4/tcb",
            [("fmspc", fmspc), ("update", self._update)],
            TCB_INFO_CHAIN,
        )
        qe_identity, qe_chain = self._get(
            f"/{tee}/certification/v4/qe/identity", [("update", self._update)], QE_IDENTITY_CHAIN
        )
        pck_crl, pck_crl_chain = self._get(
            "/sgx/certification/v4/pckcrl",
            [("ca", request.pck_ca), ("encoding", "der")],
            PCK_CRL_CHAIN,
        )
        root_ca_crl = self._source.get(self._root_ca_crl_url).body
        return Collateral(
            tcb_info=tcb_info,
            tcb_info_issuer_chain=tcb_chain,
            qe_identity=qe_identity,
            qe_identity_issuer_chain=qe_chain,
            pck_crl=crl_der(pck_crl),
            pck_crl_issuer_chain=pck_crl_chain,
            root_ca_crl=crl_der(root_ca_crl),
        )

    def _get(
        self, path: str, params: list[tuple[str, str]], chain_header: str
    ) -> tuple[bytes, bytes]:
        """(body, issuer chain PEM) of one PCS answer."""
        answer = self._source.get(path, params)
        encoded = answer.headers.get(chain_header)
        if not encoded:
            raise ServiceUnavailableError(
                f"{self._source.base}{path} sent no {chain_header} header"
            )
        return answer.body, unquote(encoded).encode("ascii")


class DirectoryFetcher(CollateralFetcher):
    """Collateral prepared offline, laid out per FMSPC (uppercase hex)::

        fmspc/<FMSPC>/{sgx,tdx}-tcb-info.json    + -issuer-chain.pem
        {sgx,tdx}-qe-identity.json               + -issuer-chain.pem
        pck-crl-{platform,processor}.der         + -issuer-chain.pem   (DER, PEM or hex)
        root-ca-crl.der                                                 (DER, PEM or hex)

    The documents are the PCS responses as served; the chains the decoded PEM of their
    headers. Every name is built from a validated request, never from input text."""

    def __init__(self, directory: Path) -> None:
        self._directory = OfflineDirectory(directory, max_bytes=MAX_ITEM_BYTES)

    def _fetch(self, request: CollateralRequest) -> Collateral:
        read = self._directory.read
        tee, fmspc, ca = request.tee, request.fmspc.hex().upper(), request.pck_ca
        return Collateral(
            tcb_info=read(f"fmspc/{fmspc}/{tee}-tcb-info.json"),
            tcb_info_issuer_chain=read(f"fmspc/{fmspc}/{tee}-tcb-info-issuer-chain.pem"),
            qe_identity=read(f"{tee}-qe-identity.json"),
            qe_identity_issuer_chain=read(f"{tee}-qe-identity-issuer-chain.pem"),
            pck_crl=crl_der(read(f"pck-crl-{ca}.der")),
            pck_crl_issuer_chain=read(f"pck-crl-{ca}-issuer-chain.pem"),
            root_ca_crl=crl_der(read("root-ca-crl.der")),
        )


def _encode(collateral: Collateral) -> bytes:
    record = {
        f.name: base64.b64encode(getattr(collateral, f.name)).decode("ascii")
        for f in fields(Collateral)
    }
    return json.dumps(record).encode("ascii")


def _decode(data: bytes) -> Collateral:
    record = json.loads(data)
    return Collateral(
        **{f.name: base64.b64decode(record[f.name], validate=True) for f in fields(Collateral)}
    )


# one item per TEE, FMSPC and PCK CA: the seven documents, base64 in a JSON record
_KEEPING = Keeping(encode=_encode, decode=_decode, expires=earliest_next_update)
# seven documents of up to MAX_ITEM_BYTES each, in base64 (4/3) with their names
_RECORD_BYTES = 10 * MAX_ITEM_BYTES


class CachingFetcher(CollateralFetcher):
    """Keeps what ``inner`` fetched in memory and, given a ``directory``, in a 0600 file per TEE,
    FMSPC and PCK CA; serves it until its earliest ``nextUpdate``, then fetches again. A failed
    refresh is an error, not a reason to serve expired collateral: the verifier would refuse it
    anyway. Concurrent fetches of one item share one round of requests."""

    def __init__(
        self,
        inner: CollateralFetcher,
        directory: Path | None,
        *,
        clock: Clock,
        limits: CacheLimits | None = None,
    ) -> None:
        self.inner = inner
        self.cache = CollateralCache(
            directory, limits=limits or CacheLimits(item_bytes=_RECORD_BYTES), clock=clock
        )

    def close(self) -> None:
        self.inner.close()

    def _fetch(self, request: CollateralRequest) -> Collateral:
        key = f"{request.tee}-{request.fmspc.hex()}-{request.pck_ca}.json"
        return self.cache.get(key, lambda: self.inner.fetch(request), _KEEPING)

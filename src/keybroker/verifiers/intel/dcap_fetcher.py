"""Where DCAP collateral comes from: Intel PCS or a PCCS over HTTPS, a directory prepared
offline, and an on-disk cache in front of either. All of Keybroker's DCAP I/O lives here.

A fetcher is trusted for availability and freshness, never for integrity: the verifier
(:func:`~keybroker.verifiers.intel.dcap_collateral.verify_collateral`) checks every signature,
CRL and date of what it is handed, so a fetcher only moves bytes. What a fetcher can still do
wrong is serve old but validly signed collateral (a TCB Info from before a TCB recovery, until its
``nextUpdate``); that is why plain HTTP is refused unless ``insecure_http`` is set.

::

    CollateralFetcher (ABC)   fetch(request) -> Collateral; any failure -> ServiceUnavailableError
    ├── PcsFetcher            Intel PCS v4 API, or a PCCS (same API), with httpx and a timeout
    ├── DirectoryFetcher      files laid out per FMSPC, for air-gapped deployments
    └── CachingFetcher        wraps another: one 0600 file per request, reused until the
                              collateral's earliest nextUpdate, replaced atomically
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import re
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import httpx

from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.storage.local_fs import write_atomically
from keybroker.verifiers.intel.dcap_collateral import (
    MAX_ITEM_BYTES,
    Collateral,
    CollateralRequest,
    earliest_next_update,
)

logger = logging.getLogger(__name__)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
# the CRL distribution point of the pinned Intel SGX Root CA (Intel PCS has no rootcacrl API)
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
TCB_INFO_CHAIN = "TCB-Info-Issuer-Chain"
QE_IDENTITY_CHAIN = "SGX-Enclave-Identity-Issuer-Chain"
PCK_CRL_CHAIN = "SGX-PCK-CRL-Issuer-Chain"
_API_SUFFIX = re.compile(r"/(sgx|tdx)/certification/v[34]/?$")


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of an offline collateral file, refused when larger than ``limit``;
    FileNotFoundError when there is none (callers fall back or report it)."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ServiceUnavailableError(f"{path} is larger than {limit} bytes")
    return data


class CollateralFetcher(ABC):
    """The collateral a quote needs, from wherever this fetcher keeps it."""

    def fetch(self, request: CollateralRequest) -> Collateral:
        try:
            return self._fetch(request)
        except ServiceUnavailableError:
            raise
        except Exception as e:  # any fetch failure is the service's, never the evidence's
            raise ServiceUnavailableError(
                f"DCAP collateral for {request.tee} FMSPC {request.fmspc.hex().upper()} could "
                f"not be fetched: {e}"
            ) from e

    @abstractmethod
    def _fetch(self, request: CollateralRequest) -> Collateral: ...


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
        base = _API_SUFFIX.sub("", base_url.rstrip("/"))
        scheme = httpx.URL(base).scheme
        if scheme not in ("https", "http") or (scheme == "http" and not insecure_http):
            raise ConfigError(
                f"the DCAP collateral service {base_url!r} is not HTTPS (set insecure_http to "
                "allow plain HTTP, which lets anyone on the path replay old collateral)"
            )
        if update not in ("early", "standard"):
            raise ConfigError(f"the TCB update stream is 'early' or 'standard', not {update!r}")
        self._base, self._update, self._insecure_http = base, update, scheme == "http"
        self._root_ca_crl_url = root_ca_crl_url or f"{base}/sgx/certification/v4/rootcacrl"
        verify: ssl.SSLContext | bool = True
        if ca_pem is not None:
            verify = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
        self._client = client or httpx.Client(timeout=timeout, verify=verify)

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
        self._client.close()

    def _fetch(self, request: CollateralRequest) -> Collateral:
        if self._insecure_http:
            logger.warning("INSECURE: DCAP collateral fetched over plain HTTP from %s", self._base)
        tee, fmspc = request.tee, request.fmspc.hex().upper()
        tcb_info, tcb_chain = self._get(
            f"{self._base}/{tee}/certification/v4/tcb",
            {"fmspc": fmspc, "update": self._update},
            TCB_INFO_CHAIN,
        )
        qe_identity, qe_chain = self._get(
            f"{self._base}/{tee}/certification/v4/qe/identity",
            {"update": self._update},
            QE_IDENTITY_CHAIN,
        )
        pck_crl, pck_crl_chain = self._get(
            f"{self._base}/sgx/certification/v4/pckcrl",
            {"ca": request.pck_ca, "encoding": "der"},
            PCK_CRL_CHAIN,
        )
        root_ca_crl, _ = self._get(self._root_ca_crl_url, {}, None)
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
        self, url: str, params: dict[str, str], chain_header: str | None
    ) -> tuple[bytes, bytes]:
        """(body, issuer chain PEM) of one GET, reading no more than MAX_ITEM_BYTES."""
        with self._client.stream("GET", url, params=params) as response:
            if response.status_code != 200:
                raise ServiceUnavailableError(f"{url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ITEM_BYTES:
                    raise ServiceUnavailableError(f"{url} sent more than {MAX_ITEM_BYTES} bytes")
            chain = b""
            if chain_header is not None:
                encoded = response.headers.get(chain_header)
                if not encoded:
                    raise ServiceUnavailableError(f"{url} sent no {chain_header} header")
                chain = unquote(encoded).encode("ascii")
        return bytes(body), chain


class DirectoryFetcher(CollateralFetcher):
    """Collateral prepared offline, laid out per FMSPC (uppercase hex)::

        fmspc/<FMSPC>/{sgx,tdx}-tcb-info.json    + -issuer-chain.pem
        {sgx,tdx}-qe-identity.json               + -issuer-chain.pem
        pck-crl-{platform,processor}.der         + -issuer-chain.pem   (DER, PEM or hex)
        root-ca-crl.der                                                 (DER, PEM or hex)

    The documents are the PCS responses as served; the chains the decoded PEM of their
    headers. Every name is built from a validated request, never from input text."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _read(self, relative: str) -> bytes:
        return read_bounded(self._directory / relative, MAX_ITEM_BYTES)

    def _fetch(self, request: CollateralRequest) -> Collateral:
        tee, fmspc, ca = request.tee, request.fmspc.hex().upper(), request.pck_ca
        return Collateral(
            tcb_info=self._read(f"fmspc/{fmspc}/{tee}-tcb-info.json"),
            tcb_info_issuer_chain=self._read(f"fmspc/{fmspc}/{tee}-tcb-info-issuer-chain.pem"),
            qe_identity=self._read(f"{tee}-qe-identity.json"),
            qe_identity_issuer_chain=self._read(f"{tee}-qe-identity-issuer-chain.pem"),
            pck_crl=crl_der(self._read(f"pck-crl-{ca}.der")),
            pck_crl_issuer_chain=self._read(f"pck-crl-{ca}-issuer-chain.pem"),
            root_ca_crl=crl_der(self._read("root-ca-crl.der")),
        )


class CachingFetcher(CollateralFetcher):
    """Keeps what ``inner`` fetched in ``directory`` (one 0600 file per TEE, FMSPC and PCK CA)
    and serves it until its earliest ``nextUpdate``; then, or when the file is unreadable,
    fetches again and replaces the file atomically. A failed refresh is an error, not a reason
    to serve expired collateral: the verifier would refuse it anyway."""

    def __init__(
        self,
        inner: CollateralFetcher,
        directory: Path,
        *,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self._inner, self._directory, self._clock = inner, directory, clock
        # what this process already read or fetched, with its earliest nextUpdate, so a
        # cache hit costs neither a file read nor a parse of the CRLs
        self._held: dict[Path, tuple[Collateral, datetime.datetime]] = {}

    def _path(self, request: CollateralRequest) -> Path:
        return self._directory / f"{request.tee}-{request.fmspc.hex()}-{request.pck_ca}.json"

    def _fetch(self, request: CollateralRequest) -> Collateral:
        path = self._path(request)
        now = self._clock()
        held = self._held.get(path)
        if held is not None and now < held[1]:
            return held[0]
        cached = self._load(path)
        if cached is not None and self._hold(path, cached, now):
            return cached
        fresh = self._inner.fetch(request)
        self._store(path, fresh)
        self._hold(path, fresh, now)
        return fresh

    def _hold(self, path: Path, collateral: Collateral, now: datetime.datetime) -> bool:
        """Keep ``collateral`` in memory if it is still before its nextUpdate."""
        next_update = earliest_next_update(collateral)
        if next_update is None or now >= next_update:
            self._held.pop(path, None)
            return False
        self._held[path] = (collateral, next_update)
        return True

    @staticmethod
    def _load(path: Path) -> Collateral | None:
        try:
            with path.open("rb") as file:
                record = json.loads(file.read(8 * MAX_ITEM_BYTES))
            return Collateral(
                **{f.name: base64.b64decode(record[f.name]) for f in fields(Collateral)}
            )
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged cache file is a miss, not an outage
            logger.warning("ignoring unreadable DCAP collateral cache file %s: %s", path, e)
            return None

    def _store(self, path: Path, collateral: Collateral) -> None:
        record = {
            f.name: base64.b64encode(getattr(collateral, f.name)).decode("ascii")
            for f in fields(Collateral)
        }
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record).encode("ascii"))  # 0600, all or nothing

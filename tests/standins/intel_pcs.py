"""A STAND-IN for Intel's Provisioning Certification Service (PCS API v4), and for a PCCS, for
tests: the collateral endpoints Keybroker's ``PcsFetcher`` uses, nothing else.

Not Intel PCS. Over real HTTP(S) on a loopback port it serves what Intel's API documentation
describes:

- ``GET /{sgx,tdx}/certification/v4/tcb?fmspc=<12 hex>``: the TCB Info document and the
  ``TCB-Info-Issuer-Chain`` header (URL-encoded PEM); 400 for a malformed FMSPC, 404 for an
  unknown one;
- ``GET /{sgx,tdx}/certification/v4/qe/identity``: the QE (or TD QE) Identity and the
  ``SGX-Enclave-Identity-Issuer-Chain`` header;
- ``GET /sgx/certification/v4/pckcrl?ca={platform,processor}[&encoding=der]``: the PCK CRL
  (DER with ``encoding=der``, PEM otherwise) and the ``SGX-PCK-CRL-Issuer-Chain`` header;
- ``GET /sgx/certification/v4/rootcacrl``: the Root CA CRL as hex text, as a PCCS serves it;
- ``GET /IntelSGXRootCA.der``: the Root CA CRL as DER, as Intel's distribution point does.

Test instrumentation that is not PCS: ``requests`` (every path and query served),
``available`` (False: every request is 503), ``omit_chains`` (issuer chain headers left out),
``oversize`` (bodies padded past Keybroker's limit) and ``hold`` (requests wait on this event).
"""

from __future__ import annotations

import asyncio
import re
import threading
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keybroker.verifiers.intel.dcap_collateral import Collateral, CollateralRequest


class PcsStandIn:
    def __init__(self) -> None:
        self.tcb_info: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # (tee, FMSPC) -> doc, chain
        self.qe_identity: dict[str, tuple[bytes, bytes]] = {}
        self.pck_crl: dict[str, tuple[bytes, bytes]] = {}  # ca -> DER, chain
        self.root_ca_crl = b""
        self.requests: list[str] = []
        self.available = True
        self.omit_chains = False
        self.oversize = False
        self.hold: threading.Event | None = None

    def serve(self, request: CollateralRequest, collateral: Collateral) -> None:
        """Serve ``collateral`` for ``request``, as PCS would after Intel published it."""
        fmspc = request.fmspc.hex().upper()
        self.tcb_info[request.tee, fmspc] = (collateral.tcb_info, collateral.tcb_info_issuer_chain)
        self.qe_identity[request.tee] = (
            collateral.qe_identity,
            collateral.qe_identity_issuer_chain,
        )
        self.pck_crl[request.pck_ca] = (collateral.pck_crl, collateral.pck_crl_issuer_chain)
        self.root_ca_crl = collateral.root_ca_crl

    def _answer(self, body: bytes, chain_header: str | None, chain: bytes) -> Response:
        headers = {}
        if chain_header and not self.omit_chains:
            headers[chain_header] = quote(chain.decode("ascii"), safe="")
        if self.oversize:
            body += b" " * (1024 * 1024 + 1)
        return Response(body, headers=headers)

    async def _gate(self, request: Request) -> Response | None:
        self.requests.append(
            request.url.path + (f"?{request.url.query}" if request.url.query else "")
        )
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 10)
        if not self.available:
            return Response("service unavailable", status_code=503)
        return None

    async def tcb(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        fmspc = request.query_params.get("fmspc", "")
        if not re.fullmatch(r"[0-9A-Fa-f]{12}", fmspc):
            return Response("bad fmspc", status_code=400)
        found = self.tcb_info.get((request.path_params["tee"], fmspc.upper()))
        if found is None:
            return Response(status_code=404)
        return self._answer(found[0], "TCB-Info-Issuer-Chain", found[1])

    async def qe_identity_route(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        found = self.qe_identity.get(request.path_params["tee"])
        if found is None:
            return Response(status_code=404)
        return self._answer(found[0], "SGX-Enclave-Identity-Issuer-Chain", found[1])

    async def pckcrl(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        found = self.pck_crl.get(request.query_params.get("ca", ""))
        if found is None:
            return Response("bad ca", status_code=400)
        der, chain = found
        if request.query_params.get("encoding") != "der":
            der = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
        return self._answer(der, "SGX-PCK-CRL-Issuer-Chain", chain)

    async def rootcacrl(self, request: Request) -> Response:
        refused = await self._gate(request)
        return refused or self._answer(self.root_ca_crl.hex().encode(), None, b"")

    async def distribution_point(self, request: Request) -> Response:
        refused = await self._gate(request)
        return refused or self._answer(self.root_ca_crl, None, b"")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/{tee:str}/certification/v4/tcb", self.tcb),
                Route("/{tee:str}/certification/v4/qe/identity", self.qe_identity_route),
                Route("/sgx/certification/v4/pckcrl", self.pckcrl),
                Route("/sgx/certification/v4/rootcacrl", self.rootcacrl),
                Route("/IntelSGXRootCA.der", self.distribution_point),
            ]
        )

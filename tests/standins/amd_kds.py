"""A STAND-IN for AMD's Key Distribution Service (KDS), for tests: the endpoints Keybroker's
``KdsFetcher`` uses, as AMD's "VCEK Certificate and KDS Interface Specification" (57230)
documents them, nothing else.

Not AMD KDS. Over real HTTP(S) on a loopback port it serves:

- ``GET /vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=[&fmcSPL=]``: a VCEK (DER).
  The hwid is 128 hex digits, 16 on Turin (where fmcSPL is required); SPLs are decimal and a
  missing one counts as 0, as KDS does. 400 for a malformed hwid or SPL, 404 for a VCEK it does
  not have;
- ``GET /vcek/v1/{product}/cert_chain``: PEM ASK then ARK;
- ``GET /vlek/v1/{product}/cert_chain``: PEM ASVK then ARK;
- ``GET /vcek/v1/{product}/crl``: the ARK's CRL (DER).

An unknown product is 404. Test instrumentation that is not KDS: ``requests`` (every path and
query served), ``available`` (False: every request is 503), ``oversize`` (bodies padded past
Keybroker's limit) and ``hold`` (requests wait on this event).
"""

from __future__ import annotations

import asyncio
import re
import threading

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keybroker.verifiers.amd.snp_report import Product, TcbVersion

_SPLS = ("fmcSPL", "blSPL", "teeSPL", "snpSPL", "ucodeSPL")


class KdsStandIn:
    def __init__(self) -> None:
        self.vceks: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
        self.cert_chains: dict[tuple[str, str], bytes] = {}  # (vcek|vlek, product) -> PEM
        self.crls: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.available = True
        self.oversize = False
        self.hold: threading.Event | None = None

    def serve_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion, der: bytes) -> None:
        """Serve ``der`` as the VCEK of chip ``hwid`` (8 bytes on Turin) at ``tcb``."""
        spls = (tcb.fmc or 0, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode)
        self.vceks[product.value, hwid.hex(), spls] = der

    def _answer(self, body: bytes, media_type: str) -> Response:
        if self.oversize:
            body += b"\0" * (256 * 1024 + 1)
        return Response(body, media_type=media_type)

    async def _gate(self, request: Request) -> Response | None:
        self.requests.append(
            request.url.path + (f"?{request.url.query}" if request.url.query else "")
        )
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 10)
        if not self.available:
            return Response("service unavailable", status_code=503)
        if request.path_params["product"] not in {p.value for p in Product}:
            return Response("unknown product", status_code=404)
        return None

    async def vcek(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        product, hwid = request.path_params["product"], request.path_params["hwid"]
        turin = product == Product.TURIN.value
        if not re.fullmatch(r"[0-9a-fA-F]{16}" if turin else r"[0-9a-fA-F]{128}", hwid):
            return Response("bad hwid", status_code=400)
        spls = []
        for name in _SPLS:
            text = request.query_params.get(name, "0")
            if not text.isdigit() or int(text) > 255:
                return Response(f"bad {name}", status_code=400)
            spls.append(int(text))
        if turin and "fmcSPL" not in request.query_params:
            return Response("fmcSPL is required", status_code=400)
        found = self.vceks.get((product, hwid.lower(), tuple(spls)))
        if found is None:
            return Response(status_code=404)
        return self._answer(found, "application/x-x509-ca-cert")

    async def cert_chain(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        kind = request.url.path.split("/")[1]
        found = self.cert_chains.get((kind, request.path_params["product"]))
        if found is None:
            return Response(status_code=404)
        return self._answer(found, "application/x-pem-file")

    async def crl(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused:
            return refused
        found = self.crls.get(request.path_params["product"])
        if found is None:
            return Response(status_code=404)
        return self._answer(found, "application/pkix-crl")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/vcek/v1/{product:str}/cert_chain", self.cert_chain),
                Route("/vlek/v1/{product:str}/cert_chain", self.cert_chain),
                Route("/vcek/v1/{product:str}/crl", self.crl),
                Route("/vcek/v1/{product:str}/{hwid:str}", self.vcek),
            ]
        )

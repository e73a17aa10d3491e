"""A STAND-IN for Hygon's Key Distribution Service (``cert.hygon.cn``), for tests: the one
endpoint Keybroker's ``HygonKdsFetcher`` uses, as upstream's attester and verifier call it.

Not Hygon KDS. Over real HTTP on a loopback port it serves ``GET /hsk_cek?snumber=<chip id>``:
the chip's HSK‖CEK file (``application/octet-stream``), 404 for a chip it does not know, 400
without ``snumber``. Test instrumentation that is not KDS: ``requests`` (every query served),
``available`` (False: every request is 503) and ``oversize`` (bodies padded past Keybroker's
limit).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class HygonKdsStandIn:
    def __init__(self) -> None:
        self.hsk_ceks: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.available = True
        self.oversize = False

    async def hsk_cek(self, request: Request) -> Response:
        self.requests.append(request.url.query)
        if not self.available:
            return Response("service unavailable", status_code=503)
        chip = request.query_params.get("snumber")
        if not chip:
            return Response("snumber is required", status_code=400)
        found = self.hsk_ceks.get(chip)
        if found is None:
            return Response(status_code=404)
        if self.oversize:
            found += b"\0" * (64 * 1024 + 1)
        return Response(found, media_type="application/octet-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hsk_cek", self.hsk_cek)])

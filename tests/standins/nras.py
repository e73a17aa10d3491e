"""A STAND-IN for NVIDIA's Remote Attestation Service (NRAS v4), for tests: the endpoints
upstream Trustee's remote mode and Keybroker's ``NrasClient`` use, as NVIDIA documents them.

Not NVIDIA's service. Over real HTTP on a loopback port it serves:

- ``POST /v4/attest/gpu`` and ``POST /v4/attest/switch``: JSON ``{"nonce": <64 hex>, "arch",
  "evidence_list": [{"evidence": <base64>, "certificate": <base64>}], "claims_version":
  "3.0"}``; a malformed body is 400. The answer is ``[["JWT", <overall token>], {"GPU-0":
  <detached EAT>}]`` (``SWITCH-0`` for switches), both ES384 JWTs naming their key by ``kid``;
- ``GET /.well-known/jwks.json``: the JWK set of the signing key.

What it checks like NRAS: the body's shape, and whether the SPDM request in the evidence
carries the request's nonce (``x-nvidia-<gpu|switch>-attestation-report-nonce-match``). What it
does NOT do: verify the report's signature, the device chain or the RIMs; those claims come
from ``claims`` (all passing by default; a test sets ``dbgstat`` and friends to what it needs).

Knobs for attack tests (``NrasStandIn`` attributes): ``claims`` (the EAT's claims),
``sign_with`` (a key outside the JWK set, same kid), ``token_kid`` (another kid in tokens),
``flip_eat_signature``, ``truncate`` (answer cut in half), ``fail_with`` (an HTTP status),
``lifetime`` (seconds until the tokens expire; negative: already expired).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keybroker.protocol.jws import jwk_of, sign_jwt

ISSUER = "https://nras.attestation.nvidia.com"
_RIM_CHECKS = ("fetched", "measurements-available", "schema-validated", "signature-verified")


def passing_claims(endpoint: str) -> dict[str, Any]:
    """The claims NRAS gives a healthy device (claims version 3.0 names)."""
    prefix = f"x-nvidia-{endpoint}"
    chain = {"x-nvidia-cert-ocsp-status": "good", "x-nvidia-cert-status": "valid"}
    rims = ("driver-rim", "vbios-rim") if endpoint == "gpu" else ("bios-rim",)
    claims: dict[str, Any] = {
        f"{prefix}-arch-check": True,
        f"{prefix}-attestation-report-cert-chain": chain,
        f"{prefix}-attestation-report-cert-chain-fwid-match": True,
        f"{prefix}-attestation-report-parsed": True,
        f"{prefix}-attestation-report-signature-verified": True,
        "secboot": True,
        "dbgstat": "disabled",
        "measres": "success",
    }
    for rim in rims:
        claims[f"{prefix}-{rim}-cert-chain"] = chain
        for check in (*_RIM_CHECKS, "version-match"):
            claims[f"{prefix}-{rim}-{check}"] = True
    if endpoint == "gpu":
        claims |= {"x-nvidia-gpu-vbios-version": "96.00.9F.00.01"}
        claims |= {"x-nvidia-gpu-driver-version": "550.90.07"}
    else:
        claims |= {"x-nvidia-switch-bios-version": "96.10.6D.00.01"}
    return claims


class NrasStandIn:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.kid = "nras-stand-in-1"
        self.clock = clock
        self.claims: dict[str, dict[str, Any]] = {
            "gpu": passing_claims("gpu"),
            "switch": passing_claims("switch"),
        }
        self.sign_with: ec.EllipticCurvePrivateKey | None = None
        self.token_kid: str | None = None
        self.flip_eat_signature = False
        self.truncate = False
        self.fail_with: int | None = None
        self.lifetime = 300
        self.requests: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v4/attest/{endpoint}", self.attest, methods=["POST"]),
                Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            ]
        )

    async def jwks(self, request: Request) -> Response:
        jwk = {**jwk_of(self.key.public_key()), "kid": self.kid, "use": "sig", "alg": "ES384"}
        return JSONResponse({"keys": [jwk]})

    async def attest(self, request: Request) -> Response:
        endpoint = request.path_params["endpoint"]
        if endpoint not in ("gpu", "switch"):
            return Response("not found", status_code=404)
        if self.fail_with is not None:
            return Response("failure", status_code=self.fail_with)
        try:
            body = await request.json()
            self.requests.append(body)
            nonce = bytes.fromhex(body["nonce"])
            (item,) = body["evidence_list"]
            report = base64.b64decode(item["evidence"], validate=True)
            if len(nonce) != 32 or not isinstance(item["certificate"], str):
                raise ValueError("bad nonce or certificate")
            if body["claims_version"] != "3.0" or not isinstance(body["arch"], str):
                raise ValueError("bad claims version or arch")
        except (ValueError, KeyError, TypeError, binascii.Error):
            return Response("malformed request", status_code=400)
        answer = self._answer(endpoint, nonce, report).encode()
        if self.truncate:
            answer = answer[: len(answer) // 2]
        return Response(answer, media_type="application/json")

    def _answer(self, endpoint: str, nonce: bytes, report: bytes) -> str:
        now = int(self.clock())
        times = {"iss": ISSUER, "iat": now, "nbf": now, "exp": now + self.lifetime}
        # the SPDM GET_MEASUREMENTS request: version, code, param1, param2, then the nonce
        match = report[4:36] == nonce
        eat = {
            **self.claims[endpoint],
            f"x-nvidia-{endpoint}-attestation-report-nonce-match": match,
            "eat_nonce": nonce.hex(),
            **times,
        }
        signer = self.sign_with or self.key
        detached = sign_jwt(eat, signer, header={"kid": self.token_kid or self.kid})
        if self.flip_eat_signature:
            detached = detached[:-2] + ("A" if detached[-2] != "A" else "B") + detached[-1]
        name = f"{endpoint.upper()}-0"
        overall = {
            "x-nvidia-overall-att-result": match,
            "submods": {
                name: ["DIGEST", ["SHA-256", hashlib.sha256(detached.encode()).hexdigest()]]
            },
            "eat_nonce": nonce.hex(),
            **times,
        }
        token = sign_jwt(overall, signer, header={"kid": self.token_kid or self.kid})
        return json.dumps([["JWT", token], {name: detached}])

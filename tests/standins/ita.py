"""A STAND-IN for Intel Trust Authority (ITA), for tests: ITA's documented REST API, test keys.

Not Intel's service. It serves, over HTTPS from a test CA, what the KBS and an operator use:

- ``POST /appraisal/v2/attest`` and ``POST /appraisal/v2/attest/azure``: an ``x-api-key``
  header, JSON in and out; a body with ``policy_ids``, ``policy_must_match`` and a ``tdx`` or
  ``sgx`` object (``quote``, ``runtime_data``, optional ``user_data`` / ``event_log``) and an
  optional ``nvgpu`` object; the answer ``{"token": <JWT>}`` signed PS384 (or RS256), its header
  naming the key by ``kid``; errors as ``{"error": "..."}`` with a 4xx status;
- ``GET /appraisal/v2/nonce``: a signed verifier nonce (``val``, ``iat``, ``signature``);
- ``GET /certs``: the JWK set of the token-signing key; ``GET /.well-known/openid-configuration``
  names it; ``GET /`` is a portal page, not a key set (as ITA's portal URL, which upstream's
  configs give as ``certs_file``).

What it checks like ITA: the API key, the media types, that every policy id is known, that the
quote parses and its report data is the hash of the runtime data (SHA-512 for TDX, SHA-256 for
SGX and the Azure HCL data), and ``policy_must_match``. What it does NOT do: verify the quote's
signature and PCK chain (Keybroker's own DCAP verifier is tested against Intel's PKI elsewhere);
appraise GPU evidence (it echoes the GPU nonce). Its token claims follow ITA's v2 layout: the
TEE's claims under ``tdx`` / ``sgx`` with ``attester_runtime_data`` (or ``attester_held_data``),
``policy_ids_matched`` / ``policy_ids_unmatched`` at the top.

Knobs for attack tests (``ItaStandIn`` attributes): ``tamper(header, claims)``, ``sign_with``
(a key outside the JWK set), ``unsigned`` (``alg: none``), ``algorithm``, ``delay`` (seconds
before answering), ``fail_with`` ((status, error)).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from keybroker.errors import EvidenceError
from keybroker.protocol.jwk import b64url_encode, compact_json
from keybroker.protocol.jws import jwk_of, sign_jwt
from keybroker.verifiers.intel.dcap import SgxReportBody, TdReportBody, parse_quote
from pki import issue, write
from standins.server import ServedApp

EAT_PROFILE = "https://portal.trustauthority.intel.com/eat_profile.html"
ISSUER = "Intel Trust Authority"

Tamper = Callable[[dict[str, Any], dict[str, Any]], None]
# A policy: its id and a rule over the TEE's claims (True: matched).
PolicyRule = Callable[[dict[str, Any]], bool]


@dataclass
class ItaStandIn:
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    clock: Callable[[], float] = time.time
    token_lifetime: int = 300
    policies: dict[str, PolicyRule] = field(default_factory=dict)
    algorithm: str = "PS384"
    tamper: Tamper | None = None
    sign_with: rsa.RSAPrivateKey | None = None
    unsigned: bool = False
    delay: float = 0.0
    fail_with: tuple[int, str] | None = None
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    api_keys_seen: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.signing_key = rsa.generate_private_key(65537, 3072)
        self.kid = uuid.uuid4().hex

    # --- the key set --------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        jwk = {**jwk_of(self.signing_key.public_key()), "alg": self.algorithm}
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig"}]}

    async def certs(self, request: Request) -> Response:
        return JSONResponse(self.jwks())

    async def discovery(self, request: Request) -> Response:
        return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/certs"})

    async def portal(self, request: Request) -> Response:
        return HTMLResponse("<html><body>Intel Trust Authority stand-in portal</body></html>")

    # --- the appraisal API --------------------------------------------------------------

    def _refused(self, request: Request) -> Response | None:
        key = request.headers.get("x-api-key")
        self.api_keys_seen.append(key)
        if key is None or not secrets.compare_digest(key, self.api_key):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        if "application/json" not in request.headers.get("accept", ""):
            return JSONResponse({"error": "Accept must be application/json"}, status_code=406)
        return None

    async def nonce(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        val, iat = secrets.token_bytes(64), str(int(self.clock())).encode()
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        signature = self.signing_key.sign(val + iat, pss, hashes.SHA384())
        return JSONResponse({"val": _b64(val), "iat": _b64(iat), "signature": _b64(signature)})

    async def attest(self, request: Request) -> Response:
        return await self._attest(request, azure=False)

    async def attest_azure(self, request: Request) -> Response:
        return await self._attest(request, azure=True)

    async def _attest(self, request: Request, *, azure: bool) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_with is not None:
                return _error(*self.fail_with)
            claims = self._claims(body, azure=azure)
        except _RefusalError as e:
            return _error(e.status, str(e))
        if body.get("policy_must_match") and claims.get("policy_ids_unmatched"):
            return _error(400, "attestation failed: the evidence does not match policy_ids")
        return JSONResponse({"token": self._token(claims)})

    async def _body(self, request: Request) -> dict[str, Any]:
        if request.headers.get("content-type") != "application/json":
            raise _RefusalError("Content-Type must be application/json", status=415)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _RefusalError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise _RefusalError("the request body must be a JSON object")
        self.requests.append(body)
        return body

    def _claims(self, body: dict[str, Any], *, azure: bool) -> dict[str, Any]:
        tees = [name for name in ("tdx", "sgx") if name in body]
        if len(tees) != 1 or (azure and tees != ["tdx"]):
            raise _RefusalError("expected exactly one of tdx or sgx evidence (tdx for /azure)")
        tee = tees[0]
        tee_claims = _tee_claims(tee, body[tee], azure=azure)
        policy_ids = body.get("policy_ids") or []
        if not isinstance(policy_ids, list) or any(p not in self.policies for p in policy_ids):
            raise _RefusalError("unknown policy id in policy_ids")
        matched = [p for p in policy_ids if self.policies[p](tee_claims)]
        now = int(self.clock())
        claims: dict[str, Any] = {
            tee: tee_claims,
            "eat_profile": EAT_PROFILE,
            "intuse": "generic",
            "dbgstat": "enabled" if tee_claims[f"{tee}_is_debuggable"] else "disabled",
            "ver": "2.0.0",
            "verifier_instance_ids": [str(uuid.uuid4())],
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime,
        }
        if matched:
            claims["policy_ids_matched"] = [_policy(p) for p in matched]
        unmatched = [p for p in policy_ids if p not in matched]
        if unmatched:
            claims["policy_ids_unmatched"] = [_policy(p) for p in unmatched]
        nvgpu = body.get("nvgpu")
        if isinstance(nvgpu, dict):
            claims["nvgpu"] = {"attester_type": "NVGPU", "gpu_nonce": nvgpu.get("gpu_nonce")}
        return claims

    def _token(self, claims: dict[str, Any]) -> str:
        header: dict[str, Any] = {"kid": self.kid, "jku": f"{self.url}/certs"}
        if self.tamper is not None:
            self.tamper(header, claims)
        if self.unsigned:
            full = {"alg": "none", "typ": "JWT", **header}
            return f"{b64url_encode(compact_json(full))}.{b64url_encode(compact_json(claims))}."
        key = self.sign_with or self.signing_key
        return sign_jwt(claims, key, header=header, rsa_algorithm=self.algorithm)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self.portal),
                Route("/certs", self.certs),
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/appraisal/v2/nonce", self.nonce),
                Route("/appraisal/v2/attest", self.attest, methods=["POST"]),
                Route("/appraisal/v2/attest/azure", self.attest_azure, methods=["POST"]),
            ]
        )


class _RefusalError(Exception):
    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise _RefusalError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _RefusalError(f"{what} is not base64") from None


def _policy(policy_id: str) -> dict[str, str]:
    digest = hashlib.sha384(policy_id.encode()).digest()
    return {"id": policy_id, "version": "v1", "hash": _b64(digest)}


def _tee_claims(tee: str, evidence: object, *, azure: bool) -> dict[str, Any]:
    if not isinstance(evidence, dict):
        raise _RefusalError(f"{tee} must be an object")
    try:
        quote = parse_quote(_unb64(evidence.get("quote"), "quote"))
    except EvidenceError as e:
        raise _RefusalError(f"the quote does not parse: {e.detail}") from None
    runtime = _unb64(evidence.get("runtime_data"), "runtime_data")
    body = quote.body
    if tee == "tdx" and isinstance(body, TdReportBody):
        if azure:  # the TD quote binds the HCL runtime data, with SHA-256
            bound = body.report_data[:32] == hashlib.sha256(runtime).digest()
        else:
            bound = body.report_data == hashlib.sha512(runtime).digest()
        claims: dict[str, Any] = {
            "attester_type": "TDX",
            "tdx_mrtd": body.mr_td.hex(),
            **{f"tdx_rtmr{i}": rtmr.hex() for i, rtmr in enumerate(body.rtmrs)},
            "tdx_mrseam": body.mr_seam.hex(),
            "tdx_is_debuggable": bool(body.td_attributes[0] & 1),
            "tdx_report_data": body.report_data.hex(),
        }
    elif tee == "sgx" and isinstance(body, SgxReportBody):
        bound = body.report_data[:32] == hashlib.sha256(runtime).digest()
        claims = {
            "attester_type": "SGX",
            "sgx_mrenclave": body.mr_enclave.hex(),
            "sgx_mrsigner": body.mr_signer.hex(),
            "sgx_isvprodid": int.from_bytes(body.isv_prod_id, "little"),
            "sgx_isvsvn": int.from_bytes(body.isv_svn, "little"),
            "sgx_is_debuggable": bool(body.attributes[0] & 2),
            "sgx_report_data": body.report_data.hex(),
        }
    else:
        raise _RefusalError(f"the quote is not a {tee} quote")
    if not bound:
        raise _RefusalError("the quote's report data does not match the runtime data")
    claims["attester_tcb_status"] = "UpToDate"
    _echo(claims, runtime, "attester_runtime_data")
    if azure:  # the Azure TD's own runtime data above; the caller's data as user data
        _echo(claims, _unb64(evidence.get("user_data"), "user_data"), "attester_user_data")
    return claims


def _echo(claims: dict[str, Any], data: bytes, json_claim: str) -> None:
    """JSON object runtime data comes back as a JSON claim, anything else as held data."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        claims[json_claim] = parsed
    else:
        claims["attester_held_data"] = _b64(data)


# --- serving it -------------------------------------------------------------------------------


class ItaEndpoints(NamedTuple):
    """What a KBS configuration needs to use a running stand-in."""

    base_url: str  # [attestation_service] base_url
    jwks_url: str  # certs_file, and [attestation_token] trusted_jwk_sets
    ca_path: Path  # the test CA: give it to the KBS as SSL_CERT_FILE
    api_key: str


@contextmanager
def running_ita_standin(
    workdir: Path, stand_in: ItaStandIn | None = None
) -> Iterator[ItaEndpoints]:
    """Serve ``stand_in`` (a fresh one without it) on loopback HTTPS, its certificate issued by
    a test CA written to ``workdir/ita-ca.pem``."""
    stand_in = stand_in or ItaStandIn()
    ca = issue("Keybroker test CA for the ITA stand-in")
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf = issue("127.0.0.1", ca, ca=False, extensions=[(san, False)])
    ca_path = write(workdir / "ita-ca.pem", ca)
    cert_path = write(workdir / "ita.pem", leaf)
    key_path = workdir / "ita.key"
    key_path.write_bytes(leaf.key_pem())
    server = ServedApp(stand_in.app(), certfile=cert_path, keyfile=key_path)
    server.start()
    stand_in.url = server.url
    try:
        yield ItaEndpoints(server.url, f"{server.url}/certs", ca_path, stand_in.api_key)
    finally:
        server.stop()

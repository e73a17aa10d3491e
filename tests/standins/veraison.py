"""A STAND-IN for a Veraison verification service, for tests: Veraison's documented
well-known and challenge-response APIs, with test keys.

Not Veraison. It serves, over HTTPS from a test CA:

- ``GET /.well-known/veraison/verification``: the discovery document (``ear-verification-key``
  as a JWK, ``media-types``, ``version``, ``state``, ``api-endpoints.newChallengeResponseSession``);
- ``POST /challenge-response/v1/newSession?nonce=<base64url>`` (or ``nonceSize=N``): ``201
  Created``, ``Location`` of the session, the session object ``{nonce, expiry, accept,
  status: "waiting"}``; a nonce outside 8..64 bytes is a ``400`` problem detail;
- ``POST /challenge-response/v1/session/<id>``: the evidence, its ``Content-Type`` one of the
  session's ``accept`` list (else ``415``); the synchronous answer ``200`` with ``status:
  "complete"`` and ``result``, an EAR signed ES256;
- ``GET`` and ``DELETE`` of the session.

What it appraises, like Veraison's CCA scheme: the platform token's signature with the CPAK
it was given for that instance id (``CCA_SSD_PLATFORM``: ``affirming``, else
``contraindicated``), the realm token's signature with the RAK it carries and the RAK binding
(``CCA_REALM``'s ``instance-identity`` 2, else 96). It does NOT match firmware reference
values. Its CBOR and COSE handling is its own (``cbor2`` and ``cryptography``), not
Keybroker's.

Knobs for attack tests (``VeraisonStandIn`` attributes): ``sign_with`` (an EAR key outside the
discovery document), ``ear_nonce`` (an EAR for another nonce), ``asynchronous`` (answer 202),
``location`` (a session URL of the test's choosing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keybroker.protocol.jws import jwk_of, sign_jwt
from pki import issue, write
from standins.server import ServedApp

CCA_MEDIA_TYPE = 'application/eat-collection; profile="http://arm.com/CCA-SSD/1.0.0"'
SESSION_MEDIA_TYPE = "application/vnd.veraison.challenge-response-session+json"
NEW_SESSION = "/challenge-response/v1/newSession"
_HASHES = {-7: hashes.SHA256(), -35: hashes.SHA384(), -36: hashes.SHA512()}


def _problem(status: int, detail: str) -> Response:
    return JSONResponse(
        {"type": "about:blank", "title": "stand-in refusal", "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def _cose_verify(raw: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    """The payload of a COSE_Sign1 signed by ``key``; InvalidSignature otherwise."""
    protected, _, payload, signature = cbor2.loads(raw).value
    alg = cbor2.loads(protected)[1]
    width = len(signature) // 2
    der = encode_dss_signature(
        int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big")
    )
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    key.verify(der, to_be_signed, ec.ECDSA(_HASHES[alg]))
    return bytes(payload)


@dataclass
class VeraisonStandIn:
    cpaks: dict[bytes, ec.EllipticCurvePublicKey]  # instance id -> endorsed CPAK
    ear_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    sign_with: ec.EllipticCurvePrivateKey | None = None
    ear_nonce: bytes | None = None
    asynchronous: bool = False
    location: str | None = None
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "ear-verification-key": {**jwk_of(self.ear_key.public_key()), "alg": "ES256"},
                "media-types": [CCA_MEDIA_TYPE],
                "version": "stand-in",
                "state": "READY",
                "api-endpoints": {"newChallengeResponseSession": NEW_SESSION},
            },
            media_type="application/vnd.veraison.discovery+json",
        )

    async def new_session(self, request: Request) -> Response:
        text = request.query_params.get("nonce")
        if text is not None:
            try:
                nonce = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                return _problem(400, "nonce is not base64url")
        else:
            nonce = secrets.token_bytes(int(request.query_params.get("nonceSize", "32")))
        if not 8 <= len(nonce) <= 64:
            return _problem(400, "nonce must be 8 to 64 bytes")
        session_id = secrets.token_hex(8)
        self.sessions[session_id] = {
            "nonce": base64.b64encode(nonce).decode(),
            "expiry": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
            "accept": [CCA_MEDIA_TYPE],
            "status": "waiting",
        }
        location = self.location or f"/challenge-response/v1/session/{session_id}"
        return JSONResponse(
            self.sessions[session_id],
            status_code=201,
            headers={"Location": location},
            media_type=SESSION_MEDIA_TYPE,
        )

    async def session(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        session = self.sessions.get(session_id)
        if session is None:
            return _problem(404, "no such session")
        if request.method == "DELETE":
            self.deleted.append(session_id)
            del self.sessions[session_id]
            return Response(status_code=204)
        if request.method == "GET":
            return JSONResponse(session, media_type=SESSION_MEDIA_TYPE)
        return await self._submit(session, request)

    async def _submit(self, session: dict[str, Any], request: Request) -> Response:
        if request.headers.get("content-type") not in session["accept"]:
            return _problem(415, "unsupported evidence media type")
        token = await request.body()
        session["evidence"] = {"type": CCA_MEDIA_TYPE, "value": base64.b64encode(token).decode()}
        if self.asynchronous:
            session["status"] = "processing"
            return JSONResponse(session, status_code=202, media_type=SESSION_MEDIA_TYPE)
        try:
            submods = self._appraise(token)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, cbor2.CBORError):
            session["status"] = "failed"
            return _problem(400, "the evidence is not a CCA token")
        nonce = base64.b64decode(session["nonce"])
        claims = {
            "eat_profile": "tag:github.com,2023:veraison/ear",
            "iat": int(time.time()),
            "ear.verifier-id": {"build": "stand-in", "developer": "https://veraison-project.org"},
            "eat_nonce": base64.urlsafe_b64encode(self.ear_nonce or nonce).decode().rstrip("="),
            "submods": submods,
        }
        session["status"] = "complete"
        session["result"] = sign_jwt(claims, self.sign_with or self.ear_key)
        return JSONResponse(session, media_type=SESSION_MEDIA_TYPE)

    def _appraise(self, token: bytes) -> dict[str, Any]:
        collection = cbor2.loads(token).value
        raw_platform, raw_realm = collection[44234], collection[44241]
        unverified_platform = cbor2.loads(cbor2.loads(raw_platform).value[2])
        instance = unverified_platform[256]
        cpak = self.cpaks.get(instance)
        platform_ok = False
        if cpak is not None:
            try:
                _cose_verify(raw_platform, cpak)
                platform_ok = True
            except InvalidSignature:
                pass
        realm = cbor2.loads(cbor2.loads(raw_realm).value[2])
        rak = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), realm[44237])
        digest = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}[realm[44240]]
        try:
            _cose_verify(raw_realm, rak)
            realm_ok = digest(realm[44237]).digest() == unverified_platform[10]
        except InvalidSignature:
            realm_ok = False
        platform_vector = {"instance-identity": 2 if platform_ok else 96, "hardware": 2}
        realm_vector = {"instance-identity": 2 if platform_ok and realm_ok else 96}
        return {
            "CCA_SSD_PLATFORM": {
                "ear.status": "affirming" if platform_ok else "contraindicated",
                "ear.trustworthiness-vector": platform_vector,
                "ear.veraison.annotated-evidence": {
                    "cca-platform-instance-id": base64.b64encode(instance).decode()
                },
            },
            "CCA_REALM": {
                "ear.status": "affirming" if platform_ok and realm_ok else "contraindicated",
                "ear.trustworthiness-vector": realm_vector,
                "ear.veraison.annotated-evidence": {
                    "cca-realm-challenge": base64.b64encode(realm[10]).decode()
                },
            },
        }

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/veraison/verification", self.discovery),
                Route(NEW_SESSION, self.new_session, methods=["POST"]),
                Route(
                    "/challenge-response/v1/session/{session_id}",
                    self.session,
                    methods=["GET", "POST", "DELETE"],
                ),
            ]
        )


@contextmanager
def running_veraison_standin(
    workdir: Path, stand_in: VeraisonStandIn
) -> Iterator[tuple[str, Path]]:
    """Serve ``stand_in`` on loopback HTTPS; yields its URL and the test CA's PEM file."""
    ca = issue("Keybroker test CA for the Veraison stand-in")
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf = issue("127.0.0.1", ca, ca=False, extensions=[(san, False)])
    ca_path = write(workdir / "veraison-ca.pem", ca)
    cert_path = write(workdir / "veraison.pem", leaf)
    key_path = workdir / "veraison.key"
    key_path.write_bytes(leaf.key_pem())
    server = ServedApp(stand_in.app(), certfile=cert_path, keyfile=key_path)
    server.start()
    try:
        yield server.url, ca_path
    finally:
        server.stop()

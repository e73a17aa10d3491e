"""STAND-IN for Google Cloud Secret Manager and Google's OAuth 2.0 token endpoint, over real HTTP.

It implements the documented REST surface the production client
(``keybroker.storage.gcp_secrets``, Google's own ``google-cloud-secret-manager`` with its REST
transport) uses:

- ``GET /v1/projects/{p}/secrets/{s}/versions/{v}:access`` answering
  ``{"name", "payload": {"data": <base64>, "dataCrc32c": "<int64 as a string>"}}``, with Google's
  error bodies ``{"error": {"code", "message", "status"}}``: 404 ``NOT_FOUND``, 403
  ``PERMISSION_DENIED``, 429 ``RESOURCE_EXHAUSTED``, 401 ``UNAUTHENTICATED``;
- ``POST /token``, Google's OAuth 2.0 token endpoint (the ``token_uri`` of a service-account
  key file), for the JWT-bearer grant (RFC 7523) a service account's client sends: the
  assertion must be RS256-signed by a key of a trusted account (``kid`` = its key id,
  ``iss`` = its e-mail), addressed to Google's token service (``aud``), carry the ``scope``,
  be at most an hour long and not expired. It answers ``{"access_token", "expires_in",
  "token_type"}``, or 400 ``invalid_grant`` as Google does;
- the bearer check of the API: the access token must be one this token endpoint issued and not
  expired, else 401 ``UNAUTHENTICATED``.

The test generates every key itself. Nothing of Secret Manager's IAM or replication is modelled.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keybroker.storage.gcp_secrets import crc32c
from standins.server import ServedApp

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The audience Google's token service requires of an assertion, whatever token_uri it was sent to.
TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class ServiceAccount:
    """A service account with a freshly generated RSA key (as ``gcloud iam service-accounts keys
    create`` would hand out)."""

    email: str
    key_id: str = field(default_factory=lambda: secrets.token_hex(20))
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def key_file(self, path: Path, token_uri: str) -> Path:
        """The service-account JSON key file, the form GOOGLE_APPLICATION_CREDENTIALS names."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": "stand-in-project",
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.email,
            "client_id": "100000000000000000001",
            "token_uri": token_uri,
        }
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        return path


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _error(code: int, status: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "status": status}}, status_code=code
    )


class SecretManagerStandIn:
    """The state of one stand-in: secrets of one project, trusted accounts, issued tokens."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.secrets: dict[str, list[bytes]] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.access_tokens: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self.token_lifetime = 3600
        self.denied: set[str] = set()  # secrets the caller may not read (403)
        self.throttle = False
        self.token_unavailable = False  # the token endpoint answers 503
        self.corrupt_checksum = False
        self.access_calls = 0
        self.token_calls = 0
        self.unauthenticated = 0

    def add_secret(self, name: str, value: bytes) -> None:
        """Create the secret if needed and add ``value`` as its newest version."""
        self.secrets.setdefault(name, []).append(value)

    def trust(self, account: ServiceAccount) -> None:
        self.service_accounts[account.email] = account

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is expired from now on."""
        self.access_tokens = dict.fromkeys(self.access_tokens, 0.0)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route(
                    "/v1/projects/{project}/secrets/{secret}/versions/{version}:access",
                    self._access,
                    methods=["GET"],
                ),
            ]
        )

    async def _token(self, request: Request) -> JSONResponse:
        self.token_calls += 1
        if self.token_unavailable:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
        # application/x-www-form-urlencoded, as RFC 6749 has it (parsed here: no multipart dep)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()[:65536]).items()}
        if form.get("grant_type") != JWT_BEARER:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if not self._valid_assertion(form.get("assertion", "")):
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                status_code=400,
            )
        token = f"ya29.stand-in-{secrets.token_urlsafe(24)}"
        self.access_tokens[token] = time.time() + self.token_lifetime
        return JSONResponse(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    async def _access(self, request: Request) -> JSONResponse:
        self.access_calls += 1
        if not self._authenticated(request.headers.get("authorization", "")):
            self.unauthenticated += 1
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        if self.throttle:
            return _error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Access requests' of service "
                "'secretmanager.googleapis.com'.",
            )
        project, secret = request.path_params["project"], request.path_params["secret"]
        version = request.path_params["version"]
        name = f"projects/{project}/secrets/{secret}/versions/{version}"
        if secret in self.denied:
            return _error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'secretmanager.versions.access' denied for resource '{name}'.",
            )
        versions = self.secrets.get(secret) if project == self.project else None
        if not versions or not (version == "latest" or version.isdigit()):
            return _error(404, "NOT_FOUND", f"Secret [{name}] not found or has no versions.")
        number = len(versions) if version == "latest" else int(version)
        if not 1 <= number <= len(versions):
            return _error(404, "NOT_FOUND", f"Secret Version [{name}] not found.")
        data = versions[number - 1]
        checksum = crc32c(data) ^ (1 if self.corrupt_checksum else 0)
        return JSONResponse(
            {
                "name": f"projects/{project}/secrets/{secret}/versions/{number}",
                "payload": {
                    "data": base64.b64encode(data).decode(),
                    "dataCrc32c": str(checksum),  # int64 is a string in Google's JSON
                },
            }
        )

    def _authenticated(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        expiry = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        return expiry is not None and time.time() < expiry

    def _valid_assertion(self, assertion: str) -> bool:
        """Signed by a trusted account's key, for this endpoint and scope, short-lived."""
        try:
            header_b64, payload_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(payload_b64))
            account = self.service_accounts.get(claims.get("iss", ""))
            if account is None or header.get("alg") != "RS256":
                return False
            if header.get("kid") != account.key_id:
                return False
            account.key.public_key().verify(
                _b64url_decode(signature_b64),
                f"{header_b64}.{payload_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, AttributeError, InvalidSignature):
            return False
        if claims.get("aud") != TOKEN_AUDIENCE or SCOPE not in str(claims.get("scope")).split():
            return False
        now, iat, exp = time.time(), claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return False
        return iat - 60 <= now < exp and exp - iat <= 3600


PROJECT = "stand-in-project"


@dataclass
class GcpStandIn:
    server: ServedApp
    state: SecretManagerStandIn
    account: ServiceAccount

    @property
    def token_uri(self) -> str:
        return f"{self.server.url}/token"


def adc_env(credentials_file: Path, tmp_path: Path) -> dict[str, str]:
    """The Application Default Credentials chain's first link, and no other: no gcloud
    configuration of the host, no metadata server probe."""
    return {
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials_file),
        "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud-config"),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",  # never reached: NO_GCE_CHECK; a closed port anyway
    }


@contextmanager
def gcp_stand_in() -> Iterator[GcpStandIn]:
    state = SecretManagerStandIn(PROJECT)
    account = ServiceAccount(f"kbs-reader@{PROJECT}.iam.gserviceaccount.com")
    state.trust(account)
    server = ServedApp(state.app())
    server.start()
    try:
        yield GcpStandIn(server, state, account)
    finally:
        server.stop()


def use_service_account(
    stand_in: GcpStandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    account: ServiceAccount | None = None,
) -> None:
    key_file = (account or stand_in.account).key_file(tmp_path / "sa.json", stand_in.token_uri)
    for name, value in adc_env(key_file, tmp_path).items():
        monkeypatch.setenv(name, value)

"""The Attestation Service over HTTP, as ``restful-as`` serves it (upstream's paths and bodies).

- ``POST /attestation`` ``{"verification_requests": [{"tee", "evidence", "runtime_data":
  {"raw": b64url} | {"structured": {...}}, "init_data": {"init_data_digest": b64url} |
  {"init_data_toml": "..."}, "runtime_data_hash_algorithm"}], "policy_ids": [...]}`` → the
  token (text);
- ``POST /policy`` ``{"policy_id", "policy": b64url}``; ``GET /policy`` →
  ``[{"policy-id": id}, ...]``;
- ``POST /challenge`` ``{"tee", "tee_params"}`` → a nonce (text);
- ``GET /.well-known/jwks.json``; ``GET /healthz``.

Described in docs/restful-as-openapi.yaml. Errors are RFC 7807 problems like the KBS's.

Browsers may call it cross-origin only from the origins given (``restful-as -r``): CORS as
upstream's (methods GET, POST, OPTIONS; headers Content-Type, Authorization; preflight cached a
day). With none given, no CORS headers are sent and browsers keep to the same origin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keybroker.attestation.service import BuiltinAttestationService, supplemental_challenge
from keybroker.attestation.wire import b64url_decode, evidence_from_parts
from keybroker.errors import BadRequestError, KeybrokerError, PayloadTooLargeError
from keybroker.protocol.models import UncheckedJson
from keybroker.protocol.untrusted_json import parse_json

MAX_BODY_BYTES = 16 * 1024 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeDataBody(_Body):
    raw: str | None = None
    structured: dict[str, UncheckedJson] | None = None


class InitDataBody(_Body):
    init_data_digest: str | None = None
    init_data_toml: str | None = None


class IndividualRequest(_Body):
    tee: str
    evidence: str
    runtime_data: RuntimeDataBody | None = None
    init_data: InitDataBody | None = None
    runtime_data_hash_algorithm: str | None = None


class AttestationBody(_Body):
    verification_requests: list[IndividualRequest] = Field(min_length=1)
    policy_ids: list[str] = Field(default_factory=list)


class PolicyBody(_Body):
    policy_id: str
    policy: str


M = TypeVar("M", AttestationBody, PolicyBody)


async def _parse(request: Request, model: type[M]) -> M:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequestError(f"malformed request: `{where}`: {first['msg']}") from None


def create_as_app(
    service: BuiltinAttestationService, allowed_origins: Sequence[str] = ()
) -> Starlette:
    async def attestation(request: Request) -> Response:
        body = await _parse(request, AttestationBody)
        evidence = [
            evidence_from_parts(
                tee=item.tee,
                evidence=item.evidence,
                raw_runtime_data=item.runtime_data.raw if item.runtime_data else None,
                structured_runtime_data=item.runtime_data.structured if item.runtime_data else None,
                init_data_digest=item.init_data.init_data_digest if item.init_data else None,
                init_data_toml=item.init_data.init_data_toml if item.init_data else None,
                hash_algorithm=item.runtime_data_hash_algorithm or "",
            )
            for item in body.verification_requests
        ]
        token = await service.evaluate(evidence, body.policy_ids or ["default"])
        return PlainTextResponse(token)

    async def policy(request: Request) -> Response:
        if request.method == "GET":
            ids = await service.policies.list_ids()
            return JSONResponse([{"policy-id": policy_id} for policy_id in ids])
        body = await _parse(request, PolicyBody)
        try:
            source = b64url_decode(body.policy, "policy").decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("the policy is not UTF-8 text") from None
        await service.set_policy(body.policy_id, source)
        return Response(status_code=200)

    async def challenge(request: Request) -> Response:
        # upstream's body is a flat {"tee": ..., "tee_params": ...} (a map of strings)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"request body exceeds {MAX_BODY_BYTES} bytes")
        inner = parse_json(body, what="challenge request") if body.strip() else {}
        if not isinstance(inner, dict) or not all(isinstance(v, str) for v in inner.values()):
            raise BadRequestError("a challenge request maps names to strings")
        return PlainTextResponse(await supplemental_challenge(service, inner))

    async def jwks(request: Request) -> Response:
        return JSONResponse(service.signer.jwks())

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def render(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, KeybrokerError):
            raise exc
        status = 400 if exc.status == 401 else exc.status  # the AS has no authentication
        return JSONResponse(
            exc.problem(), status_code=status, media_type="application/problem+json"
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        yield

    return Starlette(
        routes=[
            Route("/attestation", attestation, methods=["POST"]),
            Route("/policy", policy, methods=["GET", "POST"]),
            Route("/challenge", challenge, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={KeybrokerError: render},
        lifespan=lifespan,
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=list(allowed_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Content-Type", "Authorization"],
                max_age=86400,
            )
        ]
        if allowed_origins
        else [],
    )

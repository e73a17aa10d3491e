"""The KBS HTTP application: ``create_app(config)`` builds everything and returns a Starlette app.

Routes: ``/kbs/v0/auth`` and ``/attest`` (guests); ``/resource-policy``,
``/attestation-policy``, ``/reference-value[/<id>]`` and ``/policy-explain`` (admin); every
other ``/kbs/v0/<plugin>/<path...>`` dispatched to a plugin; ``/healthz``; ``/metrics``
(Prometheus, behind ``[metrics] access``); the API's own OpenAPI document at
``/kbs/v0/openapi.json``; the admin web console's static files at ``/kbs/v0/console/`` (when
``[console] enabled``; ``audit-log`` is the admin endpoint that reads the audit log back).
Handlers parse, call one
service, serialize: a plugin's path goes to ``kbs.release`` (plugin dispatch, admin guard,
token, resource policy, sealing, audit), an admin endpoint to ``kbs.admin_api`` through the same
admin guard. Every ``KeybrokerError`` is rendered by one handler as RFC 7807 JSON; any other
exception becomes a 500 whose detail reveals nothing.

The services are built once, here, into one frozen :class:`KbsState` (no module globals),
which handlers and tests reach through :func:`kbs_state` only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keybroker.attestation.service import BuiltinAttestationService
from keybroker.config import KbsConfig
from keybroker.errors import (
    AdminDeniedError,
    InvalidRequestPathError,
    KeybrokerError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PluginNotFoundError,
)
from keybroker.kbs.admin_api import ADMIN_ENDPOINTS
from keybroker.kbs.auditing import attestation_outcome, guest_subject, new_request_id
from keybroker.kbs.calls import ApiCall
from keybroker.kbs.console import CONSOLE, Console, console_response
from keybroker.kbs.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from keybroker.kbs.metrics import HttpMetricsMiddleware
from keybroker.kbs.openapi import SPEC_NAME, document_json
from keybroker.kbs.release import Released, ReleaseService
from keybroker.kbs.services import KbsServices, build_services
from keybroker.kbs.sessions import SESSION_COOKIE, Session
from keybroker.plugins.base import PluginResponse
from keybroker.protocol.jws import decode_unverified
from keybroker.storage.provider import StorageProvider

log = logging.getLogger(__name__)

PREFIX = "/kbs/v0/"
INSTANCE_HEADER = "Keybroker-Instance"
_PROBLEM_JSON = "application/problem+json"
METRICS_ACL_PATH = "/kbs/v0/metrics"
_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]


@dataclass(frozen=True, slots=True)
class KbsState:
    """What the handlers share, built once by :func:`create_app`."""

    services: KbsServices
    release: ReleaseService
    instance_id: str  # names this server in /healthz
    metrics_access: Literal["loopback", "admin", "off"]
    console: Console | None  # None: [console] enabled = false


def kbs_state(app: object) -> KbsState:
    """The state :func:`create_app` built for ``app``, checked.

    Starlette's ``app.state`` answers ``Any`` for every attribute, and so does lifespan state
    (``request.state`` is cast, not checked, to whatever the handler declares). This accessor
    narrows with ``isinstance``: mypy checks every use of what it returns, and an app not built
    here fails loudly instead of lending an attribute of the wrong type. It works whether or not
    the lifespan ran (a ``TestClient`` without ``with``), and costs a look-up, no allocation.
    """
    state = getattr(app.state, "kbs", None) if isinstance(app, Starlette) else None
    if not isinstance(state, KbsState):
        raise TypeError("this app was not built by keybroker.kbs.app.create_app")
    return state


def create_app(
    config: KbsConfig,
    *,
    clock: Callable[[], float] = time.time,
    storage: StorageProvider | None = None,
    memory_dir: Path | None = None,
    instance_id: str = "in-process",
    metrics_dir: Path | None = None,
) -> Starlette:
    """The KBS app. ``instance_id`` names this server in ``/healthz`` (see ``server.serve``);
    ``metrics_dir``, the workers' shared metrics directory when there are several."""
    services = build_services(
        config, clock=clock, storage=storage, memory_dir=memory_dir, metrics_dir=metrics_dir
    )
    routes = [
        Route("/healthz", _healthz, methods=["GET"]),
        # Every method reaches the dispatcher, which answers a 405 with the endpoint's own
        # Allow header (the router only knows the union of all endpoints' methods).
        Route("/kbs/v0/{path:path}", _kbs, methods=_EVERY_METHOD),
    ]
    middleware = []
    if config.metrics.access != "off":  # off: no route and no per-request HTTP counting
        routes.append(Route("/metrics", _metrics, methods=["GET"]))
        middleware.append(Middleware(HttpMetricsMiddleware, metrics=services.metrics))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            KeybrokerError: _render_error,
            HTTPException: _render_routing,
            Exception: _render_unexpected,
        },
        lifespan=_lifespan,
    )
    state = KbsState(
        services=services,
        release=ReleaseService(services),
        instance_id=instance_id,
        metrics_access=config.metrics.access,
        console=Console() if config.console.enabled else None,
    )
    app.state.kbs = state
    return app


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    services = kbs_state(app).services
    await services.start()
    try:
        yield
    finally:
        await services.stop()


async def _healthz(request: Request) -> Response:
    # The instance header lets a caller tell which server answered: a test, that it reached
    # the process it started; an operator, which replica a load balancer picked.
    return PlainTextResponse("ok", headers={INSTANCE_HEADER: kbs_state(request.app).instance_id})


async def _metrics(request: Request) -> Response:
    state = kbs_state(request.app)
    services = state.services
    if state.metrics_access == "admin":
        # The ACL sees the scrape as /kbs/v0/metrics: admin ACLs are confined to /kbs paths.
        await services.admin.check(METRICS_ACL_PATH, request.headers.get("authorization"))
    elif not _is_loopback(request):
        raise AdminDeniedError(
            '/metrics is served to loopback clients only ([metrics] access = "loopback")'
        )
    body = await asyncio.to_thread(services.metrics.render)  # reads files with many workers
    return Response(body, media_type=METRICS_CONTENT_TYPE)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else None
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "testclient" and other non-addresses are not loopback
        return False


async def _kbs(request: Request) -> Response:
    state = kbs_state(request.app)
    services = state.services
    raw_path = _raw_path(request)
    name, *rest = _segments(raw_path)
    if name == SPEC_NAME and not rest:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(f"{PREFIX}{SPEC_NAME} answers GET", allow=("GET", "HEAD"))
        return Response(document_json(), media_type="application/json")
    if name == CONSOLE:  # static files, no credential: the page's own calls carry the token
        return console_response(state.console, request.method, tuple(rest))
    peer = request.client.host if request.client else None
    if name in ("auth", "attest") and services.limits is not None:
        # Before the body is read: a flooding client costs as little as possible.
        await services.limits.admit(peer, request.headers.getlist("x-forwarded-for"))
    call = ApiCall(
        method=request.method,
        name=name,
        rest=tuple(rest),
        query=dict(request.query_params),
        body=await _read_body(request, services.payload_limit),
        raw_path=raw_path,
        raw_query=request.scope.get("query_string", b""),
        peer=peer,
        session_id=request.cookies.get(SESSION_COOKIE),
        authorization=request.headers.get("authorization"),
    )
    if call.name in ("auth", "attest"):
        return await _rcar(call, services)
    admin_endpoint = ADMIN_ENDPOINTS.get(call.name)
    if admin_endpoint is not None:
        return await state.release.as_admin(call, partial(admin_endpoint, call, services))
    return _released(await state.release.plugin(call))


async def _rcar(call: ApiCall, services: KbsServices) -> Response:
    handshake = services.handshake
    if handshake is None:
        raise PluginNotFoundError(
            f"/{call.name} is not served: this KBS has no attestation service (passport mode)"
        )
    if call.method != "POST":
        raise MethodNotAllowedError(f"/kbs/v0/{call.name} answers POST only", allow=("POST",))
    if call.name == "auth":
        challenge, session = await handshake.auth(call.body)
        response = JSONResponse(challenge.model_dump(by_alias=True))
        _set_session_cookie(response, session, services)
        return response
    record = partial(
        services.audit.record,
        action="attest",
        target="",
        request_id=new_request_id(),
        peer=call.peer,
    )
    try:
        token, session = await handshake.attest(call.body, call.session_id)
    except KeybrokerError as e:
        await record(decision="failure", subject=None, reason=e.detail)
        raise
    _, claims = decode_unverified(token)  # our own AS just signed it, or ITA's was verified
    if isinstance(services.attestation, BuiltinAttestationService):
        # signed in this process a moment ago with the key the verifier trusts: the session's
        # GETs on this worker recall it instead of verifying the signature again
        services.tokens.remember_issued(token, claims)
    subject, outcome = guest_subject(claims, token), attestation_outcome(claims)
    await record(decision="success", subject=subject, reason=outcome)
    return JSONResponse({"token": token})


def _released(answer: Released) -> Response:
    """A plugin's answer as it is, or the JWE sealing it, as flattened JSON."""
    if isinstance(answer, PluginResponse):
        return _plain(answer)
    return JSONResponse(answer)


def _plain(result: PluginResponse) -> Response:
    return Response(
        result.body,
        status_code=result.status,
        media_type=result.content_type,
        headers=dict(result.headers),
    )


def _set_session_cookie(response: Response, session: Session, services: KbsServices) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        expires=int(session.expires_at - services.clock()),
        # No Path, as upstream: the browser-side default is the request's directory
        # (/kbs/v0, or /<prefix>/kbs/v0 behind a proxy that maps a prefix to the KBS).
        path=None,
        httponly=True,
        samesite="strict",
        secure=services.https,
    )


def _raw_path(request: Request) -> str:
    """The path as sent, percent-encoding kept."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    return raw.decode("latin-1")


def _segments(raw_path: str) -> list[str]:
    """Split the *raw* path, then decode each segment.

    Splitting the decoded path would let ``repo%2Ftype/tag`` pass as three segments, so a
    percent-encoded slash could smuggle a separator past the path checks (traversal).
    """
    path = raw_path.split("?", 1)[0]
    if not path.startswith(PREFIX):
        raise InvalidRequestPathError("request path is not under /kbs/v0/")
    segments = [unquote(s) for s in path[len(PREFIX) :].split("/")]
    if not segments[0]:
        raise InvalidRequestPathError("request path names no endpoint")
    return segments


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"request body of {declared} bytes exceeds {limit} bytes "
            "([http_server] payload_request_size, in MiB)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(
                f"request body exceeds {limit} bytes ([http_server] payload_request_size, in MiB)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _render_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, KeybrokerError):  # Starlette types handlers loosely
        return await _render_unexpected(request, exc)
    level = logging.WARNING if exc.status < 500 else logging.ERROR
    log.log(
        level,
        "%s %s -> %d %s: %s",
        request.method,
        request.url.path,
        exc.status,
        exc.variant,
        exc.detail,
    )
    return JSONResponse(
        exc.problem(), status_code=exc.status, media_type=_PROBLEM_JSON, headers=exc.headers()
    )


async def _render_routing(request: Request, exc: Exception) -> Response:
    """The router's own 404 (a path outside /kbs/v0/ and /healthz) and 405 (a method /healthz
    does not answer), as problems like every other error."""
    if not isinstance(exc, HTTPException):
        return await _render_unexpected(request, exc)
    error: KeybrokerError
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        methods = tuple(m.strip() for m in allow.split(",") if m.strip())
        error = MethodNotAllowedError(f"{request.url.path[:64]} answers {allow}", allow=methods)
    elif exc.status_code == 404:
        error = NotFoundError(f"no endpoint {request.url.path[:64]!r}")
    else:
        error = KeybrokerError(f"HTTP {exc.status_code}")
    return await _render_error(request, error)


async def _render_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    problem = KeybrokerError("internal error; see the KBS log").problem()
    return JSONResponse(problem, status_code=500, media_type=_PROBLEM_JSON)

"""The KBS HTTP application: ``create_app(config)`` builds everything and returns a Starlette app.

Routes: ``/kbs/v0/auth`` and ``/attest`` (guests); ``/resource-policy``,
``/attestation-policy``, ``/reference-value[/<id>]`` and ``/policy-explain`` (admin); every
other ``/kbs/v0/<plugin>/<path...>`` dispatched to a plugin; ``/healthz``; ``/metrics``
(Prometheus, behind ``[metrics] access``); the API's own OpenAPI document at
``/kbs/v0/openapi.json``; the admin web console's static files at ``/kbs/v0/console/`` (when
``[console] enabled``; ``audit-log`` is the admin endpoint that reads the audit log back).
Handlers parse, call one
service, serialize. Every ``KeybrokerError`` is rendered by one handler as RFC 7807 JSON; any
other exception becomes a 500 whose detail reveals nothing.

The services are built once, here, and kept in ``app.state.kbs`` (no module globals).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keybroker.config import KbsConfig
from keybroker.errors import (
    AdminDeniedError,
    InvalidRequestPathError,
    KeybrokerError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PluginNotFoundError,
    PolicyDeniedError,
    TokenNotFoundError,
)
from keybroker.kbs.admin_api import ADMIN_ENDPOINTS, ApiCall
from keybroker.kbs.admin_auth import AdminIdentity
from keybroker.kbs.auditing import (
    admin_subject,
    attestation_outcome,
    guest_subject,
    request_context,
)
from keybroker.kbs.console import CONSOLE, Console, console_response
from keybroker.kbs.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from keybroker.kbs.metrics import HttpMetricsMiddleware, KbsMetrics
from keybroker.kbs.openapi import SPEC_NAME, document_json
from keybroker.kbs.resource_policy import decision
from keybroker.kbs.services import KbsServices, build_services
from keybroker.kbs.sessions import SESSION_COOKIE, Session
from keybroker.kbs.tokens import pointer
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse
from keybroker.protocol.jwe import seal
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.provider import StorageProvider

log = logging.getLogger(__name__)

PREFIX = "/kbs/v0/"
INSTANCE_HEADER = "Keybroker-Instance"
_PROBLEM_JSON = "application/problem+json"
METRICS_ACL_PATH = "/kbs/v0/metrics"
_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
_INIT_DATA_CLAIMS = "/submods/cpu0/ear.veraison.annotated-evidence/init_data_claims"


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
    app.state.kbs = services
    app.state.instance_id = instance_id
    app.state.metrics_access = config.metrics.access
    app.state.console = Console() if config.console.enabled else None
    return app


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    services: KbsServices = app.state.kbs
    await services.start()
    try:
        yield
    finally:
        await services.stop()


async def _healthz(request: Request) -> Response:
    # The instance header lets a caller tell which server answered: a test, that it reached
    # the process it started; an operator, which replica a load balancer picked.
    return PlainTextResponse("ok", headers={INSTANCE_HEADER: request.app.state.instance_id})


async def _metrics(request: Request) -> Response:
    services: KbsServices = request.app.state.kbs
    access: str = request.app.state.metrics_access
    if access == "admin":
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
    services: KbsServices = request.app.state.kbs
    name, *rest = _segments(request)
    if name == SPEC_NAME and not rest:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(f"{PREFIX}{SPEC_NAME} answers GET", allow=("GET", "HEAD"))
        return Response(document_json(), media_type="application/json")
    if name == CONSOLE:  # static files, no credential: the page's own calls carry the token
        return console_response(request.app.state.console, request.method, tuple(rest))
    if name in ("auth", "attest") and services.limits is not None:
        # Before the body is read: a flooding client costs as little as possible.
        peer = request.client.host if request.client else None
        await services.limits.admit(peer, request.headers.getlist("x-forwarded-for"))
    call = ApiCall(
        method=request.method,
        name=name,
        rest=tuple(rest),
        query=dict(request.query_params),
        body=await _read_body(request, services.payload_limit),
    )
    if call.name in ("auth", "attest"):
        return await _rcar(call, request, services)
    admin_endpoint = ADMIN_ENDPOINTS.get(call.name)
    if admin_endpoint is not None:
        return await _admin(call, request, services, lambda: admin_endpoint(call, services))
    return await _plugin(call, request, services)


async def _admin(
    call: ApiCall,
    request: Request,
    services: KbsServices,
    operation: Callable[[], Awaitable[Response]],
) -> Response:
    """Admit, check the audit log can take the record, act, record: exactly one record."""
    request_id, peer = request_context(request)
    action, target = f"admin {call.method} {call.name}", "/".join(call.rest)
    record = partial(
        services.audit.record, action=action, target=target, request_id=request_id, peer=peer
    )
    try:
        identity = await _admit(request, services)
    except KeybrokerError as e:
        await record(decision="deny", subject=None, reason=e.detail)
        raise
    services.audit.ensure_writable()  # refuse the change if it could not be recorded
    try:
        response = await operation()
    except KeybrokerError as e:
        await record(decision="failure", subject=admin_subject(identity), reason=e.detail)
        raise
    await record(decision="allow", subject=admin_subject(identity))
    return response


async def _rcar(call: ApiCall, request: Request, services: KbsServices) -> Response:
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
    request_id, peer = request_context(request)
    record = partial(
        services.audit.record, action="attest", target="", request_id=request_id, peer=peer
    )
    try:
        token, session = await handshake.attest(call.body, request.cookies.get(SESSION_COOKIE))
    except KeybrokerError as e:
        await record(decision="failure", subject=None, reason=e.detail)
        raise
    _, claims = decode_unverified(token)  # our own AS just signed it, or ITA's was verified
    subject, outcome = guest_subject(claims, token), attestation_outcome(claims)
    await record(decision="success", subject=subject, reason=outcome)
    return JSONResponse({"token": token})


async def _plugin(call: ApiCall, request: Request, services: KbsServices) -> Response:
    plugin = services.plugins.get(call.name)
    if plugin is None:
        raise PluginNotFoundError(f"Plugin {call.name[:64]} not found")
    plugin_request = PluginRequest(
        method=call.method, path=call.rest, query=call.query, body=call.body
    )
    allowed = plugin.methods(plugin_request)
    if call.method not in allowed:
        raise MethodNotAllowedError(
            f"plugin {call.name} does not answer {call.method}", allow=allowed
        )
    plugin.check(plugin_request)
    if await plugin.ask_requires_admin(plugin_request):
        return await _admin(
            call, request, services, lambda: _handle_plain(plugin, plugin_request, services.metrics)
        )

    request_id, peer = request_context(request)
    record = partial(
        services.audit.record,
        action=f"release {call.method} {call.name}",
        target="/".join(call.rest),
        request_id=request_id,
        peer=peer,
    )
    try:
        token = await _guest_token(request, services)
        await services.tokens.ensure_keys(token)  # a JWK-set fetch, if any, off the loop
        # signature and certificate-chain checks are CPU work: off the event loop, so a costly
        # token delays only its own request, never /healthz or other guests. A token already
        # verified with a trusted key is a look-up, not worth a thread hop.
        claims = services.tokens.recall(token)
        if claims is None:
            claims = await asyncio.to_thread(services.tokens.verify, token)
    except KeybrokerError as e:
        await record(decision="deny", subject=None, reason=e.detail)
        raise
    subject = guest_subject(claims, token)
    try:
        # The version to release is fixed before the policy judges it (a resource plugin read)
        plugin_request = await plugin.prepare_release(plugin_request)
    except KeybrokerError as e:
        await record(decision="failure", subject=subject, reason=e.detail)
        raise
    policy_data: dict[str, JsonValue] = {
        "plugin": call.name,
        "resource-path": list(call.rest),
        "query": dict(call.query),
    }
    released = plugin_request.resolved_version
    if released is not None:
        policy_data["version"] = released.number
    repository = plugin.repository_path(plugin_request)  # a tenant policy may decide
    permitted, policy_id = await _allowed(services, claims, policy_data, repository)
    if not permitted:
        reason = f"denied by the resource policy {policy_id}"
        await record(decision="deny", subject=subject, reason=reason)
        raise PolicyDeniedError(
            "Access denied by policy: the resource policy refused this token for this resource "
            "(an admin can see why with `kbs-client config evaluate-policy`)"
        )
    services.audit.ensure_writable()
    try:
        # Find the key to encrypt to before touching the secret: no key, no read.
        encrypt = await plugin.ask_needs_encryption(plugin_request)
        recipient = services.tokens.tee_pubkey(claims) if encrypt else None
        with services.metrics.plugin_call(plugin.name):
            result = await plugin.handle(
                replace(plugin_request, init_data_claims=pointer(claims, _INIT_DATA_CLAIMS))
            )
        body = _plain(result) if recipient is None else JSONResponse(seal(recipient, result.body))
    except KeybrokerError as e:
        await record(decision="failure", subject=subject, reason=e.detail)
        raise
    # no record, no release: a failure answers 503. The record names the version released.
    await record(
        decision="allow",
        subject=subject,
        reason="" if released is None else f"version {released.number}",
    )
    return body


async def _allowed(
    services: KbsServices,
    claims: JsonValue,
    policy_data: JsonValue,
    repository: ResourcePath | None,
) -> tuple[bool, str]:
    """The answer of the policy that governs ``repository`` (a tenant's, else the global
    one), counted (``kbs_policy_*``), and that policy's id."""
    metrics = services.metrics
    metrics.policy_evaluations.inc()
    try:
        governing = await services.resource_policy.governing(repository)
        allowed = await decision(governing.policy, claims, policy_data)
    except Exception:
        metrics.policy_errors.inc()
        raise
    (metrics.policy_approvals if allowed else metrics.policy_violations).inc()
    return allowed, governing.policy_id


async def _handle_plain(plugin: Plugin, request: PluginRequest, metrics: KbsMetrics) -> Response:
    with metrics.plugin_call(plugin.name):
        return _plain(await plugin.handle(request))


async def _admit(request: Request, services: KbsServices) -> AdminIdentity:
    """Admin access check on the request's path and query, exactly as sent."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    query = request.scope.get("query_string", b"")
    uri = raw.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
    return await services.admin.check(uri, request.headers.get("authorization"))


async def _guest_token(request: Request, services: KbsServices) -> str:
    """The session's token first, then ``Authorization: Bearer``; re-verified either way."""
    if services.sessions is not None:
        session = await services.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None and session.token is not None:
            return session.token
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    raise TokenNotFoundError(
        "Attestation Token not found: attest first (/auth, /attest) or send a bearer token"
    )


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


def _segments(request: Request) -> list[str]:
    """Split the *raw* path, then decode each segment.

    Splitting the decoded path would let ``repo%2Ftype/tag`` pass as three segments, so a
    percent-encoded slash could smuggle a separator past the path checks (traversal).
    """
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0]
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

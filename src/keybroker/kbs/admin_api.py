"""The KBS's administrative endpoints: resource policies (global and per tenant prefix),
attestation policies, reference values, policy explain, resource listing and versions,
the audit log read back. Access has been checked (and is audited) by the caller,
``ReleaseService.as_admin`` in ``kbs.release``: every id an endpoint acts on is in the request
path, so role ACLs (regexes over the path) can confine an admin to some of them.

Policies are read back as they are uploaded: ``{"policy": "<base64url of the Rego text>"}``
(attestation policies with their ``type`` and ``policy_id``), so what a GET answers can be
posted again unchanged.

Resource listing and metadata put the resource name (or prefix) in the path
(``/kbs/v0/resources/<repo>[/<type>]``, ``/kbs/v0/resource-meta/<repo>/<type>/<tag>[/<action>]``)
for the same reason. Values are never returned by either.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from starlette.responses import JSONResponse, Response

from keybroker.attestation.service import AttestationBackend, BuiltinAttestationService
from keybroker.errors import (
    BadRequestError,
    InvalidRequestPathError,
    KeybrokerError,
    MethodNotAllowedError,
    NotFoundError,
    PluginNotFoundError,
    ResourceNotFoundError,
)
from keybroker.kbs.audit_read import ATTESTATION_KEYS, parse_query
from keybroker.kbs.calls import ApiCall
from keybroker.kbs.explain import explain, parse_explain_request
from keybroker.kbs.resource_policy import POLICY_ID, TenantPrefix
from keybroker.kbs.services import KbsServices
from keybroker.plugins.base import PluginRequest
from keybroker.plugins.resource import ResourcePlugin
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import SEGMENT_PATTERN, ResourcePath, is_valid_segment
from keybroker.protocol.untrusted_json import parse_json
from keybroker.storage.base import MAX_PAGE
from keybroker.storage.secrets import SecretBackend
from keybroker.storage.versions import MAX_VERSION_NUMBER, ResourceRecord, parse_version

DEFAULT_PAGE = 100
MAX_CURSOR_CHARS = 1100  # base64url of the longest resource name (3 x 255 + 2 characters)
_RESOURCE_ACTIONS = ("delete", "purge", "rollback", "undelete")


async def _resource_policy(call: ApiCall, services: KbsServices) -> Response:
    """``/resource-policy``: GET lists the ids, POST sets the global policy (upstream's);
    ``/resource-policy/resource-policy``: GET reads the global policy;
    ``/resource-policy/<repository>[/<type>]``: GET, POST, DELETE a tenant policy."""
    policies = services.resource_policy
    if not call.rest:
        if call.method == "GET":
            return JSONResponse(await policies.list_ids())
        if call.method != "POST":
            raise MethodNotAllowedError(
                "/kbs/v0/resource-policy answers GET and POST", allow=("GET", "POST")
            )
        await policies.set(_policy_text(call.body))
        return Response(status_code=200)
    if call.rest == (POLICY_ID,):
        if call.method != "GET":
            raise MethodNotAllowedError(
                f"/kbs/v0/resource-policy/{POLICY_ID} (the global policy) answers GET; "
                "set it with POST /kbs/v0/resource-policy",
                allow=("GET",),
            )
        return JSONResponse({"policy": _b64url(await policies.source(POLICY_ID))})
    prefix = TenantPrefix.parse(call.rest)
    if call.method == "GET":
        return JSONResponse({"policy": _b64url(await policies.source(prefix.id))})
    if call.method == "POST":
        await policies.set(_policy_text(call.body), prefix)
        return Response(status_code=200)
    if call.method == "DELETE":
        await policies.delete(prefix)
        return Response(status_code=200)
    raise MethodNotAllowedError(
        "/kbs/v0/resource-policy/<prefix> answers GET, POST and DELETE",
        allow=("GET", "POST", "DELETE"),
    )


async def _attestation_policy(call: ApiCall, services: KbsServices) -> Response:
    """``/attestation-policy``: GET lists the ids, POST sets one (upstream's);
    ``/attestation-policy/<id>``: GET reads one, DELETE removes it (a default id gets its
    shipped text back)."""
    attestation = _attestation(services)
    if len(call.rest) == 1:
        named = call.rest[0]
        if call.method == "GET":
            text = await attestation.policy_text(named)
            return JSONResponse({"type": "rego", "policy_id": named, "policy": _b64url(text)})
        if call.method == "DELETE":
            restored = await attestation.delete_policy(named)
            return JSONResponse({"deleted": named, "restored_default": restored})
        raise MethodNotAllowedError(
            "/kbs/v0/attestation-policy/<id> answers GET and DELETE", allow=("GET", "DELETE")
        )
    if call.rest:
        raise BadRequestError("an attestation policy id is one path segment")
    if call.method == "GET":
        return JSONResponse(await attestation.list_policies())
    if call.method != "POST":
        raise MethodNotAllowedError(
            "/kbs/v0/attestation-policy answers GET and POST", allow=("GET", "POST")
        )
    document = _json_object(call.body, "attestation policy request")
    policy_type, policy_id = document.get("type", "rego"), document.get("policy_id")
    if policy_type != "rego":
        raise BadRequestError(f"attestation policy type must be rego, found {policy_type!r}")
    if not isinstance(policy_id, str):
        raise BadRequestError('the attestation policy request needs a string "policy_id"')
    await attestation.set_policy(policy_id, _policy_text(call.body))
    return Response(status_code=200)


async def _reference_value(call: ApiCall, services: KbsServices) -> Response:
    """``/reference-value``: GET lists the names, POST registers;
    ``/reference-value/<id>``: GET reads one value, DELETE removes it."""
    attestation = _attestation(services)
    reference_value_id = "/".join(call.rest)
    if not reference_value_id:
        if call.method == "GET":
            return JSONResponse(await attestation.list_reference_values())
        if call.method != "POST":
            raise MethodNotAllowedError(
                "/kbs/v0/reference-value answers GET and POST", allow=("GET", "POST")
            )
        names = await attestation.register_reference_value(call.body.decode("utf-8", "replace"))
        return JSONResponse({"registered": names})
    if call.method == "DELETE":
        if not await attestation.delete_reference_value(reference_value_id):
            raise ResourceNotFoundError(f"no reference value {reference_value_id[:64]!r}")
        return Response(status_code=200)
    if call.method != "GET":
        raise MethodNotAllowedError(
            "/kbs/v0/reference-value/<id> answers GET and DELETE", allow=("GET", "DELETE")
        )
    value = await attestation.query_reference_value(reference_value_id)
    if value is None:
        raise ResourceNotFoundError(f"no reference value {reference_value_id[:64]!r}")
    return JSONResponse(value)


async def _policy_explain(call: ApiCall, services: KbsServices) -> Response:
    if call.method != "POST":
        raise MethodNotAllowedError("/kbs/v0/policy-explain answers POST", allow=("POST",))
    attestation = services.attestation
    request = parse_explain_request(call.body)
    result = await explain(
        request,
        repository=_repository(services, request.data),
        resource_policy=services.resource_policy,
        attestation_policies=(
            attestation.policies if isinstance(attestation, BuiltinAttestationService) else None
        ),
        tokens=services.tokens,
    )
    return JSONResponse(result)


def _repository(services: KbsServices, data: dict[str, JsonValue]) -> ResourcePath | None:
    """The repository path explain's request ``data`` names, read as the release path reads a
    request: through its plugin (so the same tenant policy decides); None for anything else."""
    plugin, path = services.plugins.get(str(data.get("plugin"))), data.get("resource-path")
    if plugin is None or not isinstance(path, list) or not all(isinstance(s, str) for s in path):
        return None
    try:
        return plugin.repository_path(PluginRequest(method="GET", path=tuple(map(str, path))))
    except KeybrokerError:  # not a path the plugin serves: no tenant policy applies
        return None


async def _audit_log(call: ApiCall, services: KbsServices) -> Response:
    """``GET /audit-log`` (records, newest first) and ``GET /audit-log/attestations``."""
    if call.rest not in ((), ("attestations",)):
        raise NotFoundError(f"no endpoint /kbs/v0/audit-log/{'/'.join(call.rest)[:64]}")
    path = "/kbs/v0/audit-log" + "".join(f"/{part}" for part in call.rest)
    if call.method != "GET":
        raise MethodNotAllowedError(f"{path} answers GET", allow=("GET",))
    reader = services.audit_reader
    if reader is None:
        raise NotFoundError(
            'the audit log goes to standard output ([audit] sink = "stdout"): the KBS cannot '
            "read it back; read it where the log collector stores it"
        )
    if call.rest:
        query = parse_query(call.query, ATTESTATION_KEYS)
        return JSONResponse(await asyncio.to_thread(reader.attestations, query))
    # file I/O and hashing: off the event loop
    return JSONResponse(await asyncio.to_thread(reader.page, parse_query(call.query)))


def _attestation(services: KbsServices) -> AttestationBackend:
    if services.attestation is None:
        raise PluginNotFoundError("this KBS has no attestation service (resource-only mode)")
    return services.attestation


async def _resources(call: ApiCall, services: KbsServices) -> Response:
    """``GET /resources[/<repo>[/<type>]]?limit=&cursor=``: a page of names and versions."""
    if call.method != "GET":
        raise MethodNotAllowedError("/kbs/v0/resources answers GET", allow=("GET",))
    segments = list(call.rest)
    if segments and not segments[-1]:
        segments.pop()  # /resources/repo/ lists repo
    if "prefix" in call.query:
        if segments:
            raise BadRequestError("give the prefix in the path or in ?prefix=, not both")
        segments = [s for s in call.query["prefix"].split("/")] if call.query["prefix"] else []
        if segments and not segments[-1]:
            segments.pop()
    prefix = _prefix(segments)
    limit = _limit(call.query.get("limit"))
    after = _cursor(call.query.get("cursor"), prefix)
    page, next_name = await _backend(services).list_resources(prefix, after, limit)
    listed: list[JsonValue] = [_summary(name, record) for name, record in page]
    return JSONResponse(
        {
            "resources": listed,
            "next_cursor": None if next_name is None else _encode_cursor(next_name),
        }
    )


async def _resource_meta(call: ApiCall, services: KbsServices) -> Response:
    """``GET /resource-meta/<repo>/<type>/<tag>``: versions and times, never values.
    ``POST /resource-meta/<repo>/<type>/<tag>/<action>`` with ``{"version": N}``: rollback,
    delete (soft), undelete, purge."""
    backend = _backend(services)
    if len(call.rest) == 3:
        if call.method != "GET":
            raise MethodNotAllowedError(
                "/kbs/v0/resource-meta/<repo>/<type>/<tag> answers GET", allow=("GET",)
            )
        path = ResourcePath.from_segments(call.rest)
        return JSONResponse(_details(str(path), await backend.metadata(path)))
    if len(call.rest) != 4 or call.rest[3] not in _RESOURCE_ACTIONS:
        raise InvalidRequestPathError(
            "expected /kbs/v0/resource-meta/<repo>/<type>/<tag>[/"
            + "|".join(_RESOURCE_ACTIONS)
            + "]"
        )
    if call.method != "POST":
        raise MethodNotAllowedError(
            f"/kbs/v0/resource-meta/.../{call.rest[3]} answers POST", allow=("POST",)
        )
    path, action = ResourcePath.from_segments(call.rest[:3]), call.rest[3]
    version = _body_version(call.body, required=action in ("rollback", "undelete"))
    if action == "rollback":
        assert version is not None  # noqa: S101 - required above
        answer: int | None = await backend.rollback(path, version)
    elif action == "undelete":
        assert version is not None  # noqa: S101 - required above
        answer = await backend.undelete(path, version)
    elif action == "delete":
        await backend.delete(path, version)
        answer = version
    else:
        await backend.purge(path, version)
        answer = version
    return JSONResponse({"resource": str(path), "action": action, "version": answer})


def _backend(services: KbsServices) -> SecretBackend:
    plugin = services.plugins.get("resource")
    if not isinstance(plugin, ResourcePlugin):
        raise PluginNotFoundError("this KBS has no resource plugin")
    return plugin.backend


def _prefix(segments: list[str]) -> str:
    """``repo/`` or ``repo/type/`` (whole segments only), or "" for every resource."""
    if len(segments) > 2:
        raise BadRequestError(
            "a listing prefix is a repository or repository/type (at most 2 segments)"
        )
    for segment in segments:
        # the resource-path rule: no leading dot, no separator, so no traversal
        if not is_valid_segment(segment):
            raise BadRequestError(
                f"invalid prefix segment {segment[:64]!r}: each segment must match "
                f"{SEGMENT_PATTERN}"
            )
    return "".join(f"{segment}/" for segment in segments)


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or not 1 <= int(text) <= MAX_PAGE:
        raise BadRequestError(f"limit must be an integer from 1 to {MAX_PAGE}, found {text[:16]!r}")
    return int(text)


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()


def _cursor(text: str | None, prefix: str) -> str | None:
    """The name a page continues after. Cursors are not secret or signed: a tampered one can
    only move the start within the prefix the caller may list (the prefix filters every page),
    so it is checked for shape and refused when malformed, never trusted further."""
    if text is None:
        return None
    if len(text) > MAX_CURSOR_CHARS:
        raise BadRequestError("invalid cursor: too long")
    try:
        name = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        if _encode_cursor(name) != text.rstrip("="):
            raise ValueError("not canonical")
        ResourcePath.parse(name)
    except (binascii.Error, ValueError, InvalidRequestPathError):
        raise BadRequestError("invalid cursor: use the next_cursor of a listing") from None
    if not name.startswith(prefix) or name.startswith("/"):
        raise BadRequestError("invalid cursor: it belongs to another prefix")
    return name


def _body_version(body: bytes, *, required: bool) -> int | None:
    document = _json_object(body, "request") if body.strip() else {}
    version = document.get("version")
    if version is None:
        if required:
            raise BadRequestError('the request needs a "version" (a positive integer)')
        return None
    if isinstance(version, str):
        return parse_version(version)
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRequestError(f'"version" must be a positive integer, found {version!r:.32}')
    if not 1 <= version <= MAX_VERSION_NUMBER:
        raise BadRequestError(f'"version" must be from 1 to {MAX_VERSION_NUMBER}')
    return version


def _time(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")


def _summary(name: str, record: ResourceRecord) -> dict[str, JsonValue]:
    live = record.live(None)
    return {
        "name": name,
        "current_version": record.current,
        "version_count": len(record.versions),
        "created": _time(record.created),
        "updated": _time(record.updated),
        "deleted": live is None,
        "size": None if live is None else live.size,
        "versioned": not record.legacy,
    }


def _details(name: str, record: ResourceRecord) -> dict[str, JsonValue]:
    versions: list[JsonValue] = [
        {
            "version": v.number,
            "created": _time(v.created),
            "size": v.size,
            "deleted": _time(v.deleted),
        }
        for v in record.versions
    ]
    return {**_summary(name, record), "versions": versions}


ADMIN_ENDPOINTS: dict[str, Callable[[ApiCall, KbsServices], Awaitable[Response]]] = {
    "resource-policy": _resource_policy,
    "attestation-policy": _attestation_policy,
    "reference-value": _reference_value,
    "policy-explain": _policy_explain,
    "resources": _resources,
    "resource-meta": _resource_meta,
    "audit-log": _audit_log,
}


def _json_object(body: bytes, what: str) -> dict[str, object]:
    document = parse_json(body, what=f"the {what}")
    if not isinstance(document, dict):
        raise BadRequestError(f"the {what} must be a JSON object")
    return document


def _b64url(text: str) -> str:
    """A policy read back in the form it is uploaded in (base64url without padding)."""
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _policy_text(body: bytes) -> str:
    """``{"policy": "<base64url of the Rego text>"}`` (padded base64url accepted too)."""
    encoded = _json_object(body, "policy request").get("policy")
    if not isinstance(encoded, str):
        raise BadRequestError('the policy request needs a string member "policy"')
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequestError("the policy is not base64url-encoded UTF-8 text") from None

"""The KBS's administrative endpoints: resource policy, attestation policies, reference values,
policy explain. Access has been checked (and is audited) by the caller in ``app``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

from keybroker.attestation.service import AttestationBackend, BuiltinAttestationService
from keybroker.errors import (
    BadRequestError,
    MethodNotAllowedError,
    PluginNotFoundError,
    ResourceNotFoundError,
)
from keybroker.kbs.explain import explain, parse_explain_request
from keybroker.kbs.services import KbsServices
from keybroker.protocol.untrusted_json import parse_json


@dataclass(frozen=True)
class ApiCall:
    """One parsed request under /kbs/v0/."""

    method: str
    name: str
    rest: tuple[str, ...]
    query: dict[str, str]
    body: bytes


async def _resource_policy(call: ApiCall, services: KbsServices) -> Response:
    if call.method == "GET":
        return JSONResponse(await services.resource_policy.list_ids())
    if call.method != "POST":
        raise MethodNotAllowedError(
            "/kbs/v0/resource-policy answers GET and POST", allow=("GET", "POST")
        )
    await services.resource_policy.set(_policy_text(call.body))
    return Response(status_code=200)


async def _attestation_policy(call: ApiCall, services: KbsServices) -> Response:
    if call.method != "POST":
        raise MethodNotAllowedError("/kbs/v0/attestation-policy answers POST", allow=("POST",))
    document = _json_object(call.body, "attestation policy request")
    policy_type, policy_id = document.get("type", "rego"), document.get("policy_id")
    if policy_type != "rego":
        raise BadRequestError(f"attestation policy type must be rego, found {policy_type!r}")
    if not isinstance(policy_id, str):
        raise BadRequestError('the attestation policy request needs a string "policy_id"')
    await _attestation(services).set_policy(policy_id, _policy_text(call.body))
    return Response(status_code=200)


async def _reference_value(call: ApiCall, services: KbsServices) -> Response:
    """``POST /reference-value`` registers; ``GET /reference-value/<id>`` reads one value."""
    attestation = _attestation(services)
    reference_value_id = "/".join(call.rest)
    if not reference_value_id:
        if call.method != "POST":
            raise MethodNotAllowedError("/kbs/v0/reference-value answers POST", allow=("POST",))
        names = await attestation.register_reference_value(call.body.decode("utf-8", "replace"))
        return JSONResponse({"registered": names})
    if call.method != "GET":
        raise MethodNotAllowedError("/kbs/v0/reference-value/<id> answers GET", allow=("GET",))
    value = await attestation.query_reference_value(reference_value_id)
    if value is None:
        raise ResourceNotFoundError(f"no reference value {reference_value_id[:64]!r}")
    return JSONResponse(value)


async def _policy_explain(call: ApiCall, services: KbsServices) -> Response:
    if call.method != "POST":
        raise MethodNotAllowedError("/kbs/v0/policy-explain answers POST", allow=("POST",))
    attestation = services.attestation
    result = await explain(
        parse_explain_request(call.body),
        resource_policy=services.resource_policy,
        attestation_policies=(
            attestation.policies if isinstance(attestation, BuiltinAttestationService) else None
        ),
        tokens=services.tokens,
    )
    return JSONResponse(result)


def _attestation(services: KbsServices) -> AttestationBackend:
    if services.attestation is None:
        raise PluginNotFoundError("this KBS has no attestation service (resource-only mode)")
    return services.attestation


ADMIN_ENDPOINTS: dict[str, Callable[[ApiCall, KbsServices], Awaitable[Response]]] = {
    "resource-policy": _resource_policy,
    "attestation-policy": _attestation_policy,
    "reference-value": _reference_value,
    "policy-explain": _policy_explain,
}


def _json_object(body: bytes, what: str) -> dict[str, object]:
    document = parse_json(body, what=f"the {what}")
    if not isinstance(document, dict):
        raise BadRequestError(f"the {what} must be a JSON object")
    return document


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

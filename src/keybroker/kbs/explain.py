"""Policy explain: evaluate a resource or attestation policy on given input and show why.

Operators debugging a denial get the decision plus the value of every rule in the policy
package (a rule that is absent was undefined), or the evaluation error. The input is given
directly, or taken from a still-valid attestation token (verified like any other). A draft
policy can be evaluated before it is installed. For a resource request the stored policy
evaluated is the one a guest would meet: the tenant policy of the most specific prefix of the
request's repository path, else the global one; ``policy_id`` in the result names it.

The decision and the error come from the same code as a real decision (``decision`` of the
resource policy, ``appraisal`` of the attestation policy), so explain reports exactly what a
guest would get; the rule values are extra, from a slower whole-package query.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.attestation.ear import status_of
from keybroker.attestation.policy import (
    DEFAULT_POLICIES,
    AttestationPolicies,
    appraisal,
    compile_attestation_policy,
)
from keybroker.errors import (
    BadRequestError,
    KeybrokerError,
    ResourceNotFoundError,
    UnsupportedOperationError,
)
from keybroker.kbs.resource_policy import ResourcePolicy, compile_resource_policy, decision
from keybroker.kbs.tokens import TokenVerifier, pointer
from keybroker.policy.workers import PooledPolicy
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["resource", "attestation"]
    # attestation policies only; the same ids as POST /attestation-policy accepts
    policy_id: str = Field(default="default_cpu", pattern=r"^[A-Za-z0-9_-]{1,128}$")
    policy: str | None = None  # base64url Rego: explain a draft instead of the stored policy
    input: JsonValue = None
    token: str | None = None
    submod: str = "cpu0"  # attestation + token: which submodule's evidence is the input
    data: dict[str, JsonValue] = Field(default_factory=dict)  # resource policies only


def parse_explain_request(body: bytes) -> ExplainRequest:
    try:
        return ExplainRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequestError(f"malformed explain request: `{where}`: {first['msg']}") from None


async def explain(
    request: ExplainRequest,
    *,
    repository: ResourcePath | None = None,
    resource_policy: ResourcePolicy,
    attestation_policies: AttestationPolicies | None,
    tokens: TokenVerifier,
) -> dict[str, JsonValue]:
    if request.token is not None:
        await tokens.ensure_keys(request.token)  # a JWK-set fetch, if any, off the loop
    policy_input = await asyncio.to_thread(_input, request, tokens)  # token checks: CPU work
    policy_id = request.policy_id
    if request.kind == "resource":
        if request.policy:
            policy_id = "draft"
            policy = await compile_resource_policy(resource_policy.workers, _draft(request.policy))
        else:  # the policy a guest's request for this repository meets: a tenant's or global
            governing = await resource_policy.governing(repository)
            policy_id, policy = governing.policy_id, governing.policy
        data: JsonValue = request.data
    else:
        if attestation_policies is None:
            raise UnsupportedOperationError("this KBS has no builtin attestation service")
        policy = (
            await compile_attestation_policy(
                attestation_policies.workers, _draft(request.policy), request.policy_id
            )
            if request.policy
            else await _stored(attestation_policies, request.policy_id)
        )
        data = await attestation_policies.reference_data(policy)
    rules: dict[str, JsonValue] = {}
    try:
        rules = await policy.explain(policy_input, data)
        decided = await _decision(request, policy, policy_input, data)
    except KeybrokerError as e:  # the rules stay: they show why the appraisal failed
        return {
            "decision": None,
            "rules": rules,
            "error": e.detail,
            "input": policy_input,
            "policy_id": policy_id,
        }
    return {
        "decision": decided,
        "rules": rules,
        "error": None,
        "input": policy_input,
        "policy_id": policy_id,
    }


async def _decision(
    request: ExplainRequest, policy: PooledPolicy, policy_input: JsonValue, data: JsonValue
) -> JsonValue:
    if request.kind == "resource":
        return {"allow": await decision(policy, policy_input, data)}
    appraised = await appraisal(request.policy_id, policy, policy_input, data)
    vector: dict[str, JsonValue] = dict(appraised.trust_vector)
    return {"trust_claims": vector, "status": status_of(appraised.trust_vector)}


async def _stored(policies: AttestationPolicies, policy_id: str) -> PooledPolicy:
    # An unknown id is the caller's mistake (404), not a failed evaluation (500).
    if policy_id not in DEFAULT_POLICIES and policy_id not in await policies.list_ids():
        raise ResourceNotFoundError(f"no attestation policy {policy_id!r}")
    return await policies.compiled(policy_id)


def _input(request: ExplainRequest, tokens: TokenVerifier) -> JsonValue:
    if (request.token is None) == (request.input is None):
        raise BadRequestError('give exactly one of "input" and "token"')
    if request.token is None:
        return request.input
    claims = tokens.verify(request.token)
    if request.kind == "resource":
        return claims
    evidence = pointer(claims, f"/submods/{request.submod}/ear.veraison.annotated-evidence")
    if evidence is None:
        raise BadRequestError(f"the token has no submodule {request.submod[:16]!r}")
    return evidence


def _draft(encoded: str) -> str:
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequestError("the draft policy is not base64url-encoded UTF-8 text") from None

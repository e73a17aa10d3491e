"""Attestation policies: Rego that turns annotated evidence into an EAR trust vector.

The policy used for a submodule is ``<policy id>_<tee class>`` (``default_cpu``,
``default_gpu``, ``default_dcu``); it is read from the ``attestation_service_policy`` namespace
(key ``<id>.rego``, as upstream) so every replica applies the same policies. A default policy
(:data:`DEFAULT_POLICIES`) that is missing from the store, because it was never installed or
was deleted, is installed again from the shipped text on its next use: deleting one restores
the shipped default. Rules read:
``data.policy.trust_claims`` (``{claim: int}``) and, optionally, ``data.policy.extensions``
(``[{name, key, value}]``).

``query_reference_value(id)`` is a Rego function every policy can call. rego-cpp has no
host-function hook, so it is a helper module over ``data.reference_value``, and the values a
policy names (found by scanning its text for literal ids) are injected as data per evaluation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from keybroker.attestation.ear import TRUST_CLAIMS
from keybroker.errors import (
    BadRequestError,
    PolicyEvaluationError,
    PolicyParseError,
    ResourceNotFoundError,
)
from keybroker.policy.input_paths import TOKEN
from keybroker.policy.prepared import PolicySpec
from keybroker.policy.workers import PolicyWorkers, PooledPolicy
from keybroker.protocol.models import JsonValue
from keybroker.rvps.store import ReferenceValues
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.read_cache import AfterChange, no_stamp

NAMESPACE = "attestation_service_policy"
DEFAULT_POLICIES = (
    "default_cpu",
    "default_gpu",
    "default_dcu",
    "default_switch",
    "default_ppcie",
    "default_nvidia-dpu",
)
_SUFFIX = ".rego"
# Each stored policy can be compiled and cached by every worker: an admin cannot store more.
MAX_POLICIES = 1024
_ENTRYPOINTS = ("policy/trust_claims", "policy/extensions")
# Appraisals remembered per policy (deterministic policies only): guests of one image differ
# only in what a policy does not read (nonces, keys), so they share one answer.
DECISION_CACHE_SIZE = 4096
_POLICY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RV_CALL = re.compile(r"query_reference_value\s*\(")
_RV_LITERAL = re.compile(r"query_reference_value\s*\(\s*\"([^\"\\]+)\"\s*\)")
HELPERS = {
    "keybroker_reference_values.rego": (
        "package policy\n\n"
        "query_reference_value(id) := object.get(data.reference_value, id, null)\n"
    )
}


@dataclass(frozen=True)
class Appraised:
    trust_vector: dict[str, int]
    extensions: dict[str, JsonValue]


def builtin_attestation_policy(policy_id: str) -> str:
    return (resources.files("keybroker.attestation") / "policies" / f"{policy_id}.rego").read_text()


def attestation_policy_spec(source: str) -> PolicySpec:
    return PolicySpec(
        source, _ENTRYPOINTS, helpers=tuple(HELPERS.items()), remember=DECISION_CACHE_SIZE
    )


async def compile_attestation_policy(
    workers: PolicyWorkers, source: str, policy_id: str = "the policy"
) -> PooledPolicy:
    """Compile and check ``source``; raise ``PolicyParseError`` for what every appraisal
    would refuse.

    Threat: a trust vector the EAR cannot carry (a misspelt claim, a value outside
    -128..127) stored unchecked fails every attestation afterwards. The policy is appraised
    once on empty evidence and no reference values, and what it sets there must be a valid
    trust vector and valid extensions; and every claim named literally in a ``trust_claims``
    rule head (``trust_claims := {"name": ...}``, ``trust_claims["name"] := ...``) must exist,
    whatever the condition of the rule. A claim set only for some evidence is checked when it
    is set (``appraisal``): an appraisal error, never a silently dropped claim.
    """
    policy = await workers.compile(attestation_policy_spec(source))
    if policy.package != "policy":
        raise PolicyParseError(
            f"an attestation policy must declare `package policy`, found `package {policy.package}`"
        )
    for name in _claims_named_in_heads(source):
        if name not in TRUST_CLAIMS:
            raise PolicyParseError(f"policy refused: {_unknown_claim(policy_id, name)}")
    try:
        claims, extensions = await policy.evaluate_many(_ENTRYPOINTS, {}, {"reference_value": {}})
        if claims is not None:
            _trust_vector(policy_id, claims)
        _extensions(policy_id, extensions)
    except PolicyEvaluationError as e:
        raise PolicyParseError(f"policy refused: {e.detail}") from None
    return policy


async def appraisal(
    policy_id: str, policy: PooledPolicy, evidence: JsonValue, data: JsonValue
) -> Appraised:
    """What ``policy`` makes of ``evidence``: the one path of every appraisal and of explain."""
    claims, extensions = await policy.evaluate_many(_ENTRYPOINTS, evidence, data)
    return Appraised(_trust_vector(policy_id, claims), _extensions(policy_id, extensions))


class AttestationPolicies:
    def __init__(
        self,
        storage: KeyValueStorage,
        reference_values: ReferenceValues,
        workers: PolicyWorkers,
        *,
        after_change: AfterChange = no_stamp,
    ) -> None:
        """``after_change`` is awaited once a policy was stored or deleted: the KBS passes its
        read cache's generation stamp (``keybroker.storage.read_cache``), so every replica's
        next attestation reads the policy again."""
        self._storage = storage
        self._reference_values = reference_values
        self._workers = workers
        self._compiled: dict[str, PooledPolicy] = {}
        self._after_change = after_change

    async def initialize(self) -> None:
        """Install the default policies unless an operator already stored their own."""
        for policy_id in DEFAULT_POLICIES:
            source = builtin_attestation_policy(policy_id).encode()
            await self._storage.set(policy_id + _SUFFIX, source, overwrite=False)

    async def set(self, policy_id: str, source: str) -> None:
        _checked_id(policy_id)
        # refuse before storing
        compiled = await compile_attestation_policy(self._workers, source, policy_id)
        if await self._storage.get(policy_id + _SUFFIX) is None:
            count = len(await self.list_ids())
            if count >= MAX_POLICIES:
                raise BadRequestError(
                    f"there are already {count} attestation policies, the most the service "
                    f"keeps ({MAX_POLICIES}): delete one first"
                )
        await self._storage.set(policy_id + _SUFFIX, source.encode())
        self._compiled[policy_id] = compiled
        await self._after_change()

    async def text(self, policy_id: str) -> str:
        """The stored text of ``policy_id`` (a default one as its next use would install it);
        404 for an id no policy has."""
        _checked_id(policy_id)
        if (
            policy_id not in DEFAULT_POLICIES
            and await self._storage.get(policy_id + _SUFFIX) is None
        ):
            raise ResourceNotFoundError(f"no attestation policy {policy_id!r}")
        return await self.source(policy_id)

    async def delete(self, policy_id: str) -> bool:
        """Remove ``policy_id``; True when it is a default policy, whose shipped text is then
        installed again (at once, so every worker and replica sees the same policy)."""
        _checked_id(policy_id)
        removed = await self._storage.delete(policy_id + _SUFFIX)
        self._compiled.pop(policy_id, None)
        if policy_id in DEFAULT_POLICIES:
            default = builtin_attestation_policy(policy_id).encode()
            await self._storage.set(policy_id + _SUFFIX, default, overwrite=False)
            await self._after_change()
            return True
        if removed is None:
            raise ResourceNotFoundError(f"no attestation policy {policy_id!r}")
        await self._after_change()
        return False

    async def list_ids(self) -> list[str]:
        keys = await self._storage.list_keys()
        return sorted(k.removesuffix(_SUFFIX) for k in keys if k.endswith(_SUFFIX))

    async def source(self, policy_id: str) -> str:
        raw = await self._storage.get(policy_id + _SUFFIX)
        if raw is None and policy_id in DEFAULT_POLICIES:
            # The store was unreachable at start-up (or is new): install the default now.
            default = builtin_attestation_policy(policy_id).encode()
            await self._storage.set(policy_id + _SUFFIX, default, overwrite=False)
            raw = await self._storage.get(policy_id + _SUFFIX)
        if raw is None:
            raise PolicyEvaluationError(f"attestation policy {policy_id} does not exist")
        return raw.decode("utf-8", errors="replace")

    @property
    def workers(self) -> PolicyWorkers:
        return self._workers

    async def compiled(self, policy_id: str) -> PooledPolicy:
        source = await self.source(policy_id)
        cached = self._compiled.get(policy_id)
        if cached is None or cached.source != source:
            cached = await compile_attestation_policy(self._workers, source, policy_id)
            self._compiled[policy_id] = cached
        return cached

    async def reference_data(self, policy: PooledPolicy) -> dict[str, JsonValue]:
        """The reference values the policy can ask for, as its ``data``."""
        literal = _literal_reference_ids(policy.source)
        # None: an id computed at evaluation time, so provide every value
        ids = list(literal) if literal is not None else await self._reference_values.all_ids()
        return {"reference_value": await self._reference_values.query_many(ids)}

    async def appraise(self, policy_id: str, annotated_evidence: JsonValue) -> Appraised:
        policy = await self.compiled(policy_id)
        data = await self.reference_data(policy)
        return await appraisal(policy_id, policy, annotated_evidence, data)


def _checked_id(policy_id: str) -> str:
    """Ids name storage keys: the same alphabet as upstream's ids, nothing that could traverse."""
    if not _POLICY_ID.fullmatch(policy_id):
        raise BadRequestError(
            f"invalid attestation policy id {policy_id[:64]!r}: expected 1 to 128 ASCII "
            "letters, digits, - or _"
        )
    return policy_id


@lru_cache(maxsize=64)
def _literal_reference_ids(source: str) -> tuple[str, ...] | None:
    """The reference value ids ``source`` asks for, when every call names its id literally;
    None otherwise. Scanning the text takes longer than evaluating the policy, so the answer
    is kept per source text."""
    code = _without_comments(source)
    literal = _RV_LITERAL.findall(code)
    if len(literal) != len(_RV_CALL.findall(code)):
        return None
    return tuple(sorted(set(literal)))


def _without_comments(source: str) -> str:
    """Rego text with ``#`` comments blanked (a ``#`` inside a string is kept)."""
    kept: list[str] = []
    for raw in source.splitlines():
        line, in_string, escaped = raw, False, False
        for index, char in enumerate(raw):
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = not in_string
            elif char == "#" and not in_string:
                line = raw[:index]
                break
        kept.append(line)
    return "\n".join(kept)


def _trust_vector(policy_id: str, claims: JsonValue) -> dict[str, int]:
    if claims is None:
        raise PolicyEvaluationError(f"attestation policy {policy_id} sets no trust claims")
    if not isinstance(claims, dict):
        raise PolicyEvaluationError(f"{policy_id}: trust_claims must be an object")
    vector: dict[str, int] = {}
    for name, value in claims.items():
        if name not in TRUST_CLAIMS:
            raise PolicyEvaluationError(_unknown_claim(policy_id, name))
        if not isinstance(value, int) or isinstance(value, bool) or not -128 <= value <= 127:
            raise PolicyEvaluationError(f"{policy_id}: trust claim {name} must be -128..127")
        vector[name] = value
    if not vector:
        raise PolicyEvaluationError(f"attestation policy {policy_id} sets no trust claims")
    return vector


def _extensions(policy_id: str, extensions: JsonValue) -> dict[str, JsonValue]:
    if extensions is None:
        return {}
    if not isinstance(extensions, list):
        raise PolicyEvaluationError(f"{policy_id}: extensions must be a list")
    result: dict[str, JsonValue] = {}
    for item in extensions:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PolicyEvaluationError(f"{policy_id}: each extension needs a name and a value")
        if not isinstance(item.get("key"), int) or "value" not in item:
            raise PolicyEvaluationError(f"{policy_id}: extension {item['name']} needs key, value")
        result[item["name"]] = item["value"]
    return result


def _unknown_claim(policy_id: str, name: str) -> str:
    return (
        f"{policy_id}: unknown trust claim {name[:64]!r}; expected one of {', '.join(TRUST_CLAIMS)}"
    )


def _claims_named_in_heads(source: str) -> list[str]:
    """String keys of ``trust_claims`` rule heads: the object after ``trust_claims :=`` (or
    ``=``) and the key of ``trust_claims["name"]``. Text the scan does not follow gives
    fewer names, never a refusal."""
    tokens: list[tuple[str, str, bool]] = []  # kind, text, first on its line at depth 0
    new_line, depth = True, 0
    for match in TOKEN.finditer(source):
        kind, text = match.lastgroup or "punct", match.group()
        if kind in ("space", "comment"):
            new_line = new_line or "\n" in text or kind == "comment"
            continue
        tokens.append((kind, text, new_line and depth == 0))
        if kind == "punct":
            depth += (text in "([{") - (text in ")]}")
        new_line = False
    names: list[str] = []
    for index, (_, text, head) in enumerate(tokens):
        if not head or text != "trust_claims":
            continue
        after = [t[1] for t in tokens[index + 1 : index + 4]]
        if after[:1] == ["["] and after[2:3] == ["]"]:
            names += _string(tokens[index + 2])
        elif after[:3] == [":", "=", "{"] or after[:2] == ["=", "{"]:
            names += _object_keys(tokens, index + 2 + after.index("{"))
    return names


def _object_keys(tokens: list[tuple[str, str, bool]], start: int) -> list[str]:
    keys: list[str] = []
    depth = 1
    for index in range(start, len(tokens)):
        text = tokens[index][1]
        if text in "([{" and tokens[index][0] == "punct":
            depth += 1
        elif text in ")]}" and tokens[index][0] == "punct":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and index + 1 < len(tokens) and tokens[index + 1][1] == ":":
            keys += _string(tokens[index])
    return keys


def _string(token: tuple[str, str, bool]) -> list[str]:
    kind, text, _ = token
    if kind == "raw":
        return [text[1:-1]]
    if kind != "string":
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [value] if isinstance(value, str) else []

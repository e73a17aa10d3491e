"""Remembered resource-policy decisions: the same question gets the policy's answer, and a
changed policy is a new compiled policy that remembers nothing."""

from __future__ import annotations

import asyncio

from keybroker.kbs.resource_policy import (
    DECISION_CACHE_SIZE,
    ResourcePolicy,
    builtin_policy,
    resource_policy_spec,
)
from keybroker.policy.engine import CompiledPolicy
from keybroker.policy.workers import PolicyWorkers
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage

AFFIRMING: JsonValue = {"submods": {"cpu0": {"ear.status": "affirming"}}}
WARNING: JsonValue = {"submods": {"cpu0": {"ear.status": "warning"}}}
DATA: JsonValue = {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}


WORKERS = PolicyWorkers()  # one pool for the module: workers start on first use


def _policy(source: str) -> ResourcePolicy:
    policy = ResourcePolicy(MemoryKeyValueStorage(), WORKERS)
    asyncio.run(policy.set(source))
    return policy


def test_repeated_questions_get_the_policys_answers_and_are_remembered() -> None:
    policy = _policy(builtin_policy("affirming"))
    answers = [asyncio.run(policy.allows(c, DATA)) for c in (AFFIRMING, WARNING) * 3]
    assert answers == [True, False] * 3
    compiled = asyncio.run(policy.current())
    assert compiled.remembers and compiled.remembered() == 2


def test_changed_policy_forgets_every_decision() -> None:
    policy = _policy(builtin_policy("allow_all"))
    assert asyncio.run(policy.allows(WARNING, DATA)) is True
    asyncio.run(policy.set(builtin_policy("deny_all")))
    assert asyncio.run(policy.allows(WARNING, DATA)) is False


def test_resource_policies_remember_a_bounded_number() -> None:
    compiled = asyncio.run(_policy(builtin_policy("affirming")).current())
    for index in range(DECISION_CACHE_SIZE + 10):
        claims = {"submods": {f"cpu{index}": {"ear.status": "affirming"}}}
        asyncio.run(compiled.evaluate("policy/allow", claims, DATA))
    assert compiled.remembered() == DECISION_CACHE_SIZE


def test_guests_differing_only_in_what_the_policy_never_reads_share_one_answer() -> None:
    policy = _policy(builtin_policy("affirming"))
    for nonce in range(50):
        claims: JsonValue = {
            "iat": nonce,
            "submods": {"cpu0": {"ear.status": "affirming", "runtime": {"nonce": str(nonce)}}},
        }
        assert asyncio.run(policy.allows(claims, DATA)) is True
    assert asyncio.run(policy.current()).remembered() == 1


QUERY_POLICY = """
package policy
import rego.v1
default allow := false
allow if {
    data.plugin == "resource"
    data["resource-path"][0] == "a"
    data.query.tag == "7"
    input.submods.cpu0["ear.status"] == "affirming"
}
"""


def _query(index: int) -> JsonValue:
    return {"plugin": "resource", "resource-path": ["a", "b"], "query": {"tag": str(index)}}


def test_unique_query_strings_cause_no_recompilation() -> None:
    # what a policy worker runs for the resource policy: one bundle, whatever the query
    compiled = CompiledPolicy.from_spec(resource_policy_spec(QUERY_POLICY))
    answers = [compiled.evaluate("policy/allow", AFFIRMING, _query(i)) for i in range(40)]
    assert answers == [index == 7 for index in range(40)]
    info = compiled.cache_info()
    assert (info.misses, info.currsize) == (0, 1)
    # and the KBS's decisions through the workers agree
    policy = _policy(QUERY_POLICY)
    assert [asyncio.run(policy.allows(AFFIRMING, _query(i))) for i in (6, 7)] == [False, True]

"""Remembered resource-policy decisions: the same question gets the policy's answer, and a
changed policy is a new compiled policy that remembers nothing."""

from __future__ import annotations

import asyncio

from keybroker.kbs.resource_policy import DECISION_CACHE_SIZE, ResourcePolicy, builtin_policy
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage

AFFIRMING: JsonValue = {"submods": {"cpu0": {"ear.status": "affirming"}}}
WARNING: JsonValue = {"submods": {"cpu0": {"ear.status": "warning"}}}
DATA: JsonValue = {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}


def _policy(source: str) -> ResourcePolicy:
    policy = ResourcePolicy(MemoryKeyValueStorage())
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
    compiled = asyncio.run(_policy(builtin_policy("allow_all")).current())
    for index in range(DECISION_CACHE_SIZE + 10):
        compiled.evaluate("policy/allow", {"n": index}, DATA)
    assert compiled.remembered() == DECISION_CACHE_SIZE

"""Remembered resource-policy decisions: the same question gets the policy's answer, a changed
policy or a time-dependent one is always evaluated."""

from __future__ import annotations

import asyncio

from keybroker.kbs.resource_policy import DECISION_CACHE_SIZE, ResourcePolicy, builtin_policy
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage

AFFIRMING: JsonValue = {"submods": {"cpu0": {"ear.status": "affirming"}}}
WARNING: JsonValue = {"submods": {"cpu0": {"ear.status": "warning"}}}
DATA: JsonValue = {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}


def _policy(source: str) -> tuple[ResourcePolicy, list[int]]:
    policy = ResourcePolicy(MemoryKeyValueStorage())
    asyncio.run(policy.set(source))
    calls = [0]
    compiled = asyncio.run(policy.current())
    original = compiled.evaluate

    def counted(*args: object, **kwargs: object) -> JsonValue | None:
        calls[0] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    compiled.evaluate = counted  # type: ignore[method-assign]
    return policy, calls


def test_same_question_is_answered_from_memory_with_the_policys_answer() -> None:
    policy, calls = _policy(builtin_policy("affirming"))
    answers = [asyncio.run(policy.allows(c, DATA)) for c in (AFFIRMING, WARNING) * 3]
    assert answers == [True, False] * 3
    assert calls[0] == 2


def test_another_path_is_another_question() -> None:
    policy, calls = _policy(builtin_policy("affirming"))
    other: JsonValue = {"plugin": "resource", "resource-path": ["a", "b", "d"], "query": {}}
    assert asyncio.run(policy.allows(AFFIRMING, DATA)) is True
    assert asyncio.run(policy.allows(AFFIRMING, other)) is True
    assert calls[0] == 2


def test_changed_policy_forgets_every_decision() -> None:
    policy, _ = _policy(builtin_policy("allow_all"))
    assert asyncio.run(policy.allows(WARNING, DATA)) is True
    asyncio.run(policy.set(builtin_policy("deny_all")))
    assert asyncio.run(policy.allows(WARNING, DATA)) is False


def test_clock_reading_built_ins_disable_the_memory() -> None:
    for call in ("time.now_ns()", "io.jwt.decode_verify(t, {})", "net.lookup_ip_addr(h)"):
        source = f"package policy\n\nallow if {{ x := {call}; x }}\n"
        assert ResourcePolicy._remembers(source) is False
    assert ResourcePolicy._remembers(builtin_policy("affirming")) is True


def test_time_dependent_policy_is_always_evaluated() -> None:
    source = (
        "package policy\n\nimport rego.v1\n\ndefault allow := false\n\nallow if time.now_ns() > 0\n"
    )
    policy, calls = _policy(source)
    for _ in range(3):
        assert asyncio.run(policy.allows(AFFIRMING, DATA)) is True
    assert calls[0] == 3


def test_memory_is_bounded() -> None:
    policy, _ = _policy(builtin_policy("allow_all"))
    for index in range(DECISION_CACHE_SIZE + 10):
        asyncio.run(policy.allows({"n": index}, DATA))
    assert len(policy._decisions) == DECISION_CACHE_SIZE

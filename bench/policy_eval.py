"""Resource-policy evaluation cost: Rego text every time vs a compiled, cached bundle.

.venv/bin/python bench/policy_eval.py

Prints milliseconds per evaluation of the shipped default resource policy:
- text: a fresh interpreter, module, data and input for each query (no engine);
- cached: ``CompiledPolicy.evaluate`` with the same data each time (a cache hit);
- rotating: hits spread over 100 cached data documents (bundles switching on one interpreter);
- miss: ``CompiledPolicy.evaluate`` with new data each time (a bundle build per call).
"""

from __future__ import annotations

import time

import regopy

from keybroker.kbs.resource_policy import builtin_policy
from keybroker.policy.engine import CompiledPolicy, JsonValue

ROUNDS = 2000
CLAIMS: JsonValue = {
    "submods": {
        "cpu0": {
            "ear.status": "affirming",
            "ear.veraison.annotated-evidence": {"tdx": {"quote": {"header": {"version": 4}}}},
        }
    }
}
DATA: dict[str, JsonValue] = {
    "plugin": "resource",
    "resource-path": ["default", "key", "one"],
    "query": {},
}


def per_call(rounds: int, call: object) -> float:
    assert callable(call)
    start = time.perf_counter()
    for index in range(rounds):
        call(index)
    return (time.perf_counter() - start) / rounds * 1000


def from_text(source: str) -> float:
    def once(_: int) -> None:
        interpreter = regopy.Interpreter()
        interpreter.add_module("policy.rego", source)
        interpreter.add_data(DATA)
        interpreter.set_input(CLAIMS)
        interpreter.query("data.policy.allow")

    return per_call(ROUNDS // 10, once)


def cached(policy: CompiledPolicy) -> float:
    policy.evaluate("policy/allow", CLAIMS, DATA)  # the first use builds the bundle
    return per_call(ROUNDS, lambda _: policy.evaluate("policy/allow", CLAIMS, DATA))


def rotating(policy: CompiledPolicy) -> float:
    documents = [{**DATA, "resource-path": ["r", str(index)]} for index in range(100)]
    for document in documents:
        policy.evaluate("policy/allow", CLAIMS, document)
    return per_call(
        ROUNDS, lambda index: policy.evaluate("policy/allow", CLAIMS, documents[index % 100])
    )


def missed(policy: CompiledPolicy) -> float:
    def once(index: int) -> None:
        policy.evaluate("policy/allow", CLAIMS, {**DATA, "resource-path": ["k", str(index)]})

    return per_call(ROUNDS // 10, once)


def main() -> None:
    source = builtin_policy("default")
    start = time.perf_counter()
    policy = CompiledPolicy.compile(source, entrypoints=["policy/allow"])
    compile_ms = (time.perf_counter() - start) * 1000
    text_ms, cached_ms = from_text(source), cached(policy)
    rotating_ms, miss_ms = rotating(policy), missed(policy)
    print(f"default resource policy, ms per evaluation (compile once: {compile_ms:.2f} ms)")
    print(f"  text (no engine):        {text_ms:.3f}")
    print(f"  compiled, cache hit:     {cached_ms:.3f}  ({text_ms / cached_ms:.0f}x faster)")
    print(f"  compiled, 100 data docs: {rotating_ms:.3f}  (all cache hits)")
    print(f"  compiled, cache miss:    {miss_ms:.3f}  (new data each call: a bundle build)")
    print(f"  {policy.cache_info()}")


if __name__ == "__main__":
    main()

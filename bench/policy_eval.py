"""Resource-policy evaluation cost: parsing Rego text every time vs a compiled, cached bundle.

.venv/bin/python bench/policy_eval.py
"""

from __future__ import annotations

import time

import regopy

from keybroker.kbs.resource_policy import builtin_policy, compile_resource_policy

ROUNDS = 2000
CLAIMS = {"submods": {"cpu0": {"ear.veraison.annotated-evidence": {"tdx": {}}}}}
DATA = {"plugin": "resource", "resource-path": ["default", "key", "one"], "query": {}}


def from_text(source: str) -> float:
    start = time.perf_counter()
    for _ in range(ROUNDS // 10):
        interpreter = regopy.Interpreter()
        interpreter.add_module("policy.rego", source)
        interpreter.add_data(DATA)
        interpreter.set_input(CLAIMS)
        interpreter.query("data.policy.allow")
    return (time.perf_counter() - start) / (ROUNDS // 10)


def compiled(source: str) -> float:
    policy = compile_resource_policy(source)
    policy.evaluate("policy/allow", CLAIMS, DATA)  # first use builds the bundle
    start = time.perf_counter()
    for _ in range(ROUNDS):
        policy.evaluate("policy/allow", CLAIMS, DATA)
    return (time.perf_counter() - start) / ROUNDS


def main() -> None:
    source = builtin_policy("default")
    text_ms, bundle_ms = from_text(source) * 1000, compiled(source) * 1000
    print(f"default resource policy: text {text_ms:.3f} ms, compiled {bundle_ms:.3f} ms")


if __name__ == "__main__":
    main()

"""The Rego engine wrapper: compile once, evaluate with per-request data, fail clearly."""

from __future__ import annotations

import pytest

from keybroker.errors import PolicyParseError
from keybroker.policy.engine import CompiledPolicy

POLICY = """
package policy

import rego.v1

default allow := false

allow if {
    data.plugin == "resource"
    not input.submods.cpu0["ear.veraison.annotated-evidence"].sample
}

vector := {"executables": 3, "hardware": count(data["resource-path"])}
"""
TDX: dict[str, object] = {"submods": {"cpu0": {"ear.veraison.annotated-evidence": {"tdx": {}}}}}
SAMPLE: dict[str, object] = {
    "submods": {"cpu0": {"ear.veraison.annotated-evidence": {"sample": {"svn": "1"}}}}
}


def _policy(cache_size: int = 256) -> CompiledPolicy:
    return CompiledPolicy.compile(
        POLICY, entrypoints=["policy/allow", "policy/vector"], cache_size=cache_size
    )


def test_decision_follows_input_and_data() -> None:
    policy = _policy()
    resource = {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}
    assert policy.evaluate("policy/allow", TDX, resource) is True
    assert policy.evaluate("policy/allow", SAMPLE, resource) is False
    assert policy.evaluate("policy/allow", TDX, {**resource, "plugin": "other"}) is False


def test_data_is_never_stale_between_requests() -> None:
    """Regression: rego-cpp bakes data into a bundle; a reused bundle must not see old data."""
    policy = _policy()
    for plugin, expected in [("resource", True), ("sample", False), ("resource", True)]:
        assert policy.evaluate("policy/allow", TDX, {"plugin": plugin}) is expected


def test_repeated_data_uses_the_compiled_bundle() -> None:
    policy = _policy()
    builds = policy.builds
    for _ in range(5):
        policy.evaluate("policy/allow", TDX, {"plugin": "resource"})
    assert policy.builds == builds + 1
    assert policy.cached_bundles() == 1


def test_cache_is_bounded() -> None:
    policy = _policy(cache_size=3)
    for index in range(10):
        policy.evaluate("policy/allow", TDX, {"plugin": f"p{index}"})
    assert policy.cached_bundles() == 3


def test_rules_return_structured_values() -> None:
    value = _policy().evaluate("policy/vector", {}, {"resource-path": ["a", "b", "c"]})
    assert value == {"executables": 3, "hardware": 3}


def test_undefined_rule_is_none() -> None:
    policy = CompiledPolicy.compile("package policy\nx := 1\n", entrypoints=["policy/allow"])
    assert policy.evaluate("policy/allow", {}) is None
    assert policy.package == "policy"


def test_parse_error_carries_rego_message() -> None:
    with pytest.raises(PolicyParseError) as error:
        CompiledPolicy.compile("package policy\nallow if {", entrypoints=["policy/allow"])
    assert "unclosed" in error.value.detail


def test_missing_package_rejected() -> None:
    with pytest.raises(PolicyParseError, match="no package"):
        CompiledPolicy.compile("allow := true", entrypoints=["policy/allow"])


def test_unknown_entrypoint_rejected() -> None:
    with pytest.raises(ValueError, match="not compiled"):
        _policy().evaluate("policy/other", {})


def test_undefined_function_refused_at_compile_time() -> None:
    """Building a bundle only parses; the compile-time probe catches what evaluation would."""
    with pytest.raises(PolicyParseError, match="Function not found: foo"):
        CompiledPolicy.compile(
            "package policy\nallow if { foo(1) }\n", entrypoints=["policy/allow"]
        )


def test_division_by_zero_is_undefined_so_denies() -> None:
    policy = CompiledPolicy.compile(
        "package policy\nallow := 1 / input.zero\n", entrypoints=["policy/allow"]
    )
    assert policy.evaluate("policy/allow", {"zero": 0}) is None
    assert policy.evaluate("policy/allow", {"zero": 1}) == 1

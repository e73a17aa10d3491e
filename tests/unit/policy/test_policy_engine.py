"""The Rego engine wrapper: compile once, evaluate with per-request data, fail clearly."""

from __future__ import annotations

import threading

import pytest

from keybroker.errors import PolicyEvaluationError, PolicyParseError
from keybroker.policy.engine import CompiledPolicy, JsonValue

# Upstream KBS's default resource policy, in rego.v1 syntax, plus two rules returning values.
RESOURCE_POLICY = """
# A comment before the package.
package policy

import rego.v1

default allow := false

allow if {
    data.plugin == "resource"
    not input.submods.cpu0["ear.veraison.annotated-evidence"].sample
}

vector := {"executables": 3, "hardware": count(data["resource-path"])}

depth := count(data["resource-path"]) if data.query.deep == "yes"
"""
ENTRYPOINTS = ["policy/allow", "policy/vector", "policy/depth"]
TDX: JsonValue = {"submods": {"cpu0": {"ear.veraison.annotated-evidence": {"tdx": {}}}}}
SAMPLE: JsonValue = {
    "submods": {"cpu0": {"ear.veraison.annotated-evidence": {"sample": {"svn": "1"}}}}
}


def resource_data(plugin: str = "resource", path: str = "default/key/one") -> dict[str, JsonValue]:
    return {"plugin": plugin, "resource-path": path.split("/"), "query": {}}


def compile_resource_policy(cache_size: int = 1024, remember: int = 0) -> CompiledPolicy:
    return CompiledPolicy.compile(
        RESOURCE_POLICY, entrypoints=ENTRYPOINTS, cache_size=cache_size, remember=remember
    )


# --- decisions -------------------------------------------------------------------------------


def test_allows_resource_plugin_for_hardware_evidence() -> None:
    assert compile_resource_policy().evaluate("policy/allow", TDX, resource_data()) is True


def test_denies_sample_evidence() -> None:
    assert compile_resource_policy().evaluate("policy/allow", SAMPLE, resource_data()) is False


def test_denies_other_plugins() -> None:
    policy = compile_resource_policy()
    assert policy.evaluate("policy/allow", TDX, resource_data(plugin="nebula-ca")) is False


def test_without_data_the_default_applies() -> None:
    assert compile_resource_policy().evaluate("policy/allow", TDX) is False


def test_rules_return_objects_and_numbers() -> None:
    policy = compile_resource_policy()
    data = resource_data(path="a/b/c")
    assert policy.evaluate("policy/vector", TDX, data) == {"executables": 3, "hardware": 3}
    data = {**data, "query": {"deep": "yes"}}
    assert policy.evaluate("policy/depth", TDX, data) == 3


def test_rules_return_arrays_sets_and_null() -> None:
    policy = CompiledPolicy.compile(
        'package p.q\n\nlist := [1, {"a": false}]\nset := {2, 1}\nnothing := null\n',
        entrypoints=["p/q/list", "p/q/set", "p/q/nothing"],
    )
    assert policy.package == "p.q"
    assert policy.evaluate("p/q/list", {}) == [1, {"a": False}]
    members = policy.evaluate("p/q/set", {})
    assert isinstance(members, list)
    assert sorted(members) == [1, 2]
    assert policy.evaluate("p/q/nothing", {}) is None


def test_undefined_rule_is_none() -> None:
    policy = compile_resource_policy()
    assert policy.evaluate("policy/depth", TDX, resource_data()) is None


def test_rule_missing_from_the_package_is_none() -> None:
    policy = CompiledPolicy.compile("package policy\n\nx := 1\n", entrypoints=["policy/allow"])
    assert policy.evaluate("policy/allow", {}) is None


def test_v0_syntax_still_evaluates() -> None:
    policy = CompiledPolicy.compile(
        "package policy\n\ndefault allow = false\n\nallow { input.ok == true }\n",
        entrypoints=["policy/allow"],
    )
    assert policy.evaluate("policy/allow", {"ok": True}) is True
    assert policy.evaluate("policy/allow", {"ok": "yes"}) is False


def test_strings_and_big_numbers_compare_as_written() -> None:
    """regopy's own input/data conversion breaks these; documents go in as UTF-8 JSON."""
    policy = CompiledPolicy.compile(
        "package policy\n\nimport rego.v1\n\n"
        'quote if input.s == "a\\"b\\\\c"\n'
        'newline if input.n == "x\\ny"\n'
        'accent if data.e == "é"\n'
        "big if input.big == 1180591620717411303424\n"
        "echo := input\n",
        entrypoints=[
            "policy/quote",
            "policy/newline",
            "policy/accent",
            "policy/big",
            "policy/echo",
        ],
    )
    unverified: dict[str, JsonValue] = {"s": 'a"b\\c', "n": "x\ny", "big": 2**70}
    for rule in ["quote", "newline", "big"]:
        assert policy.evaluate(f"policy/{rule}", unverified) is True, rule
    assert policy.evaluate("policy/accent", {}, {"e": "é"}) is True
    assert policy.evaluate("policy/echo", unverified) == unverified


# --- the per-data bundle cache ------------------------------------------------------------------


def test_repeated_data_evaluates_from_the_cached_bundle() -> None:
    policy = compile_resource_policy()
    before = policy.cache_info()
    for _ in range(5):
        assert policy.evaluate("policy/allow", TDX, resource_data()) is True
    after = policy.cache_info()
    assert after.misses == before.misses + 1
    assert after.hits == before.hits + 4
    assert after.currsize == before.currsize + 1


def test_key_order_of_data_does_not_matter() -> None:
    policy = compile_resource_policy()
    policy.evaluate("policy/allow", TDX, {"plugin": "resource", "query": {}})
    policy.evaluate("policy/allow", TDX, {"query": {}, "plugin": "resource"})
    assert policy.cache_info().misses == 1


def test_stale_data_is_never_reused() -> None:
    """Regression: rego-cpp bakes data into a bundle; each data document needs its own."""
    policy = compile_resource_policy()
    for plugin, expected in [("resource", True), ("sample", False), ("resource", True)]:
        assert policy.evaluate("policy/allow", TDX, resource_data(plugin=plugin)) is expected
    for path, length in [("a/b/c", 3), ("a/b", 2), ("a/b/c", 3)]:
        vector = policy.evaluate("policy/vector", TDX, resource_data(path=path))
        assert vector == {"executables": 3, "hardware": length}


def test_input_is_never_stale() -> None:
    policy = compile_resource_policy()
    data = resource_data()
    for claims, expected in [(TDX, True), (SAMPLE, False), (TDX, True)]:
        assert policy.evaluate("policy/allow", claims, data) is expected
    assert policy.cache_info().misses == 1


def test_several_entrypoints_on_one_input_equal_separate_evaluations() -> None:
    policy = compile_resource_policy()
    data = resource_data(path="a/b/c")
    for claims in (TDX, SAMPLE, TDX):
        together = policy.evaluate_many(
            ["policy/allow", "policy/vector", "policy/depth"], claims, data
        )
        alone = [
            policy.evaluate(e, claims, data)
            for e in ("policy/allow", "policy/vector", "policy/depth")
        ]
        assert together == alone
    with pytest.raises(ValueError, match="not compiled"):
        policy.evaluate_many(["policy/allow", "policy/nope"], TDX, data)


def _counting(policy: CompiledPolicy) -> list[int]:
    """Count the inputs handed to rego-cpp: one per evaluation that was not remembered."""
    calls = [0]
    original = policy._set_input

    def counted(input_json: str) -> None:
        calls[0] += 1
        original(input_json)

    policy._set_input = counted  # type: ignore[method-assign]
    return calls


def test_remembered_answers_equal_evaluated_ones() -> None:
    policy = compile_resource_policy(remember=8)
    calls = _counting(policy)
    data = resource_data(path="a/b/c")
    for claims, expected in [(TDX, True), (SAMPLE, False)] * 3:
        assert policy.evaluate("policy/allow", claims, data) is expected
    assert calls[0] == 2
    assert policy.evaluate("policy/allow", TDX, resource_data(path="a/b/d")) is True
    assert policy.evaluate_many(["policy/allow", "policy/vector"], TDX, data)[0] is True
    assert calls[0] == 4  # another path, another set of entrypoints: new questions


def test_nothing_is_remembered_unless_asked() -> None:
    policy = compile_resource_policy()
    calls = _counting(policy)
    for _ in range(3):
        policy.evaluate("policy/allow", TDX, resource_data())
    assert (calls[0], policy.remembers, policy.remembered()) == (3, False, 0)


@pytest.mark.parametrize(
    "call", ["time.now_ns()", "io.jwt.decode_verify(input.t, {})", "net.lookup_ip_addr(input.h)"]
)
def test_policies_reading_the_clock_or_the_network_are_always_evaluated(call: str) -> None:
    policy = CompiledPolicy.compile(
        f"package policy\n\nimport rego.v1\n\nallow if {{\n\tx := {call}\n\tx\n}}\n",
        entrypoints=["policy/allow"],
        remember=8,
    )
    calls = _counting(policy)
    for _ in range(3):
        policy.evaluate("policy/allow", {}, {})
    assert (calls[0], policy.remembers) == (3, False)


def test_remembered_answers_are_bounded() -> None:
    policy = compile_resource_policy(remember=3)
    for index in range(10):
        policy.evaluate("policy/allow", TDX, resource_data(path=f"p/{index}"))
    assert policy.remembered() == 3


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    policy = compile_resource_policy(cache_size=3)
    for index in range(10):
        policy.evaluate("policy/allow", TDX, resource_data(path=f"p/{index}"))
    info = policy.cache_info()
    assert (info.currsize, info.maxsize, info.misses) == (3, 3, 10)
    policy.evaluate("policy/allow", TDX, resource_data(path="p/9"))  # still cached
    assert policy.cache_info().hits == 1
    policy.evaluate("policy/allow", TDX, resource_data(path="p/0"))  # evicted, rebuilt
    assert policy.cache_info().misses == 11
    assert policy.evaluate("policy/allow", TDX, resource_data(path="p/0")) is True


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        compile_resource_policy(cache_size=0)


def test_concurrent_evaluations_agree() -> None:
    policy = compile_resource_policy(cache_size=4)
    failures: list[str] = []

    def worker(index: int) -> None:
        for round_ in range(50):
            plugin = "resource" if (index + round_) % 2 else "other"
            claims = SAMPLE if round_ % 3 == 0 else TDX
            expected = plugin == "resource" and claims is TDX
            got = policy.evaluate("policy/allow", claims, resource_data(plugin, f"k/{round_ % 7}"))
            if got is not expected:
                failures.append(f"{index}/{round_}: {got!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- compile-time errors ----------------------------------------------------------------------


def test_parse_error_carries_rego_cpp_message_and_position() -> None:
    with pytest.raises(PolicyParseError) as error:
        CompiledPolicy.compile("package policy\nallow if {", entrypoints=["policy/allow"])
    assert "this is unclosed" in error.value.detail
    assert "policy.rego:2:10" in error.value.detail
    assert error.value.status == 400


def test_undefined_function_refused_at_compile_time() -> None:
    with pytest.raises(PolicyParseError, match="Function not found: nope"):
        CompiledPolicy.compile("package policy\n\nallow if nope(1)\n", entrypoints=["policy/allow"])


def test_undefined_function_in_a_non_entrypoint_rule_refused() -> None:
    with pytest.raises(PolicyParseError, match="Function not found: nope"):
        CompiledPolicy.compile(
            "package policy\n\nallow := true\n\nother if nope(1)\n", entrypoints=["policy/allow"]
        )


def test_recursive_rule_refused_at_compile_time() -> None:
    with pytest.raises(PolicyParseError, match="Recursion"):
        CompiledPolicy.compile("package policy\n\nallow if allow\n", entrypoints=["policy/allow"])


def test_undefined_function_behind_a_guard_fails_evaluation() -> None:
    """The compile-time probe runs on empty input; what it cannot reach fails closed later."""
    policy = CompiledPolicy.compile(
        "package policy\n\nallow if { input.x == 1; nope(1) }\n", entrypoints=["policy/allow"]
    )
    assert policy.evaluate("policy/allow", {}) is None
    with pytest.raises(PolicyEvaluationError, match="Function not found: nope") as error:
        policy.evaluate("policy/allow", {"x": 1})
    assert error.value.status == 500
    assert error.value.variant == "PolicyEngineError"


def test_conflicting_values_fail_evaluation() -> None:
    policy = CompiledPolicy.compile(
        "package policy\n\nallow := 1 if input.a\n\nallow := 2 if input.b\n",
        entrypoints=["policy/allow"],
    )
    assert policy.evaluate("policy/allow", {"a": True}) == 1
    with pytest.raises(PolicyEvaluationError, match="without detail"):
        policy.evaluate("policy/allow", {"a": True, "b": True})
    assert policy.evaluate("policy/allow", {"b": True}) == 2  # the interpreter recovers


def test_missing_package_refused() -> None:
    """rego-cpp accepts a module without a package; every rule would then be undefined."""
    with pytest.raises(PolicyParseError, match="package"):
        CompiledPolicy.compile("allow := true\n", entrypoints=["policy/allow"])


def test_wrong_package_refused() -> None:
    with pytest.raises(PolicyParseError, match="package kbs"):
        CompiledPolicy.compile("package kbs\n\nallow := true\n", entrypoints=["policy/allow"])


def test_empty_policy_refused() -> None:
    with pytest.raises(PolicyParseError):
        CompiledPolicy.compile("", entrypoints=["policy/allow"])


def test_unknown_entrypoint_rejected() -> None:
    with pytest.raises(ValueError, match="not compiled"):
        compile_resource_policy().evaluate("policy/other", TDX)


def test_helpers_are_compiled_alongside() -> None:
    source = "package policy\n\nimport rego.v1\n\nallow if twice(input.n) == 4\n"
    policy = CompiledPolicy.compile(
        source,
        entrypoints=["policy/allow"],
        helpers={"helpers.rego": "package policy\n\ntwice(x) := x * 2\n"},
    )
    assert policy.evaluate("policy/allow", {"n": 2}) is True
    assert policy.package == "policy"
    assert policy.source == source


# --- hostile or malformed documents ------------------------------------------------------------


def test_data_cannot_override_policy_rules() -> None:
    """rego-cpp lets data.policy.allow shadow the rule; such data is refused outright."""
    policy = compile_resource_policy()
    with pytest.raises(PolicyEvaluationError, match=r"data\.policy"):
        policy.evaluate("policy/allow", SAMPLE, {"policy": {"allow": True}})


def test_data_must_be_an_object() -> None:
    with pytest.raises(PolicyEvaluationError, match="JSON object"):
        compile_resource_policy().evaluate("policy/allow", TDX, ["resource"])


def test_input_that_is_not_json_is_refused() -> None:
    policy = compile_resource_policy()
    with pytest.raises(PolicyEvaluationError, match="input is not a JSON document"):
        policy.evaluate("policy/allow", {"x": float("nan")}, resource_data())
    with pytest.raises(PolicyEvaluationError, match="input is not a JSON document"):
        policy.evaluate("policy/allow", {"x": "\ud800"}, resource_data())


# --- explain ---------------------------------------------------------------------------------


def test_explain_lists_defined_rules() -> None:
    rules = compile_resource_policy().explain(TDX, resource_data(path="a/b"))
    assert rules == {"allow": True, "vector": {"executables": 3, "hardware": 2}}


REQUEST_KEYS = ("plugin", "resource-path", "query")
REQUEST_FORMS = """
package policy
import rego.v1
whole := input
path := data[`resource-path`]
tag := data.query["tag"]
nested := data.policy.tag
allow if {
    data["plugin"] == "resource"
    input.user == "alice"
    x := input
    x.user == "alice"
}
"""


def test_request_data_read_by_name_is_handed_over_in_input_with_one_bundle() -> None:
    policy = CompiledPolicy.compile(
        REQUEST_FORMS,
        entrypoints=["policy/allow", "policy/whole", "policy/path", "policy/nested"],
        request_data=REQUEST_KEYS,
    )
    assert policy.request_data_in_input and policy.source == REQUEST_FORMS
    for tag in ("a", "b", "c"):
        data: JsonValue = {"plugin": "resource", "resource-path": ["x", tag], "query": {"tag": tag}}
        assert policy.evaluate_many(
            ["policy/allow", "policy/whole", "policy/path", "policy/nested"],
            {"user": "alice"},
            data,
        ) == [True, {"user": "alice"}, ["x", tag], tag]
    assert policy.cache_info().misses == 0
    with pytest.raises(PolicyEvaluationError, match="not one of this policy's per-call keys"):
        policy.evaluate("policy/allow", {}, {"other": 1})


@pytest.mark.parametrize(
    "rule",
    [
        "allow if { data.plugin == input.p with input as {} }",
        "allow if data.other == 1",
        'allow if data [ "plugin" ] == 1',
        "import data.plugin\nallow if plugin == 1",
        'allow if $"{data.plugin}" == "x"',
    ],
)
def test_request_data_the_rewrite_cannot_follow_keeps_one_bundle_per_document(rule: str) -> None:
    policy = CompiledPolicy.compile(
        f"package policy\nimport rego.v1\n{rule}\n",
        entrypoints=["policy/allow"],
        request_data=REQUEST_KEYS,
    )
    assert not policy.request_data_in_input
    policy.evaluate("policy/allow", {}, {"plugin": "a"})
    assert policy.cache_info().misses == 1

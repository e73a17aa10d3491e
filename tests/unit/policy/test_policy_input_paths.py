"""What of ``input`` a policy reads: the scanner, the projection, and a differential check that
a projected input gets rego-cpp's answer for the whole input, on every policy we ship and on
policies written to trip the scanner."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from keybroker.attestation.policy import HELPERS
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.policy.engine import CompiledPolicy
from keybroker.policy.input_paths import InputPaths
from keybroker.protocol.models import JsonValue

POLICIES = Path(__file__).resolve().parents[3] / "src" / "keybroker" / "attestation" / "policies"


def _paths(source: str) -> list[str] | None:
    found = InputPaths.of([f"package policy\nimport rego.v1\n{source}\n"])
    return None if found is None else found.describe()


# --- what the scanner finds ---------------------------------------------------------------------


def test_the_builtin_resource_policies_read_a_few_fields() -> None:
    affirming = InputPaths.of([builtin_policy("affirming")])
    default = InputPaths.of([builtin_policy("default")])
    assert affirming is not None and affirming.describe() == ['input["submods"][_]["ear.status"]']
    assert default is not None and default.describe() == [
        'input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["sample"]'
    ]


def test_the_default_attestation_policy_reads_named_claims_only() -> None:
    found = InputPaths.of([*HELPERS.values(), (POLICIES / "default_cpu.rego").read_text()])
    assert found is not None
    paths = found.describe()
    assert 'input["tdx"]["quote"]["body"]["mr_td"]' in paths
    assert 'input["sample"]' in paths
    assert not any("report_data" in p or "runtime_data_claims" in p for p in paths)


def test_literal_steps_and_iteration_are_followed() -> None:
    assert _paths('allow if input.a["b c"].d[_].e == 1') == ['input["a"]["b c"]["d"][_]["e"]']
    assert _paths("allow if input.a[k].b[0] == k") == ['input["a"][_]["b"][_]']


def test_a_value_used_whole_is_kept_whole() -> None:
    assert _paths("allow if { x := input.a.b; x.c == 1 }") == ['input["a"]["b"]']
    assert _paths('allow if object.get(input.a, "k", 0) == 1') == ['input["a"]']
    assert _paths('allow if "v" in input.a') == ['input["a"]']


def test_iteration_variables_are_followed_wherever_they_appear() -> None:
    source = 'allow if { some c in input.a; some d in c.items; d.x == 1; c.name == "n" }'
    assert _paths(source) == [
        'input["a"][_]["items"][_]["x"]',
        'input["a"][_]["name"]',
    ]
    assert _paths("allow if { every k, v in input.m { v.ok } }") == ['input["m"][_]["ok"]']


def test_count_needs_the_members_not_their_values() -> None:
    assert _paths("allow if count(input.a) == 2") == ['input["a"][_] (present)']


def test_a_module_defining_its_own_count_makes_count_read_everything() -> None:
    """rego-cpp lets a module shadow ``count``; its body may read any field of its argument."""
    source = "count(x) := x.secret\nallow if count(input.a) == 2"
    assert _paths(source) == ['input["a"]']


def test_mentions_in_strings_and_comments_are_not_references() -> None:
    source = '# input.everything\nallow if { input.a == "input.b"; `input.c` != "" }'
    assert _paths(source) == ['input["a"]']


def test_a_field_named_input_is_not_the_root() -> None:
    assert _paths("allow if { data.input.x == 1; input.a == 1 }") == ['input["a"]']


@pytest.mark.parametrize(
    "source",
    [
        "allow if { x := input; x.a == 1 }",
        "allow if walk(input, [p, v])",
        "allow if { input.a == 1 } with input as {}",
        "allow if { input.a == 1 with input.b as 2 }",
        'allow if input[concat("", ["a"])] == 1',
        'allow if $"{input.a}" == "1"',
        "allow if input . a == 1",
    ],
)
def test_reads_the_scanner_cannot_bound_hand_over_all_of_input(source: str) -> None:
    assert _paths(source) is None


def test_import_of_input_hands_over_all_of_input() -> None:
    assert InputPaths.of(["package policy\nimport input.a as a\nallow if a.b == 1\n"]) is None


def test_an_unterminated_string_hands_over_all_of_input() -> None:
    assert InputPaths.of(['package policy\nallow if input.a == "x\n']) is None


# --- the projection -----------------------------------------------------------------------------


def test_projection_keeps_what_is_read_and_drops_the_rest() -> None:
    found = InputPaths.of([builtin_policy("affirming")])
    assert found is not None
    claims: JsonValue = {
        "iat": 1,
        "submods": {
            "cpu0": {"ear.status": "affirming", "evidence": {"nonce": "n"}},
            "gpu0": {"ear.status": "warning"},
        },
    }
    assert found.project(claims) == {
        "submods": {"cpu0": {"ear.status": "affirming"}, "gpu0": {"ear.status": "warning"}}
    }


def test_projection_keeps_lengths_keys_and_scalars_it_cannot_look_into() -> None:
    found = InputPaths.of(["package policy\nimport rego.v1\nallow if count(input.a) > input.b.c\n"])
    assert found is not None
    value: JsonValue = {"a": [{"x": 1}, 2, [3]], "b": "not an object", "z": 0}
    assert found.project(value) == {"a": [{}, 2, [3]], "b": "not an object"}


# --- differential: projected input, same answers as the whole input -----------------------------

# Each policy, with an input on which it is defined and not false, so a projection that
# dropped what the rule reads would be caught on that input at least.
TRICKY: list[tuple[str, dict[str, Any]]] = [
    ('allow if { some k, v in input.m; k == "x"; v.y == 1 }', {"m": {"x": {"y": 1}}}),
    ("allow if input.a[_].b == 2", {"a": [{"b": 1}, {"b": 2}]}),
    ("allow if count(input.l) == 2", {"l": [{"x": 1}, 3]}),
    ("allow if { x := input.m; x.x.y == 1 }", {"m": {"x": {"y": 1}}}),
    ('allow if input["k k"].q == "v"', {"k k": {"q": "v"}}),
    ("allow if { every v in input.l { v.ok == true } }", {"l": [{"ok": True}]}),
    ("allow if { some c in input.l; some d in c.l; d.y == 2 }", {"l": [{"l": [{"y": 2}]}]}),
    ('allow if object.get(input.m, "x", {}).y == 1', {"m": {"x": {"y": 1}}}),
    ("allow if { some i; input.l[i].ok; i == 1 }", {"l": [{}, {"ok": True}]}),
    ("allow if { not input.m.x.y }", {"m": {"x": {"y": False}}}),
    (
        "allow if { input.l[1].ok == true; count(input.m) == 1 }",
        {"l": [0, {"ok": True}], "m": {"q": {"b": 1}}},
    ),
    ("count(x) := x.y.b\nallow if count(input.m) == 1", {"m": {"y": {"b": 1}}}),
    ("allow := [v | some v in input.l; v.b]", {"l": [{"b": 1}, {"x": 1}]}),
    ("allow := {k: v.y | some k, v in input.m}", {"m": {"x": {"y": 2}}}),
]
KEYS = ["a", "b", "m", "x", "y", "l", "ok", "q", "k k"]
INNER_KEYS = ["x", "y", "b", "ok", "l", "q"]  # few, so that rules find what they look for


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(6 if depth < 4 else 3)
    if kind < 3:
        return rng.choice([0, 1, 2, True, False, "v", None])
    if kind == 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
    keys = rng.sample(INNER_KEYS, rng.randrange(1, 4))
    return {key: _random_value(rng, depth + 1) for key in keys}


def _noisy(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """``value`` with extra members the rule may or may not read."""
    if isinstance(value, dict):
        noisy = {k: _noisy(rng, v, depth + 1) for k, v in value.items()}
        for key in rng.sample(INNER_KEYS, rng.randrange(3)):
            noisy.setdefault(key, _random_value(rng, depth + 1))
        return noisy
    if isinstance(value, list):
        return [_noisy(rng, v, depth + 1) for v in value] + [
            _random_value(rng, depth + 1)
        ] * rng.randrange(2)
    return value


def _agrees(policy: CompiledPolicy, entrypoint: str, rule: str, value: Any, data: Any) -> Any:
    """``evaluate`` hands over the projection; ``explain`` the whole input."""
    whole = policy.explain(value, data).get(rule)
    assert policy.evaluate(entrypoint, value, data) == whole, value
    return whole


@pytest.mark.parametrize(("source", "witness"), TRICKY)
def test_projected_and_whole_inputs_get_the_same_answer(source: str, witness: Any) -> None:
    policy = CompiledPolicy.compile(
        f"package policy\nimport rego.v1\n{source}\n", entrypoints=["policy/allow"]
    )
    assert _agrees(policy, "policy/allow", "allow", witness, None) not in (None, False, [], {})
    rng = random.Random(source)  # noqa: S311 - reproducible inputs
    for _ in range(150):
        _agrees(policy, "policy/allow", "allow", _noisy(rng, witness), None)
        value = {key: _random_value(rng, 1) for key in rng.sample(KEYS, rng.randrange(2, 6))}
        _agrees(policy, "policy/allow", "allow", value, None)


@pytest.mark.parametrize("name", ["affirming", "default", "allow_all", "deny_all"])
def test_builtin_resource_policies_agree_on_projected_claims(name: str) -> None:
    policy = CompiledPolicy.compile(builtin_policy(name), entrypoints=["policy/allow"])
    rng = random.Random(name)  # noqa: S311 - reproducible inputs
    for _ in range(100):
        submods = {
            rng.choice(["cpu0", "gpu0", "cpu1"]): {
                "ear.status": rng.choice(["affirming", "warning", "contraindicated"]),
                "ear.veraison.annotated-evidence": {
                    rng.choice(["sample", "tdx"]): {"svn": rng.choice(["1", "2"])},
                    "report_data": "r",
                },
            }
            for _ in range(rng.randrange(3))
        }
        claims = {"submods": submods, "iat": rng.randrange(100)}
        data = {"plugin": rng.choice(["resource", "nebula-ca"]), "resource-path": ["a"]}
        _agrees(policy, "policy/allow", "allow", claims, data)


def test_the_default_attestation_policy_agrees_on_projected_claims() -> None:
    source = (POLICIES / "default_cpu.rego").read_text()
    policy = CompiledPolicy.compile(source, entrypoints=["policy/trust_claims"], helpers=HELPERS)
    data = {"reference_value": {"svn": ["1"], "launch_digest": ["abcde"], "major_version": 1}}
    rng = random.Random(7)  # noqa: S311 - reproducible inputs
    for _ in range(60):
        claims = {
            "report_data": "r",
            "runtime_data_claims": {"nonce": "n"},
            "sample": {
                "svn": rng.choice(["1", "2"]),
                "launch_digest": rng.choice(["abcde", "x"]),
                "debug": rng.choice([True, False]),
                "platform_version": {"major": rng.randrange(3), "minor": rng.randrange(3)},
            },
        }
        _agrees(policy, "policy/trust_claims", "trust_claims", claims, data)

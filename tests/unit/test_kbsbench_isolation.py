"""The benchmark's policy-isolation baseline (``bench/kbsbench``: ``inprocess_policy``,
``inprocess_kbs``, ``isolation``, ``loadgen --vary-workload``): the in-process stand-in gives
the pool's answers and errors, it replaces the pool only in a process that imports its
launcher, and the distinct-guest workload really defeats the answer memory. How fast either
is, is the benchmark's to say."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from kbsbench.inprocess_policy import InProcessPolicyWorkers
from kbsbench.isolation import IMAGE_POLICY, table_lines
from kbsbench.isolation import _workload as workload_row
from kbsbench.loadgen import IMAGE_REGISTRY, Workloads

from keybroker.attestation.init_data import parse_init_data
from keybroker.attestation.policy import AttestationPolicies
from keybroker.errors import PolicyParseError
from keybroker.kbs import services
from keybroker.kbs.resource_policy import builtin_policy, compile_resource_policy
from keybroker.policy.prepared import PolicySpec
from keybroker.policy.workers import CompiledPolicies, PolicyWorkers
from keybroker.protocol.models import InitData, JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage

BENCH = Path(__file__).resolve().parents[2] / "bench"
DATA: JsonValue = {"plugin": "resource", "resource-path": ["default", "bench", "secret"]}
POOL = PolicyWorkers()  # one pool for the module: workers start on first use


def _claims(status: str, images: list[str] | None) -> JsonValue:
    cpu0: dict[str, JsonValue] = {"ear.status": status}
    if images is not None:
        cpu0["ear.trustee.identifiers"] = {"validated": {"container_images": list(images)}}
    return {"submods": {"cpu0": cpu0}}


QUESTIONS = [
    _claims("affirming", [f"{IMAGE_REGISTRY}guest-1"]),
    _claims("affirming", [f"{IMAGE_REGISTRY}guest-1", f"{IMAGE_REGISTRY}guest-2"]),
    _claims("warning", [f"{IMAGE_REGISTRY}guest-1"]),
    _claims("affirming", ["docker.io/library/nginx"]),
    _claims("affirming", [f"{IMAGE_REGISTRY}guest-1", "docker.io/library/nginx"]),
    _claims("affirming", []),
    _claims("affirming", None),
]


def _answers(workers: PolicyWorkers, source: str) -> tuple[list[Any], int, dict[str, JsonValue]]:
    """Each question's answer, asked twice; how many answers were remembered; an explain."""

    async def run() -> tuple[list[Any], int, dict[str, JsonValue]]:
        policy = await compile_resource_policy(workers, source)
        answers = [await policy.evaluate("policy/allow", q, DATA) for q in QUESTIONS * 2]
        return answers, policy.remembered(), await policy.explain(QUESTIONS[0], DATA)

    return asyncio.run(run())


def test_image_policy_releases_only_to_affirming_guests_all_of_whose_images_are_the_benchs() -> (
    None
):
    answers, remembered, _ = _answers(POOL, IMAGE_POLICY)
    assert answers == [True, True, False, False, False, False, False] * 2
    assert remembered == len(QUESTIONS)  # it reads the images: no two questions alike


@pytest.mark.parametrize("source", [IMAGE_POLICY, builtin_policy("affirming")])
def test_in_process_baseline_answers_and_explains_as_the_worker_pool(source: str) -> None:
    in_process = InProcessPolicyWorkers()
    try:
        assert _answers(in_process, source) == _answers(POOL, source)
    finally:
        in_process.close()


def test_in_process_baseline_refuses_a_broken_policy_as_the_pool_does() -> None:
    broken = "package policy\n\nallow if {\n"
    details = []
    in_process = InProcessPolicyWorkers()
    try:
        for workers in (POOL, in_process):
            with pytest.raises(PolicyParseError) as refused:
                asyncio.run(compile_resource_policy(workers, broken))
            details.append(refused.value.detail)
    finally:
        in_process.close()
    assert details[0] == details[1] and "policy.rego" in details[0]


def test_in_process_baseline_answers_concurrent_callers_on_the_pools_threads() -> None:
    in_process = InProcessPolicyWorkers()

    async def run() -> list[Any]:
        policy = await compile_resource_policy(in_process, IMAGE_POLICY)
        questions = [_claims("affirming", [f"{IMAGE_REGISTRY}{n}"]) for n in range(40)]
        questions += [_claims("affirming", [f"elsewhere/{n}"]) for n in range(40)]
        return await asyncio.gather(*(policy.evaluate("policy/allow", q, DATA) for q in questions))

    try:
        assert asyncio.run(run()) == [True] * 40 + [False] * 40
    finally:
        in_process.close()
    with pytest.raises(PolicyParseError, match="shut down"):  # closed, as the pool refuses
        asyncio.run(compile_resource_policy(in_process, IMAGE_POLICY))


def test_worker_reply_to_an_unknown_operation_is_an_error_not_an_exception() -> None:
    spec = PolicySpec("package policy\n\nallow := true\n", ("policy/allow",), cache_size=4)
    reply = CompiledPolicies().reply({"op": "delete everything", "spec": asdict(spec)})
    assert reply["error"] == "PolicyEvaluationError"
    assert "unknown policy worker operation" in reply["detail"]


def test_launcher_replaces_the_pool_only_in_a_process_that_imports_it() -> None:
    # nothing in keybroker selects the baseline
    assert services.PolicyWorkers is PolicyWorkers  # type: ignore[attr-defined]
    probe = (
        "import kbsbench.inprocess_kbs\n"
        "from keybroker.kbs import services\n"
        "print(services.PolicyWorkers.__module__, services.PolicyWorkers.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(BENCH)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["kbsbench.inprocess_policy", "InProcessPolicyWorkers"]


def _annotated(init_data: dict[str, str] | None) -> JsonValue:
    """The sample verifier's claims, as the builtin AS annotates them."""
    claims = parse_init_data(InitData(**init_data)).claims if init_data else None
    sample: JsonValue = {
        "svn": "1",
        "launch_digest": "abcde",
        "platform_version": {"major": 1, "minor": 4},
        "debug": False,
    }
    return {"init_data_claims": claims, "sample": sample}


class References:
    """Reference values in a dict (the ``ReferenceValues`` interface the policies read)."""

    def __init__(self, values: dict[str, JsonValue]) -> None:
        self._values = values

    async def register(self, message: str) -> list[str]:
        raise NotImplementedError

    async def query(self, reference_value_id: str) -> JsonValue | None:
        return self._values.get(reference_value_id)

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]:
        return {i: self._values[i] for i in ids if i in self._values}

    async def all_ids(self) -> list[str]:
        return sorted(self._values)


def test_distinct_guests_are_appraised_afresh_and_alike_guests_share_one_answer() -> None:
    references: dict[str, JsonValue] = {"svn": ["1"], "launch_digest": ["abcde"]}
    references |= {"major_version": 1, "minimum_minor_version": 1}
    workloads = Workloads()
    distinct = [_annotated(workloads.next()) for _ in range(5)]
    alike = [_annotated(None) for _ in range(5)]

    async def remembered(evidence: list[JsonValue]) -> tuple[int, list[Any]]:
        """How many answers the appraisals of ``evidence`` added to the memory; their
        extensions."""
        policies = AttestationPolicies(MemoryKeyValueStorage(), References(references), POOL)
        await policies.initialize()
        before = (await policies.compiled("default_cpu")).remembered()  # its compile check
        extensions = [(await policies.appraise("default_cpu", e)).extensions for e in evidence]
        return (await policies.compiled("default_cpu")).remembered() - before, extensions

    count, extensions = asyncio.run(remembered(distinct))
    assert count == 5  # every guest's question is new: nothing was answered from memory
    images = [e["ear.trustee.identifiers"]["validated"]["container_images"] for e in extensions]
    assert len({image for [image] in images}) == 5
    assert all(image.startswith(IMAGE_REGISTRY) for [image] in images)
    assert asyncio.run(remembered(alike))[0] == 1


def _run(per_second: float, p99: float, cpu_ms: float) -> dict[str, Any]:
    """One run's summary (``kbsbench.__main__.loadgen``, 5 s after a 1-second warm-up) and the
    server's CPU time over it (``isolation.measure``)."""
    return {
        "concurrency": 64,
        "completed": int(per_second * 5),
        "completed_with_warmup": int(per_second * 6),
        "server_cpu_seconds": per_second * 6 * cpu_ms / 1000,
        "policy_worker_cpu_seconds": per_second * 6 * cpu_ms / 4000,
        "seconds": 5.0,
        "errors": 0,
        "error_samples": [],
        "per_second": per_second,
        "p50_ms": p99 / 4,
        "p90_ms": p99 / 2,
        "p99_ms": p99,
    }


def test_cost_is_one_minus_isolated_over_in_process_and_the_table_names_both() -> None:
    row = workload_row(
        {
            "isolated": [_run(80, 90, 6.0), _run(90, 110, 6.0)],
            "in_process": [_run(100, 70, 5.0)] * 2,
        },
        vary=True,
    )
    assert row["isolated"]["per_second"] == 85.0 and row["isolated"]["p99_ms"] == 100.0
    assert row["in_process"]["completed"] == 1000 and row["cost_percent"] == 15.0
    assert row["isolated"]["cpu_ms_per_handshake"] == 6.0 and row["cpu_cost_percent"] == 20.0
    assert row["isolated"]["policy_worker_cpu_ms_per_handshake"] == 1.5
    [title, line] = table_lines({"workers": 2, "rounds": 2, "workloads": {"distinct": row}})
    assert "cost = 1 - isolated / in-process" in title
    assert "isolated     85/s" in line and "in-process    100/s" in line and "+15.0 %" in line
    assert "CPU 6.00 (1.50 in policy workers) / 5.00 ms (+20.0 %)" in line

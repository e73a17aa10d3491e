"""Which reference values a policy is given: the ids it names literally, comments aside."""

from __future__ import annotations

import asyncio

from keybroker.attestation.policy import AttestationPolicies, compile_attestation_policy
from keybroker.policy.workers import PolicyWorkers, PooledPolicy
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage


class RecordingValues:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.listed = False

    async def register(self, message: str) -> list[str]:
        return []

    async def query(self, reference_value_id: str) -> JsonValue | None:
        return None

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]:
        self.asked = ids
        return {i: [i] for i in ids}

    async def all_ids(self) -> list[str]:
        self.listed = True
        return ["a", "b"]


LITERAL = """package policy
# query_reference_value(id) in a comment, and "#" in a string, do not count
note := "#"
trust_claims := {"hardware": 2} if input.x in query_reference_value("svn")
"""
COMPUTED = """package policy
name := "svn"
trust_claims := {"hardware": 2} if input.x in query_reference_value(name)
"""


WORKERS = PolicyWorkers()


def _compiled(source: str) -> PooledPolicy:
    return asyncio.run(compile_attestation_policy(WORKERS, source))


def test_literal_ids_only() -> None:
    values = RecordingValues()
    policies = AttestationPolicies(MemoryKeyValueStorage(), values, WORKERS)
    data = asyncio.run(policies.reference_data(_compiled(LITERAL)))
    assert values.asked == ["svn"] and not values.listed
    assert data == {"reference_value": {"svn": ["svn"]}}


def test_computed_id_gets_every_value() -> None:
    values = RecordingValues()
    policies = AttestationPolicies(MemoryKeyValueStorage(), values, WORKERS)
    asyncio.run(policies.reference_data(_compiled(COMPUTED)))
    assert values.listed and values.asked == ["a", "b"]

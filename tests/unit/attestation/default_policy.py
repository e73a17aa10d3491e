"""Evaluating the default CPU attestation policy on claims, with reference values in a dict."""

from __future__ import annotations

import asyncio
from typing import Any

from keybroker.attestation.policy import AttestationPolicies
from keybroker.policy.workers import PolicyWorkers
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage


class References:
    """Reference values held in a dict (the ReferenceValues interface, no provenance)."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        self._values = values

    async def register(self, message: str) -> list[str]:
        raise NotImplementedError

    async def query(self, reference_value_id: str) -> JsonValue | None:
        return self._values.get(reference_value_id)

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]:
        return {i: self._values[i] for i in ids if i in self._values}

    async def all_ids(self) -> list[str]:
        return sorted(self._values)


# one pool for every appraisal of these tests (workers start on first use, die with pytest)
WORKERS = PolicyWorkers()


def appraise(evidence: dict[str, Any], references: dict[str, list[str]]) -> dict[str, int]:
    policies = AttestationPolicies(MemoryKeyValueStorage(), References(references), WORKERS)

    async def run() -> dict[str, int]:
        await policies.initialize()
        return (await policies.appraise("default_cpu", evidence)).trust_vector

    return asyncio.run(run())

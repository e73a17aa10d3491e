"""EAR (EAT Attestation Result) claims: the trustworthiness vector, its AR4SI status tier, and
the token payload layout upstream relying parties read.

Pure: values in, values out. Signing is :mod:`keybroker.attestation.signer`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from keybroker.config import AttestationTokenBrokerConfig
from keybroker.protocol.models import JsonValue

TRUST_CLAIMS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)


def status_of(vector: Mapping[str, int]) -> str:
    """AR4SI tiers: any value in 96..127 -> contraindicated, else any in 32..95 -> warning,
    else any in 2..31 -> affirming, else none."""
    values = [v for v in vector.values()]
    if any(96 <= v <= 127 for v in values):
        return "contraindicated"
    if any(32 <= v <= 95 for v in values):
        return "warning"
    if any(2 <= v <= 31 for v in values):
        return "affirming"
    return "none"


@dataclass(frozen=True)
class Appraisal:
    """One submodule of the result (``cpu0``, ``gpu0``...)."""

    trust_vector: Mapping[str, int]
    annotated_evidence: Mapping[str, JsonValue]
    policy_id: str
    extensions: Mapping[str, JsonValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "ear.status": status_of(self.trust_vector),
            "ear.trustworthiness-vector": dict(self.trust_vector),
            "ear.appraisal-policy-id": self.policy_id,
            "ear.veraison.annotated-evidence": dict(self.annotated_evidence),
            **self.extensions,
        }


def ear_claims(
    submods: Mapping[str, Appraisal], config: AttestationTokenBrokerConfig, *, now: int
) -> dict[str, JsonValue]:
    return {
        "eat_profile": config.profile_name,
        "iat": now,
        "ear.verifier-id": {"developer": config.developer_name, "build": config.build_name},
        "submods": {name: submods[name].to_json() for name in sorted(submods)},
        "exp": now + 60 * config.duration_min,
        "iss": config.issuer_name,
    }

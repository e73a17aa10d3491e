"""The builtin Attestation Service: verify evidence, appraise it, issue a signed EAR token.

``AttestationBackend`` is what the KBS needs from any AS (builtin here; the gRPC client in
``grpc_client``, Intel Trust Authority in ``intel_ta``). ``BuiltinAttestationService`` runs the
verifiers in-process, appraises each submodule with the attestation policy
``<policy id>_<tee class>`` and signs the EAR token.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from keybroker.attestation.ear import Appraisal, ear_claims
from keybroker.attestation.init_data import parse_init_data
from keybroker.attestation.policy import AttestationPolicies
from keybroker.attestation.signer import TokenSigner
from keybroker.config import BuiltinAsConfig
from keybroker.errors import AttestationError, BadRequestError, UnsupportedOperationError
from keybroker.protocol.canonical import HashAlgorithm, runtime_data_digest
from keybroker.protocol.models import InitData, JsonValue, Tee
from keybroker.protocol.untrusted_json import parse_json
from keybroker.rvps.store import ManagedReferenceValues, ReferenceValues
from keybroker.verifiers import TeeClaims, Verifier, build_verifiers

log = logging.getLogger(__name__)

DEFAULT_POLICY_ID = "default"


@dataclass(frozen=True)
class EvidenceToVerify:
    """One attester's evidence with the data it must bind."""

    tee: Tee
    unverified_evidence: JsonValue
    runtime_data: dict[str, JsonValue] | None  # structured: its canonical hash is bound
    hash_algorithm: HashAlgorithm
    init_data: InitData | None = None
    raw_runtime_data: bytes | None = None  # or the expected report data itself
    init_data_digest: bytes | None = None  # or only the init-data digest

    def expected_report_data(self) -> bytes | None:
        if self.raw_runtime_data is not None:
            return self.raw_runtime_data
        if self.runtime_data is None:
            return None
        return runtime_data_digest(self.runtime_data, self.hash_algorithm)


class AttestationBackend(ABC):
    """What the KBS asks of an Attestation Service."""

    @abstractmethod
    def supports(self, tee: Tee) -> bool: ...

    def required_hash_algorithm(self, tee: Tee) -> HashAlgorithm | None:
        """The runtime-data hash this service needs for ``tee`` evidence; None when the guest
        may choose (the KBS then negotiates its usual preference)."""
        return None

    async def challenge(self, tee: Tee, tee_parameters: JsonValue) -> str | None:
        """A TEE-specific challenge nonce (IBM SE's attestation request, as upstream's
        ``generate_supplemental_challenge``), or None for the KBS's random nonce."""
        return None

    @abstractmethod
    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        """Verify every piece of evidence and return the signed attestation token."""

    async def start(self) -> None:  # noqa: B027 - services with nothing to prepare
        """Prepare stores (default policies) before the first request."""

    async def set_policy(self, policy_id: str, source: str) -> None:
        raise UnsupportedOperationError("this attestation service does not take policies")

    async def list_policies(self) -> list[str]:
        raise UnsupportedOperationError(self._policies_not_readable("list"))

    async def policy_text(self, policy_id: str) -> str:
        raise UnsupportedOperationError(self._policies_not_readable("read"))

    async def delete_policy(self, policy_id: str) -> bool:
        """Remove a policy; True when a shipped default took its place."""
        raise UnsupportedOperationError(self._policies_not_readable("delete"))

    def _policies_not_readable(self, operation: str) -> str:
        return f"cannot {operation} the policies of this attestation service through the KBS"

    async def register_reference_value(self, message: str) -> list[str]:
        raise UnsupportedOperationError("this attestation service has no reference values")

    async def query_reference_value(self, reference_value_id: str) -> JsonValue | None:
        raise UnsupportedOperationError("this attestation service has no reference values")

    async def list_reference_values(self) -> list[str]:
        raise UnsupportedOperationError("this attestation service has no reference values")

    async def delete_reference_value(self, reference_value_id: str) -> bool:
        raise UnsupportedOperationError("this attestation service has no reference values")


class BuiltinAttestationService(AttestationBackend):
    def __init__(
        self,
        config: BuiltinAsConfig,
        signer: TokenSigner,
        policies: AttestationPolicies,
        reference_values: ReferenceValues,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._signer = signer
        self._policies = policies
        self._reference_values = reference_values
        self._clock = clock
        self._verifiers: dict[Tee, Verifier] = build_verifiers(config.verifier_config, clock=clock)

    @property
    def signer(self) -> TokenSigner:
        return self._signer

    @property
    def policies(self) -> AttestationPolicies:
        return self._policies

    def supports(self, tee: Tee) -> bool:
        return tee in self._verifiers

    def required_hash_algorithm(self, tee: Tee) -> HashAlgorithm | None:
        # upstream binds SE runtime data with SHA-512, filling the 64-byte user-data field
        return HashAlgorithm.SHA512 if tee is Tee.SE else None

    async def challenge(self, tee: Tee, tee_parameters: JsonValue) -> str | None:
        verifier = self._verifiers.get(tee)
        if verifier is None or not verifier.makes_challenge:
            return None
        # building an SE request costs ECDH and RSA operations: off the event loop
        return await asyncio.to_thread(verifier.challenge, tee_parameters)

    async def start(self) -> None:
        await self._policies.initialize()

    async def set_policy(self, policy_id: str, source: str) -> None:
        await self._policies.set(policy_id, source)

    async def list_policies(self) -> list[str]:
        return await self._policies.list_ids()

    async def policy_text(self, policy_id: str) -> str:
        return await self._policies.text(policy_id)

    async def delete_policy(self, policy_id: str) -> bool:
        return await self._policies.delete(policy_id)

    async def register_reference_value(self, message: str) -> list[str]:
        return await self._reference_values.register(message)

    async def query_reference_value(self, reference_value_id: str) -> JsonValue | None:
        return await self._reference_values.query(reference_value_id)

    async def list_reference_values(self) -> list[str]:
        return await self._managed_reference_values().names()

    async def delete_reference_value(self, reference_value_id: str) -> bool:
        return await self._managed_reference_values().delete(reference_value_id)

    def _managed_reference_values(self) -> ManagedReferenceValues:
        if not isinstance(self._reference_values, ManagedReferenceValues):
            raise UnsupportedOperationError("these reference values cannot be listed or deleted")
        return self._reference_values

    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        return await self.evaluate(evidence, [DEFAULT_POLICY_ID])

    async def evaluate(self, evidence: list[EvidenceToVerify], policy_ids: list[str]) -> str:
        if not evidence:
            raise AttestationError("no evidence to verify")
        policy_id = policy_ids[0] if policy_ids else DEFAULT_POLICY_ID
        submods: dict[str, Appraisal] = {}
        class_counts: dict[str, int] = {}
        for item in evidence:
            verifier = self._verifiers.get(item.tee)
            if verifier is None:
                raise AttestationError(f"no verifier for TEE {item.tee.value} in this service")
            init_data = parse_init_data(item.init_data) if item.init_data else None
            init_digest = init_data.digest if init_data else item.init_data_digest
            verified = await _run_verifier(
                verifier,
                item.unverified_evidence,
                expected_report_data=item.expected_report_data(),
                expected_init_data=init_digest,
            )
            for claims in verified:
                index = class_counts.get(claims.tee_class, 0)
                class_counts[claims.tee_class] = index + 1
                annotated = self._annotate(
                    claims, item.runtime_data, init_data.claims if init_data else None
                )
                appraised = await self._policies.appraise(
                    f"{policy_id}_{claims.tee_class}", annotated
                )
                submods[f"{claims.tee_class}{index}"] = Appraisal(
                    trust_vector=appraised.trust_vector,
                    annotated_evidence=annotated,
                    policy_id=policy_id,
                    extensions=appraised.extensions,
                )
        payload = ear_claims(submods, self._config.attestation_token_broker, now=int(self._clock()))
        return self._signer.sign(payload)

    def _annotate(
        self,
        tee_claims: TeeClaims,
        runtime_data: dict[str, JsonValue] | None,
        init_data_claims: JsonValue,
    ) -> dict[str, JsonValue]:
        """Upstream's layout: bindings lifted to the top, the TEE's own claims under its name."""
        claims = dict(tee_claims.claims)
        annotated: dict[str, JsonValue] = {}
        if "init_data" in claims:
            annotated["init_data"] = claims.pop("init_data")
            annotated["init_data_claims"] = init_data_claims
        if "report_data" in claims:
            annotated["report_data"] = claims.pop("report_data")
            runtime_claims = dict(runtime_data) if runtime_data is not None else None
            if runtime_claims and not self._config.attestation_token_broker.verbose_token:
                runtime_claims.pop("additional-evidence", None)
            annotated["runtime_data_claims"] = runtime_claims
        annotated[tee_claims.tee.value] = claims
        return annotated


async def supplemental_challenge(service: AttestationBackend, inner: dict[str, str] | None) -> str:
    """The AS's challenge endpoints (gRPC ``GetAttestationChallenge``, REST ``/challenge``):
    ``inner`` is upstream's ``{"tee", "tee_params"}``; TEEs without their own challenge get a
    random nonce."""
    inner = inner or {}
    nonce = None
    if "tee" in inner:
        try:
            tee = Tee(inner["tee"])
        except ValueError:
            raise BadRequestError(f"unknown TEE {inner['tee'][:32]!r}") from None
        params = parse_json(inner.get("tee_params") or "{}", what="tee_params")
        nonce = await service.challenge(tee, params)
    return nonce or base64.b64encode(secrets.token_bytes(32)).decode()


async def _run_verifier(
    verifier: Verifier,
    unverified_evidence: JsonValue,
    *,
    expected_report_data: bytes | None,
    expected_init_data: bytes | None,
) -> list[TeeClaims]:
    """Verifiers that may fetch collateral (or verify long chains) run in a worker thread, so
    one guest's quote never stalls the event loop for the others."""
    if not verifier.may_block:
        return verifier.verify(
            unverified_evidence,
            expected_report_data=expected_report_data,
            expected_init_data=expected_init_data,
        )
    return await asyncio.to_thread(
        functools.partial(
            verifier.verify,
            unverified_evidence,
            expected_report_data=expected_report_data,
            expected_init_data=expected_init_data,
        )
    )

"""The builtin Attestation Service: verify evidence, appraise it, issue a signed EAR token.

``AttestationBackend`` is what the KBS needs from any AS (builtin here; gRPC and Intel Trust
Authority later). ``BuiltinAttestationService`` runs the verifiers in-process.

Appraisal is provisional until attestation policies land (the "Attestation Service semantics"
issue): the trust vector is what upstream's default policy yields when no reference values are
registered, so no guest is ever ``affirming`` yet. The code path that replaces it is
``_appraise``.
"""

from __future__ import annotations

import logging
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from keybroker.attestation.ear import Appraisal, ear_claims
from keybroker.attestation.signer import TokenSigner
from keybroker.config import BuiltinAsConfig
from keybroker.errors import AttestationError, BadRequestError
from keybroker.protocol.canonical import HashAlgorithm, runtime_data_digest
from keybroker.protocol.models import InitData, JsonValue, Tee
from keybroker.verifiers import VERIFIERS, TeeClaims, Verifier

log = logging.getLogger(__name__)

DEFAULT_POLICY_ID = "default"


@dataclass(frozen=True)
class EvidenceToVerify:
    """One attester's evidence with the data it must bind."""

    tee: Tee
    unverified_evidence: JsonValue
    runtime_data: dict[str, JsonValue]
    hash_algorithm: HashAlgorithm
    init_data: InitData | None = None


class AttestationBackend(ABC):
    """What the KBS asks of an Attestation Service."""

    @abstractmethod
    def supports(self, tee: Tee) -> bool: ...

    @abstractmethod
    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        """Verify every piece of evidence and return the signed attestation token."""


class BuiltinAttestationService(AttestationBackend):
    def __init__(
        self,
        config: BuiltinAsConfig,
        signer: TokenSigner,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._signer = signer
        self._clock = clock
        self._verifiers: dict[Tee, Verifier] = {tee: cls() for tee, cls in VERIFIERS.items()}

    @property
    def signer(self) -> TokenSigner:
        return self._signer

    def supports(self, tee: Tee) -> bool:
        return tee in self._verifiers

    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        return self.evaluate(evidence, [DEFAULT_POLICY_ID])

    def evaluate(self, evidence: list[EvidenceToVerify], policy_ids: list[str]) -> str:
        if not evidence:
            raise AttestationError("no evidence to verify")
        policy_id = policy_ids[0] if policy_ids else DEFAULT_POLICY_ID
        submods: dict[str, Appraisal] = {}
        class_counts: dict[str, int] = {}
        for item in evidence:
            verifier = self._verifiers.get(item.tee)
            if verifier is None:
                raise AttestationError(f"no verifier for TEE {item.tee.value} in this service")
            init_digest, init_claims = _parse_init_data(item.init_data)
            for claims in verifier.verify(
                item.unverified_evidence,
                expected_report_data=runtime_data_digest(item.runtime_data, item.hash_algorithm),
                expected_init_data=init_digest,
            ):
                index = class_counts.get(claims.tee_class, 0)
                class_counts[claims.tee_class] = index + 1
                annotated = self._annotate(claims, item.runtime_data, init_claims)
                submods[f"{claims.tee_class}{index}"] = Appraisal(
                    trust_vector=_appraise(claims),
                    annotated_evidence=annotated,
                    policy_id=policy_id,
                )
        payload = ear_claims(submods, self._config.attestation_token_broker, now=int(self._clock()))
        return self._signer.sign(payload)

    def _annotate(
        self,
        tee_claims: TeeClaims,
        runtime_data: dict[str, JsonValue],
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
            runtime_claims = dict(runtime_data)
            if not self._config.attestation_token_broker.verbose_token:
                runtime_claims.pop("additional-evidence", None)
            annotated["runtime_data_claims"] = runtime_claims
        annotated[tee_claims.tee.value] = claims
        return annotated


def _appraise(tee_claims: TeeClaims) -> dict[str, int]:
    """Provisional trust vector (see the module docstring).

    Mirrors upstream's default policy with an empty reference-value store: executables and
    hardware cannot be matched against anything (33, 97); configuration is affirmed (2) when
    the TEE reports it is not in debug mode, else 36.
    """
    debug = tee_claims.claims.get("debug")
    return {
        "instance-identity": 0,
        "configuration": 2 if debug is False else 36,
        "executables": 33,
        "file-system": 0,
        "hardware": 97,
        "runtime-opaque": 0,
        "storage-opaque": 0,
        "sourced-data": 0,
    }


def _parse_init_data(init_data: InitData | None) -> tuple[bytes | None, JsonValue]:
    """Digest of the raw init-data text by its own ``algorithm``, and its ``data`` as claims."""
    if init_data is None:
        return None, None
    if init_data.format != "toml":
        raise BadRequestError(
            f"not supported yet: init-data format {init_data.format[:16]!r} (only toml)"
        )
    try:
        document = tomllib.loads(init_data.body)
        algorithm = HashAlgorithm.parse(str(document.get("algorithm", "")))
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise BadRequestError(f"init-data is not valid: {e}") from None
    return algorithm.digest(init_data.body.encode()), document.get("data")

"""The RCAR handshake (Request, Challenge, Attestation, Response), transport-free.

``auth`` checks the protocol version and TEE, negotiates the runtime-data hash and opens a
session with a fresh nonce. ``attest`` checks the evidence against that session: the nonce the
guest echoes must be the session's, the evidence must bind
``H(JCS({tee-pubkey, nonce, additional-evidence}))``, and the Attestation Service must verify
it. Only then is the session attested and the token returned.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from keybroker.attestation.service import AttestationBackend, EvidenceToVerify
from keybroker.errors import AttestationError, BadRequestError, KeybrokerError
from keybroker.kbs.metrics import KbsMetrics
from keybroker.kbs.sessions import Session, SessionStatus, SessionStore
from keybroker.protocol.canonical import DEFAULT_HASH_ALGORITHM, HashAlgorithm, runtime_data
from keybroker.protocol.jwk import parse_tee_pubkey
from keybroker.protocol.models import (
    PROTOCOL_VERSION,
    Attestation,
    Challenge,
    JsonValue,
    Request,
    Tee,
)
from keybroker.protocol.untrusted_json import parse_json
from keybroker.storage.read_cache import ReadCache

log = logging.getLogger(__name__)

M = TypeVar("M", Request, Attestation)

_HASH_PREFERENCE = (HashAlgorithm.SHA384, HashAlgorithm.SHA512, HashAlgorithm.SHA256)


def parse_json_model(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequestError(
            f"malformed {model.__name__} message: `{where}`: {first['msg']}"
        ) from None


def select_hash_algorithm(
    extra_params: JsonValue, required: HashAlgorithm | None = None
) -> HashAlgorithm:
    """SHA-384 unless the guest lists algorithms without it; then the strongest it lists.
    With ``required`` (an attestation service that checks one algorithm, as Intel Trust
    Authority does per TEE): that one, which a guest listing algorithms must list."""
    offered = (
        extra_params.get("supported-hash-algorithms") if isinstance(extra_params, dict) else None
    )
    if offered is None:
        return required or DEFAULT_HASH_ALGORITHM
    if not isinstance(offered, list) or not all(isinstance(a, str) for a in offered):
        raise BadRequestError("extra-params.supported-hash-algorithms must be a list of strings")
    names = {a.lower() for a in offered}
    if required is not None:
        if required.value not in names:
            raise AttestationError(
                f"this attestation service needs {required.value} runtime-data hashes for this "
                f"TEE; the guest offered {sorted(names)[:8]}"
            )
        return required
    for algorithm in _HASH_PREFERENCE:
        if algorithm.value in names:
            return algorithm
    raise AttestationError(
        f"none of the offered hash algorithms {sorted(names)[:8]} is supported: "
        "expected sha256, sha384 or sha512"
    )


class Handshake:
    """The two RCAR steps, counted in upstream's metrics: ``kbs_auth_*`` (every /auth is a
    request, then a success or an error) and ``kbs_attestation_*`` (every /attest is a
    request; evidence the attestation service refused is a failure for its TEE; anything
    else that stops it, an error)."""

    def __init__(
        self,
        attestation: AttestationBackend,
        sessions: SessionStore,
        metrics: KbsMetrics,
        *,
        read_cache: ReadCache | None = None,
    ) -> None:
        self._as = attestation
        self._sessions = sessions
        self._metrics = metrics
        # the builtin AS's policy and reference-value reads (storage/read_cache.py)
        self._read_cache = read_cache or ReadCache.disabled()

    async def auth(self, body: bytes) -> tuple[Challenge, Session]:
        self._metrics.auth_requests.inc()
        try:
            result = await self._auth(body)
        except Exception:
            self._metrics.auth_errors.inc()
            raise
        self._metrics.auth_successes.inc()
        return result

    async def attest(self, body: bytes, session_id: str | None) -> tuple[str, Session]:
        self._metrics.attestation_requests.inc()
        verifying: Tee | None = None

        def verify_started(tee: Tee | None) -> None:
            nonlocal verifying
            verifying = tee

        try:
            token, session = await self._attest(body, session_id, verify_started)
        except Exception:
            if verifying is None:
                self._metrics.attestation_errors.inc()
            else:
                self._metrics.attestation_failures.labels(tee_type=verifying.value).inc()
            raise
        self._metrics.attestation_successes.labels(tee_type=session.tee.value).inc()
        return token, session

    async def _auth(self, body: bytes) -> tuple[Challenge, Session]:
        request = parse_json_model(Request, body)
        if request.version != PROTOCOL_VERSION:
            raise AttestationError(
                f"KBS Client Protocol Version Mismatch: expect {PROTOCOL_VERSION} "
                f"while the request is {request.version[:32]}"
            )
        if not self._as.supports(request.tee):
            raise AttestationError(
                f"TEE {request.tee.value} is not supported by this attestation service"
            )
        algorithm = select_hash_algorithm(
            request.extra_params, self._as.required_hash_algorithm(request.tee)
        )
        nonce = await self._as.challenge(request.tee, request.extra_params)
        session = await self._sessions.open(request.tee, algorithm, nonce=nonce)
        challenge = Challenge.model_validate(
            {"nonce": session.nonce, "extra-params": {"selected-hash-algorithm": algorithm.value}}
        )
        return challenge, session

    async def _attest(
        self, body: bytes, session_id: str | None, verify_started: Callable[[Tee | None], None]
    ) -> tuple[str, Session]:
        if session_id is None:
            raise AttestationError("no kbs-session-id cookie: call /auth first")
        session = await self._sessions.get(session_id)
        if session is None:
            raise AttestationError("session not found or expired: start again with /auth")
        if session.status is not SessionStatus.AUTHED:
            raise AttestationError("this session is already attested: start again with /auth")
        attestation = parse_json_model(Attestation, body)
        if not hmac.compare_digest(attestation.runtime_data.nonce.encode(), session.nonce.encode()):
            raise AttestationError(
                "the nonce in the Attestation message is not this session's nonce"
            )
        tee_pubkey = parse_tee_pubkey(attestation.runtime_data.tee_pubkey).to_jwk()
        await self._sessions.claim_attestation(session)
        try:
            evidence = self._evidence(session, attestation, tee_pubkey)
            verify_started(session.tee)  # from here on, a refusal is a failure of this TEE
            with self._read_cache.release():  # its policy and reference values: one stamp
                token = await self._as.verify(evidence)
            verify_started(None)
        except KeybrokerError:
            await self._sessions.discard(session)
            raise
        return token, await self._sessions.mark_attested(session, token)

    def _evidence(
        self, session: Session, attestation: Attestation, tee_pubkey: dict[str, str]
    ) -> list[EvidenceToVerify]:
        additional = attestation.tee_evidence.additional_evidence
        evidence = [
            EvidenceToVerify(
                tee=session.tee,
                unverified_evidence=attestation.tee_evidence.primary_evidence,
                runtime_data=runtime_data(session.nonce, tee_pubkey, additional),
                hash_algorithm=session.hash_algorithm,
                init_data=attestation.init_data,
            )
        ]
        if additional:
            # Devices bind the runtime data without the additional evidence itself.
            device_data = runtime_data(session.nonce, tee_pubkey, None)
            for tee, unverified in _parse_additional(additional).items():
                evidence.append(
                    EvidenceToVerify(
                        tee=tee,
                        unverified_evidence=unverified,
                        runtime_data=device_data,
                        hash_algorithm=session.hash_algorithm,
                    )
                )
        return evidence


def _parse_additional(text: str) -> dict[Tee, JsonValue]:
    parsed = parse_json(text, what="additional_evidence")
    if not isinstance(parsed, dict):
        raise BadRequestError("additional_evidence must map TEE names to evidence")
    result: dict[Tee, JsonValue] = {}
    for name, value in parsed.items():
        try:
            result[Tee(name)] = value
        except ValueError:
            raise BadRequestError(
                f"additional_evidence names an unknown TEE {name[:32]!r}"
            ) from None
    return result

"""The verifier interface: ``claims = verify(evidence, expected_report_data, expected_init_data)``.

A verifier is pure: it takes the guest's unverified evidence (JSON) and the values the evidence
must bind, checks signatures and bindings, and returns named claims. It never opens a socket;
collateral (certificates, CRLs, TCB info) reaches it through an injected fetcher.

The public :meth:`Verifier.verify` enforces a size limit and turns any foreign exception into
``EvidenceError``, so a malformed report can never surface as a 500. The foreign exception's
text goes to the log, not to the client: it may describe the verifier's internals (a library's
message, a file path, a parser state) to whoever sent the evidence.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from keybroker.errors import EvidenceError, KeybrokerError
from keybroker.protocol.models import JsonValue, Tee

log = logging.getLogger(__name__)

# A TDX CC event log table is often 1 MiB (zero-padded), 1.4 MB as base64, beside the quote
MAX_EVIDENCE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TeeClaims:
    """What one verifier vouches for: claims of one TEE instance, and its class (cpu, gpu)."""

    tee: Tee
    tee_class: str
    claims: dict[str, JsonValue]


class Verifier(ABC):
    tee: ClassVar[Tee]
    # True for verifiers that may wait on I/O (a collateral fetch): run off the event loop
    may_block: ClassVar[bool] = False
    # True for verifiers that make their own challenge (IBM SE): only they cost /auth a thread
    makes_challenge: ClassVar[bool] = False

    def verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        size = len(json.dumps(unverified_evidence, separators=(",", ":")))
        if size > MAX_EVIDENCE_BYTES:
            raise EvidenceError(
                f"{self.tee} evidence is {size} bytes, more than the {MAX_EVIDENCE_BYTES} allowed"
            )
        try:
            return self._verify(
                unverified_evidence,
                expected_report_data=expected_report_data,
                expected_init_data=expected_init_data,
            )
        except KeybrokerError:
            raise
        except Exception as e:  # a parser bug or odd input must deny, never crash
            log.warning(
                "%s verifier failed on the evidence (%s: %s)",
                self.tee,
                type(e).__name__,
                e,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            raise EvidenceError(
                f"{self.tee} evidence could not be verified: it is malformed or unsupported "
                "(details in the KBS log)"
            ) from e

    def challenge(self, tee_parameters: JsonValue) -> str | None:
        """A TEE-specific challenge nonce (IBM SE's attestation request), or None for the
        KBS's usual random nonce. May be CPU-heavy: callers run it off the event loop."""
        return None

    @abstractmethod
    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]: ...

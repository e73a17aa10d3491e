"""The TDX and SGX verifiers: DCAP quote checks, bindings, claims, collateral appraisal.

Evidence, as upstream's attesters send it: TDX ``{"quote": <base64>, "cc_eventlog": <base64>?}``,
SGX ``{"quote": <base64>}``. Steps: parse and verify the quote to the pinned Intel root
(:mod:`keybroker.verifiers.intel.dcap`), bind it to the session (``report_data`` = the expected
runtime-data digest padded with zero bytes to 64; the init-data digest padded to the width of
``mr_config_id`` (48) or ``config_id`` (64)), then let the injected :class:`TcbAppraiser` add
the collateral results (``tcb_status``, ``advisory_ids``, dates). Without an appraiser the
verifier refuses: a quote whose platform TCB cannot be judged is not evidence.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Protocol

from cryptography import x509

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.intel.dcap import (
    Quote,
    SgxReportBody,
    TdReportBody,
    parse_quote,
    verify_quote,
)
from keybroker.verifiers.intel.sgx_claims import sgx_claims
from keybroker.verifiers.intel.tdx_claims import tdx_claims
from keybroker.verifiers.tcg.eventlog import (
    EventLog,
    parse_event_log,
    uefi_event_logs,
    verify_against_rtmrs,
)


class TcbAppraiser(Protocol):
    """Judges the platform's TCB from collateral: returns the collateral claims."""

    def appraise(
        self, quote: Quote, pck: x509.Certificate, now: datetime.datetime
    ) -> dict[str, JsonValue]: ...


def padded(value: bytes, width: int, what: str) -> bytes:
    """``value`` followed by zero bytes up to ``width`` (as upstream regularizes bindings)."""
    if len(value) > width:
        raise EvidenceError(f"{what} of {len(value)} bytes does not fit the {width}-byte field")
    return value + bytes(width - len(value))


def _quote_bytes(unverified_evidence: JsonValue, tee: Tee) -> bytes:
    text = unverified_evidence.get("quote") if isinstance(unverified_evidence, dict) else None
    if not isinstance(text, str):
        raise EvidenceError(f"{tee.value} evidence must be an object with a base64 `quote`")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise EvidenceError(f"{tee.value} evidence `quote` is not standard base64") from None


def _event_log(unverified_evidence: JsonValue) -> EventLog | None:
    """The CC event log the TDX evidence carries (``cc_eventlog``, base64), if any."""
    text = unverified_evidence.get("cc_eventlog") if isinstance(unverified_evidence, dict) else None
    if text is None:
        return None
    if not isinstance(text, str):
        raise EvidenceError("tdx evidence `cc_eventlog` must be a base64 string")
    try:
        return parse_event_log(base64.b64decode(text, validate=True))
    except binascii.Error:
        raise EvidenceError("tdx evidence `cc_eventlog` is not standard base64") from None


class _DcapVerifier(Verifier):
    may_block = True

    def __init__(
        self,
        appraiser: TcbAppraiser | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._appraiser = appraiser
        self._clock = clock

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        if self._appraiser is None:
            raise EvidenceError(
                f"{self.tee.value} evidence cannot be appraised: no DCAP collateral source is "
                "configured"
            )
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        quote = parse_quote(_quote_bytes(unverified_evidence, self.tee))
        pck = verify_quote(quote, now)
        if expected_report_data is not None:
            wanted = padded(expected_report_data, 64, "the runtime-data digest")
            if quote.body.report_data != wanted:
                raise EvidenceError(
                    f"{self.tee.value} quote report_data does not match the digest of the "
                    "session's runtime data"
                )
        claims = self._claims(quote, pck, unverified_evidence, expected_init_data)
        claims.update(self._appraiser.appraise(quote, pck, now))
        return [TeeClaims(self.tee, "cpu", claims)]

    @abstractmethod
    def _claims(
        self,
        quote: Quote,
        pck: x509.Certificate,
        unverified_evidence: JsonValue,
        expected_init_data: bytes | None,
    ) -> dict[str, JsonValue]:
        """The TEE's own checks and claims, once the quote and report_data are verified."""


def _bind_init_data(field: bytes, expected: bytes | None, what: str) -> None:
    if expected is not None and field != padded(expected, len(field), "the init-data digest"):
        raise EvidenceError(f"the quote's {what} does not match the init-data digest")


class TdxVerifier(_DcapVerifier):
    tee = Tee.TDX

    def _claims(
        self,
        quote: Quote,
        pck: x509.Certificate,
        unverified_evidence: JsonValue,
        expected_init_data: bytes | None,
    ) -> dict[str, JsonValue]:
        body = quote.body
        if not isinstance(body, TdReportBody):
            raise EvidenceError("tdx evidence carries an SGX quote")
        _bind_init_data(body.mr_config_id, expected_init_data, "mr_config_id")
        claims = tdx_claims(quote, pck)
        log = _event_log(unverified_evidence)
        if log is not None:
            # only a log that replays to the quote's RTMRs says anything about the boot
            verify_against_rtmrs(log.events, body.rtmrs)
            claims["uefi_event_logs"] = uefi_event_logs(log.events)
        return claims


class SgxVerifier(_DcapVerifier):
    tee = Tee.SGX

    def _claims(
        self,
        quote: Quote,
        pck: x509.Certificate,
        unverified_evidence: JsonValue,
        expected_init_data: bytes | None,
    ) -> dict[str, JsonValue]:
        body = quote.body
        if not isinstance(body, SgxReportBody):
            raise EvidenceError("sgx evidence carries a TDX quote")
        _bind_init_data(body.config_id, expected_init_data, "config_id")
        return sgx_claims(quote, pck)

"""The Hygon CSV verifier (TEE ``csv``): report, PEK → CEK → HSK → pinned HRK, bindings, claims.

Evidence, as upstream's attester sends it (``csv-rs`` serde JSON)::

    {"attestation_report": {"magic": [16], "flags": n, "data": [4096]},
     "cert_chain": {"hsk_cek": {"hsk": {...}, "cek": {...}} (optional), "pek": {...}},
     "serial_number": [bytes of the chip's serial, NUL padded],
     "cc_eventlog": "<base64>" | null}

What :class:`CsvVerifier` proves, failing closed with :class:`EvidenceError` (or
:class:`ServiceUnavailableError` when the HSK/CEK cannot be had):

1. the report is a version 1 or 2 report (:mod:`.csv_report`) and its REPORT_DATA is the
   session's runtime-data digest padded with zeros to 64 bytes (checked first: a report bound
   to another session costs no fetch);
2. the HSK and CEK, from the evidence or else fetched for ``serial_number`` (offline directory,
   Hygon's KDS, cache), chain to the HRK **pinned in this package**;
3. the CEK signed the PEK, and the PEK signed the report (SM2/SM3, :mod:`.certs`);
4. for a version 2 report with an event log, the log replays (SM3) to RTMR1-4.

Init-data is not bound (CSV has no field for it): a warning, as upstream. What it does not do:
judge the measurement or the guest policy (debugging allowed or not); that is the attestation
policy's work.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.hygon.certs import (
    CA_CERT,
    CSV_CERT,
    CaCertificate,
    CsvCertificate,
    Usage,
    pinned_hrk,
    split_hsk_cek,
    verify_chain,
    verify_signed_by,
)
from keybroker.verifiers.hygon.collateral import HskCekFetcher, chip_id_text
from keybroker.verifiers.hygon.csv_report import WRAPPER, CsvReport, csv_claims, parse_report
from keybroker.verifiers.hygon.layout import encode
from keybroker.verifiers.intel.verifier import padded
from keybroker.verifiers.tcg.eventlog import (
    Event,
    parse_event_log,
    replay_registers,
    uefi_event_logs,
)

logger = logging.getLogger(__name__)

MAX_SERIAL_BYTES = 64


def _object(unverified: JsonValue, what: str) -> dict[str, JsonValue]:
    if not isinstance(unverified, dict):
        raise EvidenceError(f"{what} must be an object")
    return unverified


def parse_wrapper(unverified: JsonValue) -> CsvReport:
    """The report in upstream's ``attestation_report`` wrapper."""
    raw = encode(WRAPPER, unverified, "csv `attestation_report`")
    return parse_report(raw[:16], int.from_bytes(raw[16:20], "little"), raw[20:])


def _serial(unverified: JsonValue) -> str:
    if (
        not isinstance(unverified, list)
        or len(unverified) > MAX_SERIAL_BYTES
        or not all(type(b) is int and 0 <= b < 256 for b in unverified)
    ):
        raise EvidenceError(
            f"csv `serial_number` must be a list of at most {MAX_SERIAL_BYTES} bytes"
        )
    return chip_id_text(bytes(unverified), "csv `serial_number`")


def bind_report_data(
    found: bytes, expected: bytes | None, what: str, *, anonce_note: bool = False
) -> None:
    if expected is None:
        if anonce_note:
            # without a binding nothing pins a version 1 report's (unsigned) anonce, so its
            # decoded fields could be altered by whoever relays the report
            logger.warning("a version 1 CSV report is accepted with no report data to bind")
        return
    if found != padded(expected, 64, "the runtime-data digest"):
        raise EvidenceError(
            f"the {what} REPORT_DATA does not match the digest of the session's runtime data"
        )


class CsvVerifier(Verifier):
    tee = Tee.CSV
    may_block = True  # SM2 in pure Python, and a KDS fetch

    def __init__(self, fetcher: HskCekFetcher, *, hrk: CaCertificate | None = None) -> None:
        """``hrk``: the trust anchor; the pinned Hygon root unless a test gives its own."""
        self._fetcher = fetcher
        self._hrk = hrk if hrk is not None else pinned_hrk()

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        evidence = _object(unverified_evidence, "csv evidence")
        report = parse_wrapper(evidence.get("attestation_report"))
        serial = _serial(evidence.get("serial_number"))
        chain = _object(evidence.get("cert_chain"), "csv `cert_chain`")
        pek = CsvCertificate.from_bytes(encode(CSV_CERT, chain.get("pek"), "csv PEK"), "PEK")
        bind_report_data(
            report.report_data,
            expected_report_data,
            "CSV report's",
            anonce_note=report.version == 1,
        )
        if expected_init_data is not None:
            logger.warning("csv evidence cannot bind init-data (no such field): not checked")
        hsk, cek = self._hsk_cek(chain.get("hsk_cek"), serial)
        verify_chain(self._hrk, hsk, cek, pek)
        verify_signed_by(pek, Usage.PEK, report.signed, report.signature, "CSV report")
        claims = csv_claims(report, serial)
        if report.version == 2:
            log = _event_log(evidence.get("cc_eventlog"))
            if log is not None:
                _check_rtmrs(log, report)
                claims["uefi_event_logs"] = uefi_event_logs(log)
        return [TeeClaims(Tee.CSV, "cpu", claims)]

    def _hsk_cek(self, unverified: JsonValue, serial: str) -> tuple[CaCertificate, CsvCertificate]:
        if unverified is None:
            return split_hsk_cek(self._fetcher.hsk_cek(serial))
        pair = _object(unverified, "csv `hsk_cek`")
        if sorted(pair) != ["cek", "hsk"]:
            raise EvidenceError("csv `hsk_cek` must have exactly the fields hsk, cek")
        hsk = CaCertificate.from_bytes(encode(CA_CERT, pair["hsk"], "csv HSK"), "HSK")
        cek = CsvCertificate.from_bytes(encode(CSV_CERT, pair["cek"], "csv CEK"), "CEK")
        return hsk, cek


def _event_log(unverified: JsonValue) -> tuple[Event, ...] | None:
    if unverified is None:
        return None
    if not isinstance(unverified, str):
        raise EvidenceError("csv evidence `cc_eventlog` must be a base64 string")
    try:
        return parse_event_log(base64.b64decode(unverified, validate=True)).events
    except binascii.Error:
        raise EvidenceError("csv evidence `cc_eventlog` is not standard base64") from None


def _check_rtmrs(events: Sequence[Event], report: CsvReport) -> None:
    """As upstream: event log indexes 1-4 replay (SM3) to RTMR1-4."""
    for index, (replayed, reported) in enumerate(
        zip(replay_registers(events, "SM3", 4), report.rtmrs[1:], strict=True), start=1
    ):
        if replayed != reported:
            raise EvidenceError(
                f"the event log does not replay to the CSV report's RTMR{index}: replayed "
                f"{replayed.hex()}, the report has {reported.hex()}"
            )

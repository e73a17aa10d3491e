"""The ``tpm`` verifier: a TPM 2.0 quote over the SHA-256 PCRs, by an enrolled attestation key.

Evidence, as upstream guest-components' ``tpm`` attester sends it (unknown members ignored, as
serde does)::

    {"ak_public": "<standard base64 of the AK's DER SubjectPublicKeyInfo>",
     "tpm_quote": {"signature": "<standard base64 of a marshalled TPMT_SIGNATURE>",
                   "message": "<standard base64 of a marshalled TPMS_ATTEST>",
                   "pcrs": ["<64 hex digits>", ...]},      # in the quote's selection order
     "event_log": "<standard base64 of a TCG2 event log>"}  # optional; Keybroker's addition

The chain of trust, checked in this order (each step fails closed with ``EvidenceError``):

1. ``ak_public`` is one of the operator's enrolled AKs (:mod:`.trusted_aks`): without that, a
   software TPM anywhere could quote any PCR values;
2. the quote is a ``TPMS_ATTEST`` of type quote, signed by that AK (:mod:`.quote`);
3. it covers the SHA-256 PCR bank only, and the given PCR values hash to its ``pcrDigest``;
4. its ``extraData`` is the session's runtime-data digest truncated or zero-padded to 32 bytes
   (the attester's size);
5. the init-data digest, when given, is what PCR 8 holds after one extension from zeros;
6. the event log, when given, replays to the quoted PCRs 0 to 7 (the firmware's; later PCRs are
   also extended at run time by what the log does not record, such as PCR 8's init-data).

Claims are upstream's: ``pcr00`` ... (hex, one per quoted PCR), ``init_data`` (PCR 8, hex),
``report_data`` (the quote's ``extraData``, hex) and ``ak_public`` (as the evidence gave it),
plus ``uefi_event_logs`` when an event log was verified.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.tcg.eventlog import (
    MAX_LOG_SIZE,
    Event,
    parse_event_log,
    replay_pcrs,
    uefi_event_logs,
)
from keybroker.verifiers.tpm.quote import (
    TPM_ALG_SHA256,
    TpmsAttest,
    init_data_pcr_value,
    parse_attest,
    parse_tpmt_signature,
    pcr_values,
    verify_signature,
)
from keybroker.verifiers.tpm.trusted_aks import AkPublicKey, TrustedAks

TEE = Tee.TPM
REPORT_DATA_SIZE = 32  # the attester pads or truncates the runtime-data digest to this
INIT_DATA_PCR = 8
FIRMWARE_PCRS = range(8)  # PCRs 0-7: measured by firmware, all of it in the event log
PCR_COUNT = 24
MAX_AK_SIZE = 4096  # DER SPKI of an RSA-4096 key is 550 bytes
MAX_SIGNATURE_SIZE = 2048
MAX_MESSAGE_SIZE = 2048
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_PCR_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class TpmEvidence:
    """The evidence decoded, every part still *unverified*."""

    ak_public: str  # as sent: it becomes the ``ak_public`` claim
    ak_key: AkPublicKey
    signature: bytes
    message: bytes
    pcrs: tuple[bytes, ...]
    event_log: bytes | None


def _b64(value: JsonValue, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4 or not _B64.fullmatch(value):
        raise EvidenceError(f"tpm evidence {what} is not standard base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise EvidenceError(f"tpm evidence {what} is not standard base64") from None


def _member(document: dict[str, JsonValue], name: str, where: str) -> JsonValue:
    if name not in document:
        raise EvidenceError(f"tpm evidence has no `{name}` in {where}")
    return document[name]


def _ak_key(der: bytes) -> AkPublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        raise EvidenceError("tpm evidence `ak_public` is not a DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EvidenceError("tpm evidence `ak_public` is neither an RSA nor an EC key")
    return key


def parse_evidence(unverified: JsonValue) -> TpmEvidence:
    if not isinstance(unverified, dict):
        raise EvidenceError("tpm evidence must be a JSON object")
    quote = _member(unverified, "tpm_quote", "the evidence")
    if not isinstance(quote, dict):
        raise EvidenceError("tpm evidence `tpm_quote` must be an object")
    pcrs = _member(quote, "pcrs", "`tpm_quote`")
    if not isinstance(pcrs, list) or len(pcrs) > PCR_COUNT:
        raise EvidenceError(f"tpm evidence `pcrs` must be a list of at most {PCR_COUNT} values")
    if not all(isinstance(pcr, str) and _PCR_HEX.fullmatch(pcr) for pcr in pcrs):
        raise EvidenceError("every tpm evidence PCR value must be 64 hex digits (SHA-256)")
    ak_public = _member(unverified, "ak_public", "the evidence")
    log = unverified.get("event_log")
    return TpmEvidence(
        ak_public=str(ak_public),
        ak_key=_ak_key(_b64(ak_public, "`ak_public`", MAX_AK_SIZE)),
        signature=_b64(_member(quote, "signature", "`tpm_quote`"), "signature", MAX_SIGNATURE_SIZE),
        message=_b64(_member(quote, "message", "`tpm_quote`"), "message", MAX_MESSAGE_SIZE),
        pcrs=tuple(bytes.fromhex(pcr) for pcr in pcrs),
        event_log=None if log is None else _b64(log, "`event_log`", MAX_LOG_SIZE),
    )


@dataclass(frozen=True)
class VerifiedQuote:
    attest: TpmsAttest
    pcrs: dict[int, bytes]  # SHA-256 bank, by PCR index


def verify_quote(evidence: TpmEvidence, trusted: TrustedAks) -> VerifiedQuote:
    """Steps 1 to 3: an enrolled AK signed a quote over these SHA-256 PCR values."""
    trusted.check(evidence.ak_key)
    attest = parse_attest(evidence.message)
    signature = parse_tpmt_signature(evidence.signature)
    verify_signature(attest, signature, evidence.ak_key)
    if not attest.pcr_select or any(b.hash_alg != TPM_ALG_SHA256 for b in attest.pcr_select):
        raise EvidenceError("the TPM quote must cover the SHA-256 PCR bank, and only it")
    values = pcr_values(attest, evidence.pcrs, signature.hash_alg)
    return VerifiedQuote(attest, {index: value for (_, index), value in values.items()})


def check_report_data(quote: VerifiedQuote, expected_report_data: bytes | None) -> None:
    """Step 4: the quote's nonce is the session's digest, cut or padded to 32 bytes."""
    if expected_report_data is None:
        # the quote's nonce is all that makes it fresh: nothing to check it against means a
        # replayed quote would pass
        raise EvidenceError("tpm evidence cannot be checked without runtime data")
    expected = expected_report_data[:REPORT_DATA_SIZE].ljust(REPORT_DATA_SIZE, b"\0")
    if quote.attest.extra_data != expected:
        raise EvidenceError(
            "the TPM quote's nonce (extraData) is not the digest of the session's runtime data"
        )


def check_init_data(quote: VerifiedQuote, expected_init_data: bytes | None) -> None:
    """Step 5: PCR 8 = SHA-256(32 zero bytes || init-data digest)."""
    if expected_init_data is None:
        return
    if len(expected_init_data) != 32:
        raise EvidenceError(
            f"the init-data digest is {len(expected_init_data)} bytes; a TPM binds a 32-byte "
            f"(SHA-256) digest in PCR {INIT_DATA_PCR}"
        )
    pcr = quote.pcrs.get(INIT_DATA_PCR)
    if pcr is None:
        raise EvidenceError(f"the TPM quote does not cover PCR {INIT_DATA_PCR}, the init-data PCR")
    if pcr != init_data_pcr_value(expected_init_data):
        raise EvidenceError(f"TPM PCR {INIT_DATA_PCR} does not match the init-data digest")


def check_event_log(quote: VerifiedQuote, unverified_log: bytes) -> tuple[Event, ...]:
    """Step 6: the log's SHA-256 replay equals every quoted firmware PCR it touches; returns
    the events of those PCRs (the others are bound to nothing and left out)."""
    log = parse_event_log(unverified_log)
    replayed = replay_pcrs(log.events, "SHA-256")
    for index in FIRMWARE_PCRS:
        if index not in replayed:
            continue
        quoted = quote.pcrs.get(index)
        if quoted is None:
            raise EvidenceError(f"the event log extends PCR {index}, which the quote omits")
        if replayed[index] != quoted:
            raise EvidenceError(
                f"the event log does not replay to PCR {index}: replayed "
                f"{replayed[index].hex()}, the quote has {quoted.hex()}"
            )
    return tuple(e for e in log.events if e.mr_index in FIRMWARE_PCRS)


def tpm_claims(
    evidence: TpmEvidence, quote: VerifiedQuote, events: tuple[Event, ...] | None
) -> dict[str, JsonValue]:
    claims: dict[str, JsonValue] = {}
    if INIT_DATA_PCR in quote.pcrs:
        claims["init_data"] = quote.pcrs[INIT_DATA_PCR].hex()
    claims["report_data"] = quote.attest.extra_data.hex()
    claims["ak_public"] = evidence.ak_public
    for index, value in sorted(quote.pcrs.items()):
        claims[f"pcr{index:02}"] = value.hex()
    if events is not None:
        claims["uefi_event_logs"] = uefi_event_logs(events)
    return claims


class TpmVerifier(Verifier):
    tee = TEE
    # the trusted-AK directory is re-read when it changes, and an event log may be large
    may_block = True

    def __init__(self, trusted: TrustedAks) -> None:
        self._trusted = trusted

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        evidence = parse_evidence(unverified_evidence)
        quote = verify_quote(evidence, self._trusted)
        check_report_data(quote, expected_report_data)
        check_init_data(quote, expected_init_data)
        events = None
        if evidence.event_log is not None:
            events = check_event_log(quote, evidence.event_log)
        return [TeeClaims(TEE, "cpu", tpm_claims(evidence, quote, events))]

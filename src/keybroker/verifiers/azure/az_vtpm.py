"""What the Azure vTPM verifiers (``az-snp-vtpm``, ``az-tdx-vtpm``) share: the evidence
encodings, the vTPM quote checks, the init-data binding and the TPM claims.

Evidence versions, as upstream's attesters send them (unknown members are ignored, as serde
does):

- version 0 (no ``version`` member): every byte string a JSON list of numbers; the TPM quote is
  ``{signature, message, pcrs: [[32 numbers], …]}``;
- versions 1 and 2: ``{"version": n, "tpm_quote": {signature, message: hex, pcrs: [hex, …]},
  "hcl_report": base64url, …}``. Version 2 adds one promise: the HCL runtime data's
  ``user-data`` starts with the session's runtime-data digest, so it is checked.

Any other ``version`` is refused. The vTPM quote must be signed by the attestation key that the
HCL report's runtime data carries (trusted only once the caller has bound that runtime data to
a verified hardware report), its ``extraData`` must equal the session's runtime-data digest
exactly, and its SHA-256 PCR values must hash to its PCR digest.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.azure.az_hcl import HclReport, check_user_data
from keybroker.verifiers.tpm.quote import (
    TPM_ALG_SHA256,
    TpmsAttest,
    TpmSignature,
    init_data_pcr_value,
    parse_attest,
    pcr_values,
    verify_signature,
)

USER_DATA_VERSION = 2  # from this version on, the HCL user-data carries the report data
INIT_DATA_PCR = 8
PCR_COUNT = 24
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@dataclass(frozen=True)
class VtpmQuote:
    """The vTPM quote as the evidence carries it (unverified): the bare RSASSA signature, the
    marshalled ``TPMS_ATTEST`` and the SHA-256 PCR values in selection order."""

    signature: bytes
    message: bytes
    pcrs: tuple[bytes, ...]


@dataclass(frozen=True)
class VerifiedVtpmQuote:
    attest: TpmsAttest
    pcrs: dict[int, bytes]  # SHA-256 bank, by PCR index


def evidence_object(unverified: JsonValue, tee: Tee) -> tuple[dict[str, JsonValue], int]:
    """The evidence object and its version."""
    if not isinstance(unverified, dict):
        raise EvidenceError(f"{tee.value} evidence must be a JSON object")
    if "version" not in unverified:
        return unverified, 0
    version = unverified["version"]
    if type(version) is not int or version not in (1, 2):
        raise EvidenceError(
            f"{tee.value} evidence version {version!r} is not supported (1, 2, or no "
            "`version` for version 0)"
        )
    return unverified, version


def member(unverified: dict[str, JsonValue], name: str, tee: Tee) -> JsonValue:
    if name not in unverified:
        raise EvidenceError(f"{tee.value} evidence has no `{name}`")
    return unverified[name]


def byte_list(value: JsonValue, what: str) -> bytes:
    """Version 0's byte strings: a JSON list of numbers 0..255."""
    if not isinstance(value, list) or not all(type(b) is int and 0 <= b <= 0xFF for b in value):
        raise EvidenceError(f"{what} is not a list of bytes")
    return bytes(value)


def hex_bytes(value: JsonValue, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise EvidenceError(f"{what} is not a hex string")
    return bytes.fromhex(value)


def b64url_bytes(value: JsonValue, what: str) -> bytes:
    """URL-safe base64, padded or not (upstream's encoder pads; its decoder takes either)."""
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise EvidenceError(f"{what} is not URL-safe base64")
    bare = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except binascii.Error:
        raise EvidenceError(f"{what} is not URL-safe base64") from None


def parse_vtpm_quote(unverified: JsonValue, version: int, tee: Tee) -> VtpmQuote:
    if not isinstance(unverified, dict):
        raise EvidenceError(f"the {tee.value} TPM quote must be an object")
    decode = byte_list if version == 0 else hex_bytes
    pcrs = member(unverified, "pcrs", tee)
    if not isinstance(pcrs, list) or len(pcrs) > PCR_COUNT:
        raise EvidenceError(f"the {tee.value} TPM quote's `pcrs` is not a list of PCR values")
    return VtpmQuote(
        signature=decode(member(unverified, "signature", tee), "the TPM quote signature"),
        message=decode(member(unverified, "message", tee), "the TPM quote message"),
        pcrs=tuple(decode(pcr, f"TPM PCR {i}") for i, pcr in enumerate(pcrs)),
    )


def required_report_data(expected_report_data: bytes | None, tee: Tee) -> bytes:
    if expected_report_data is None:
        # the vTPM quote's nonce is all that ties the evidence to a session: nothing to check
        # it against means a replayed quote would pass (upstream refuses too)
        raise EvidenceError(f"{tee.value} evidence cannot be checked without runtime data")
    return expected_report_data


def verify_vtpm_quote(
    quote: VtpmQuote, hcl: HclReport, expected_report_data: bytes
) -> VerifiedVtpmQuote:
    """The quote checked against the HCL report's attestation key and the session; the caller
    must still bind the HCL runtime data to a verified hardware report."""
    attest = parse_attest(quote.message)
    verify_signature(attest, TpmSignature.rsassa(quote.signature), hcl.runtime_data.attestation_key)
    if attest.extra_data != expected_report_data:
        raise EvidenceError(
            "the TPM quote's nonce (extraData) does not match the digest of the session's "
            "runtime data"
        )
    if any(bank.hash_alg != TPM_ALG_SHA256 for bank in attest.pcr_select):
        raise EvidenceError("an Azure vTPM quote covers the SHA-256 PCR bank only")
    values = pcr_values(attest, quote.pcrs, TPM_ALG_SHA256)
    return VerifiedVtpmQuote(attest, {index: value for (_, index), value in values.items()})


def check_versioned_user_data(hcl: HclReport, version: int, expected_report_data: bytes) -> None:
    """From evidence version 2 on, the HCL user-data must carry the session's digest."""
    if version >= USER_DATA_VERSION:
        check_user_data(hcl, expected_report_data)


def check_init_data(quote: VerifiedVtpmQuote, expected_init_data: bytes | None) -> None:
    if expected_init_data is None:
        return
    if len(expected_init_data) != 32:
        # the attester extends a SHA-256 PCR with the digest itself, so only 32 bytes can match
        raise EvidenceError(
            f"the init-data digest is {len(expected_init_data)} bytes; an Azure vTPM binds a "
            "32-byte (SHA-256) digest in PCR 8"
        )
    pcr = quote.pcrs.get(INIT_DATA_PCR)
    if pcr is None:
        raise EvidenceError(f"the TPM quote does not cover PCR {INIT_DATA_PCR}, the init-data PCR")
    if pcr != init_data_pcr_value(expected_init_data):
        raise EvidenceError(f"TPM PCR {INIT_DATA_PCR} does not match the init-data digest")


def tpm_claims(quote: VerifiedVtpmQuote) -> dict[str, JsonValue]:
    """Upstream's vTPM claims: ``tpm.pcrNN`` (hex), ``init_data`` (PCR 8, hex) and
    ``report_data`` (the quote's nonce, hex); they replace the hardware report's own."""
    claims: dict[str, JsonValue] = {
        "tpm": {f"pcr{index:02}": value.hex() for index, value in sorted(quote.pcrs.items())},
        "report_data": quote.attest.extra_data.hex(),
    }
    if INIT_DATA_PCR in quote.pcrs:
        claims["init_data"] = quote.pcrs[INIT_DATA_PCR].hex()
    return claims

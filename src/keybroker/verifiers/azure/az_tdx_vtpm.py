"""The ``az-tdx-vtpm`` verifier: an Azure TDX confidential VM, attested through its vTPM.

Evidence (:mod:`keybroker.verifiers.azure.az_vtpm` describes the versions): version 0 ``{tpm_quote,
hcl_report, td_quote}`` as byte lists; versions 1 and 2 ``{version, tpm_quote, hcl_report,
td_quote}`` with the two reports in URL-safe base64. The chain of trust, checked in this order
(each step fails closed with :class:`EvidenceError`):

1. the vTPM quote is signed by the attestation key in the HCL report's runtime data, its nonce
   is the session's runtime-data digest and its PCR values hash to its digest;
2. the TD quote is an Intel DCAP TDX quote that verifies to the pinned Intel root at the
   injected time (:mod:`keybroker.verifiers.intel.dcap`);
3. SHA-256 of the HCL runtime data is the first half of the TD quote's REPORT_DATA, so the
   attestation key of step 1 is the TD's (the TDREPORT inside the HCL report is not
   signed for a remote party and is not relied on);
4. version 2: the HCL user-data starts with the session's runtime-data digest;
5. the init-data digest, when given, is what PCR 8 holds;
6. the injected :class:`TcbAppraiser` judges the platform's TCB from collateral (last: it may
   wait on a fetch).

Claims are upstream's: the TDX quote claims, then the vTPM's ``tpm``, ``report_data`` and
``init_data`` (which replace the quote's), then the collateral claims.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.azure.az_hcl import (
    HclReportType,
    check_runtime_data_binding,
    parse_hcl_report,
)
from keybroker.verifiers.azure.az_vtpm import (
    VtpmQuote,
    b64url_bytes,
    byte_list,
    check_init_data,
    check_versioned_user_data,
    evidence_object,
    member,
    parse_vtpm_quote,
    required_report_data,
    tpm_claims,
    verify_vtpm_quote,
)
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.intel.dcap import TdReportBody, parse_quote, verify_quote
from keybroker.verifiers.intel.tdx_claims import tdx_claims
from keybroker.verifiers.intel.verifier import TcbAppraiser

TEE = Tee.AZ_TDX_VTPM


@dataclass(frozen=True)
class AzTdxEvidence:
    version: int
    tpm_quote: VtpmQuote
    hcl_report: bytes
    td_quote: bytes


def parse_evidence(unverified: JsonValue) -> AzTdxEvidence:
    document, version = evidence_object(unverified, TEE)
    decode = byte_list if version == 0 else b64url_bytes
    return AzTdxEvidence(
        version=version,
        tpm_quote=parse_vtpm_quote(member(document, "tpm_quote", TEE), version, TEE),
        hcl_report=decode(member(document, "hcl_report", TEE), "the HCL report"),
        td_quote=decode(member(document, "td_quote", TEE), "the TD quote"),
    )


class AzTdxVtpmVerifier(Verifier):
    tee = TEE
    may_block = True

    def __init__(self, appraiser: TcbAppraiser, *, clock: Callable[[], float] = time.time) -> None:
        self._appraiser = appraiser
        self._clock = clock

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        report_data = required_report_data(expected_report_data, TEE)
        evidence = parse_evidence(unverified_evidence)
        hcl = parse_hcl_report(evidence.hcl_report, HclReportType.TDX)
        vtpm = verify_vtpm_quote(evidence.tpm_quote, hcl, report_data)
        quote = parse_quote(evidence.td_quote)
        if not isinstance(quote.body, TdReportBody):
            raise EvidenceError("az-tdx-vtpm evidence carries an SGX quote, not a TD quote")
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        pck = verify_quote(quote, now)
        check_runtime_data_binding(hcl, quote.body.report_data, "TD quote")
        check_versioned_user_data(hcl, evidence.version, report_data)
        check_init_data(vtpm, expected_init_data)
        claims = tdx_claims(quote, pck)
        claims.update(tpm_claims(vtpm))
        claims.update(self._appraiser.appraise(quote, pck, now))
        return [TeeClaims(TEE, "cpu", claims)]

"""The ``az-snp-vtpm`` verifier: an Azure SEV-SNP confidential VM, attested through its vTPM.

Evidence (:mod:`keybroker.verifiers.azure.az_vtpm` describes the versions): version 0 ``{quote,
report, vcek}`` (byte lists; ``vcek`` in PEM); versions 1 and 2 ``{version, tpm_quote,
hcl_report, vcek}`` (the HCL report and the DER VCEK in URL-safe base64). The chain of trust,
checked in this order (each step fails closed with :class:`EvidenceError`):

1. the vTPM quote is signed by the attestation key in the HCL report's runtime data, its nonce
   is the session's runtime-data digest and its PCR values hash to its digest;
2. SHA-256 of the HCL runtime data is the first half of the SNP report's REPORT_DATA;
3. version 2: the HCL user-data starts with the session's runtime-data digest;
4. the SNP report was requested at VMPL 0 (by the paravisor, not by the guest OS);
5. the init-data digest, when given, is what PCR 8 holds;
6. the injected :class:`SnpAppraiser` shows the SNP report was signed by the evidence's VCEK,
   chained to the pinned AMD root for the report's chip and TCB (last: it may fetch a CRL).

Only after step 6 do steps 1 to 3 mean anything: the signature is what makes the runtime data
(and so the attestation key) the CPU's word. Claims are upstream's (:func:`az_snp_claims`).
"""

from __future__ import annotations

import base64
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.amd.snp import SnpAppraiser, SnpReport, parse_report
from keybroker.verifiers.amd.snp_certs import load_certificates
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

TEE = Tee.AZ_SNP_VTPM
MAX_VCEK_CERTIFICATES = 4  # a VCEK, perhaps followed by its ASK and ARK

# GUEST_POLICY and PLATFORM_INFO bits (SEV-SNP firmware ABI), as upstream names them
_POLICY_SMT_ALLOWED = 16
_POLICY_MIGRATE_MA = 18
_POLICY_DEBUG_ALLOWED = 19
_POLICY_SINGLE_SOCKET = 20
_PLATFORM_SMT_ENABLED = 0
_PLATFORM_TSME_ENABLED = 1


@dataclass(frozen=True)
class AzSnpEvidence:
    version: int
    tpm_quote: VtpmQuote
    hcl_report: bytes
    vcek: tuple[x509.Certificate, ...]  # unverified


def _vcek(unverified: JsonValue, version: int) -> tuple[x509.Certificate, ...]:
    if version == 0:
        if not isinstance(unverified, str) or not unverified.lstrip().startswith("-----BEGIN"):
            raise EvidenceError("az-snp-vtpm evidence `vcek` must be a PEM string")
        data = unverified.encode()
    else:
        data = b64url_bytes(unverified, "the az-snp-vtpm VCEK")
    try:
        certs = load_certificates(data)
    except ValueError as e:
        raise EvidenceError(f"the az-snp-vtpm evidence's VCEK does not parse: {e}") from None
    if len(certs) > MAX_VCEK_CERTIFICATES:
        raise EvidenceError(f"az-snp-vtpm evidence `vcek` holds {len(certs)} certificates")
    return tuple(certs)


def parse_evidence(unverified: JsonValue) -> AzSnpEvidence:
    document, version = evidence_object(unverified, TEE)
    if version == 0:
        quote, report, decode = "quote", "report", byte_list
    else:
        quote, report, decode = "tpm_quote", "hcl_report", b64url_bytes
    return AzSnpEvidence(
        version=version,
        tpm_quote=parse_vtpm_quote(member(document, quote, TEE), version, TEE),
        hcl_report=decode(member(document, report, TEE), "the HCL report"),
        vcek=_vcek(member(document, "vcek", TEE), version),
    )


def _flag(value: int, bit: int) -> str:
    return "true" if value >> bit & 1 else "false"


def az_snp_claims(report: SnpReport) -> dict[str, JsonValue]:
    """Upstream's Azure SNP claims. They differ from the ``snp`` verifier's: every value is a
    string (numbers in decimal, flags ``"true"``/``"false"``) and byte strings are standard
    base64. ``report_data`` and ``init_data`` are replaced by the vTPM's (see
    :func:`keybroker.verifiers.azure.az_vtpm.tpm_claims`)."""
    policy, platform, tcb = report.policy, report.platform_info, report.reported_tcb
    return {
        "policy_abi_major": str(policy >> 8 & 0xFF),
        "policy_abi_minor": str(policy & 0xFF),
        "policy_smt_allowed": _flag(policy, _POLICY_SMT_ALLOWED),
        "policy_migrate_ma": _flag(policy, _POLICY_MIGRATE_MA),
        "policy_debug_allowed": _flag(policy, _POLICY_DEBUG_ALLOWED),
        "policy_single_socket": _flag(policy, _POLICY_SINGLE_SOCKET),
        "reported_tcb_bootloader": str(tcb.bootloader),
        "reported_tcb_tee": str(tcb.tee),
        "reported_tcb_snp": str(tcb.snp),
        "reported_tcb_microcode": str(tcb.microcode),
        "platform_tsme_enabled": _flag(platform, _PLATFORM_TSME_ENABLED),
        "platform_smt_enabled": _flag(platform, _PLATFORM_SMT_ENABLED),
        "measurement": base64.b64encode(report.measurement).decode(),
        "report_data": base64.b64encode(report.report_data).decode(),
        "init_data": base64.b64encode(report.host_data).decode(),
    }


class AzSnpVtpmVerifier(Verifier):
    tee = TEE
    may_block = True

    def __init__(self, appraiser: SnpAppraiser, *, clock: Callable[[], float] = time.time) -> None:
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
        hcl = parse_hcl_report(evidence.hcl_report, HclReportType.SNP)
        vtpm = verify_vtpm_quote(evidence.tpm_quote, hcl, report_data)
        report = parse_report(hcl.hw_report)
        check_runtime_data_binding(hcl, report.report_data, "SNP report")
        check_versioned_user_data(hcl, evidence.version, report_data)
        if report.vmpl != 0:
            raise EvidenceError(f"the SNP report was requested at VMPL {report.vmpl}, not 0")
        check_init_data(vtpm, expected_init_data)
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        self._appraiser.verify(report, evidence.vcek, now)
        claims = az_snp_claims(report)
        claims.update(tpm_claims(vtpm))
        return [TeeClaims(TEE, "cpu", claims)]

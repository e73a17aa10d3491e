"""The AMD SEV-SNP verifier: report signature, AMD chain, revocation, TCB, bindings, claims.

Evidence, as upstream's attester sends it: ``{"attestation_report": {…}, "cert_chain": [{
"cert_type": "VCEK", "data": [bytes…]}, …] | null}`` (the ``sev`` crate's serde form; the
report is re-encoded to its binary layout by :mod:`keybroker.verifiers.amd.snp_report`).

What :class:`SnpAppraiser` proves about an ``unverified`` report, failing closed with
:class:`EvidenceError` at the first doubt (or :class:`ServiceUnavailableError` when collateral
cannot be had):

1. it is signed with ECDSA P-384 / SHA-384 (``signature_algo`` 1) by a VCEK or a VLEK (KEY_INFO
   says which; nothing else is accepted);
2. the processor generation is the one the report names (CPUID, version 3+; a version 2
   report, which names none, must carry its key, whose issuer then names it);
3. the endorsement key is the one of that kind carried in the evidence, or, for a VCEK, the one
   AMD's KDS files under the report's CHIP_ID and REPORTED_TCB (fetched, cached);
4. it chains VCEK → ASK (or VLEK → ASVK) → the ARK **pinned in this package**; an ARK from the
   evidence is refused unless its key is the pinned one, an ASK or ASVK from the evidence is
   used only if the pinned ARK signed it; RSA-PSS signatures and dates checked at the injected
   time;
5. the key was issued for this chip and TCB (hwID = CHIP_ID for a VCEK; every SPL extension
   equals REPORTED_TCB, FMC included on Turin);
6. the intermediate is not revoked by the ARK's current CRL (KDS ``/vcek/v1/<Product>/crl``,
   signed by the pinned ARK, before its nextUpdate);
7. the key signed bytes 0..0x2A0 of the report.

:class:`SnpVerifier` adds upstream's checks for the ``snp`` TEE: VMPL 0, REPORT_DATA = the
session's runtime-data digest padded with zeros to 64 bytes, HOST_DATA = the init-data digest
padded to 32, and returns upstream's claims (:func:`snp_claims`). What it does not do: judge
whether the TCB or measurement is acceptable; that is the attestation policy's work.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from cryptography import x509

from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.amd.snp_certs import (
    VCEK_NAME,
    VLEK_NAME,
    AmdRoots,
    KeyKind,
    check_matches_report,
    check_not_revoked,
    common_name,
    endorsement_key,
    key_kind,
    load_certificates,
    load_crl,
    pinned_roots,
    product_of_issuer,
    same_key,
    verify_intermediate,
    verify_key_chain,
    verify_report_signature,
)
from keybroker.verifiers.amd.snp_fetcher import SnpCollateralFetcher, VcekRequest
from keybroker.verifiers.amd.snp_report import (
    ECDSA_P384_SHA384,
    Product,
    SnpReport,
    parse_report,
    report_from_json,
    snp_claims,
)
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.intel.verifier import padded

logger = logging.getLogger(__name__)

MAX_CERT_TABLE_ENTRIES = 16
MAX_CERT_BYTES = 16 * 1024
_CERT_TYPES = ("ARK", "ASK", "VCEK", "VLEK")  # the certificate entries; CRL, Empty, OTHER skipped


class SnpAppraiser:
    """Shows that an SNP report was signed by a genuine, unrevoked AMD endorsement key issued
    for the report's chip and TCB (steps 1 to 7 of the module docstring)."""

    def __init__(
        self,
        fetcher: SnpCollateralFetcher,
        *,
        roots: Mapping[Product, AmdRoots] | None = None,
        insecure_skip_crl: bool = False,
    ) -> None:
        """``roots``: the trust anchors per product; the pinned AMD roots unless a test gives
        its own. ``insecure_skip_crl``: do not fetch or check the ARK's CRL (a revoked ASK
        would go unnoticed): for air-gapped tests only, logged on every use."""
        self._fetcher = fetcher
        self._roots = roots if roots is not None else pinned_roots()
        self._insecure_skip_crl = insecure_skip_crl

    def verify(
        self, report: SnpReport, supplied: Sequence[x509.Certificate], now: datetime.datetime
    ) -> None:
        """Raise unless ``report`` verifies; ``supplied``: the certificates that came with the
        evidence (any of ARK, ASK, ASVK, VCEK, VLEK; unverified)."""
        if report.signature_algo != ECDSA_P384_SHA384:
            raise EvidenceError(
                f"the SNP report's signature algorithm is {report.signature_algo}, expected "
                f"{ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)"
            )
        kind = key_kind(report)
        unverified_key = _supplied_key(supplied, kind)
        product = _product(report, unverified_key)
        roots = self._roots.get(product)
        if roots is None:
            raise EvidenceError(f"no AMD root is trusted for {product} processors")
        for cert in supplied:
            # the root is never taken from the evidence: a copy of it is only tolerated
            if common_name(cert).startswith("ARK-") and not same_key(cert, roots.ark):
                raise EvidenceError(
                    f"the evidence carries {cert.subject.rfc4514_string()}, which is not AMD's "
                    f"pinned {product} ARK"
                )
        if unverified_key is None:
            unverified_key = self._fetch_vcek(report, product, kind)
        issuer_product = product_of_issuer(unverified_key)
        if issuer_product is not product:
            raise EvidenceError(
                f"the {kind} is issued for {issuer_product} processors, the report is from a "
                f"{product}"
            )
        key = endorsement_key(unverified_key, turin=product is Product.TURIN)
        if key.kind is not kind:
            raise EvidenceError(
                f"the report is signed by a {kind}, the evidence holds a {key.kind}"
            )
        intermediate = self._chain(unverified_key, supplied, roots, kind, now)
        check_matches_report(key, report)
        self._check_revocation(roots, intermediate, now)
        verify_report_signature(report, key)

    def _fetch_vcek(self, report: SnpReport, product: Product, kind: KeyKind) -> x509.Certificate:
        if kind is KeyKind.VLEK:
            raise EvidenceError(
                "a VLEK-signed report must carry its VLEK: KDS has no VLEKs by chip"
            )
        data = self._fetcher.vcek(VcekRequest(product, report.hwid(), report.reported_tcb))
        try:
            (vcek,) = load_certificates(data)
        except ValueError as e:
            raise ServiceUnavailableError(f"AMD KDS served a VCEK that does not parse: {e}") from e
        return vcek

    def _chain(
        self,
        key: x509.Certificate,
        supplied: Sequence[x509.Certificate],
        roots: AmdRoots,
        kind: KeyKind,
        now: datetime.datetime,
    ) -> x509.Certificate:
        """The intermediate (ASK or ASVK) that issued ``key``, verified to the pinned ARK."""
        pinned = roots.intermediate(kind)
        candidates = [
            verify_intermediate(cert, roots, kind, now)
            for cert in supplied
            if cert.subject == pinned.subject and not same_key(cert, pinned)
        ]
        failures: list[EvidenceError] = []
        for candidate in [*candidates, pinned]:
            try:
                verify_key_chain(key, candidate, roots, now)
                return candidate
            except EvidenceError as e:
                failures.append(e)
        failure = failures[0]
        # AMD may have issued a new ASK since this package was built: try the one KDS serves
        try:
            served = load_certificates(self._fetcher.cert_chain(roots.product, kind))
        except (ServiceUnavailableError, ValueError):
            raise failure from None
        for cert in served:
            if cert.subject == pinned.subject and not same_key(cert, pinned):
                verify_key_chain(key, verify_intermediate(cert, roots, kind, now), roots, now)
                return cert
        raise failure

    def _check_revocation(
        self, roots: AmdRoots, intermediate: x509.Certificate, now: datetime.datetime
    ) -> None:
        if self._insecure_skip_crl:
            logger.warning(
                "INSECURE: the AMD %s CRL is not checked (insecure_skip_crl)", roots.product
            )
            return
        crl = load_crl(self._fetcher.crl(roots.product))
        check_not_revoked(crl, roots, intermediate, now)


def _supplied_key(supplied: Sequence[x509.Certificate], kind: KeyKind) -> x509.Certificate | None:
    """The first carried endorsement key of the kind that signed the report."""
    wanted = VCEK_NAME if kind is KeyKind.VCEK else VLEK_NAME
    keys = [cert for cert in supplied if common_name(cert) in (VCEK_NAME, VLEK_NAME)]
    for cert in keys:
        if common_name(cert) == wanted:
            return cert
    if keys:
        raise EvidenceError(
            f"the report is signed by a {kind}, the evidence carries only "
            f"{', '.join(sorted({common_name(cert) for cert in keys}))}"
        )
    return None


def _product(report: SnpReport, key: x509.Certificate | None) -> Product:
    product = report.product
    if product is None:  # version 2: only the key's issuer names the generation
        if key is None:
            raise EvidenceError(
                "a version 2 SNP report does not name its processor: the evidence must carry "
                "the VCEK or VLEK"
            )
        product = product_of_issuer(key)
    if (product is Product.TURIN) != report.turin_layout:
        raise EvidenceError(f"the report's TCB layout is not a {product} processor's")
    return product


# --- the snp TEE ------------------------------------------------------------------------------


def _cert_table(unverified: JsonValue) -> list[x509.Certificate]:
    """The certificates of upstream's ``cert_chain`` (``CertTableEntry`` list)."""
    if unverified is None:
        return []
    if not isinstance(unverified, list) or len(unverified) > MAX_CERT_TABLE_ENTRIES:
        raise EvidenceError(
            f"snp evidence `cert_chain` must be null or a list of at most "
            f"{MAX_CERT_TABLE_ENTRIES} entries"
        )
    certs = []
    for entry in unverified:
        if not isinstance(entry, dict) or "cert_type" not in entry:
            raise EvidenceError("an snp `cert_chain` entry is not {cert_type, data}")
        if entry["cert_type"] not in _CERT_TYPES:
            continue  # a CRL, an empty or a vendor-specific (OTHER) entry: nothing we trust
        data = entry.get("data")
        try:
            if not isinstance(data, list) or len(data) > MAX_CERT_BYTES:
                raise TypeError("not a list of at most 16 KiB")
            der = bytes(data)  # ValueError or TypeError unless every item is 0..255
        except (TypeError, ValueError):
            raise EvidenceError(
                f"the snp `cert_chain` {entry['cert_type']} data is not bytes"
            ) from None
        try:
            certs.extend(load_certificates(der))
        except ValueError as e:
            raise EvidenceError(
                f"the snp `cert_chain` {entry['cert_type']} is no certificate: {e}"
            ) from None
    return certs


def parse_evidence(unverified: JsonValue) -> tuple[SnpReport, list[x509.Certificate]]:
    """The report and the carried certificates of upstream's SNP evidence JSON."""
    if not isinstance(unverified, dict) or not isinstance(
        unverified.get("attestation_report"), dict
    ):
        raise EvidenceError("snp evidence must be an object with an `attestation_report` object")
    return report_from_json(unverified["attestation_report"]), _cert_table(
        unverified.get("cert_chain")
    )


class SnpVerifier(Verifier):
    tee = Tee.SNP
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
        report, supplied = parse_evidence(unverified_evidence)
        # cheap checks first: a report bound to another session costs no KDS request
        if report.vmpl != 0:
            raise EvidenceError(f"the SNP report was requested at VMPL {report.vmpl}, not 0")
        if expected_report_data is not None and report.report_data != padded(
            expected_report_data, 64, "the runtime-data digest"
        ):
            raise EvidenceError(
                "the SNP report's REPORT_DATA does not match the digest of the session's "
                "runtime data"
            )
        if expected_init_data is not None and report.host_data != padded(
            expected_init_data, 32, "the init-data digest"
        ):
            raise EvidenceError("the SNP report's HOST_DATA does not match the init-data digest")
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        self._appraiser.verify(report, supplied, now)
        return [TeeClaims(Tee.SNP, "cpu", snp_claims(report))]


__all__ = [
    "SnpAppraiser",
    "SnpReport",
    "SnpVerifier",
    "parse_evidence",
    "parse_report",
    "report_from_json",
    "snp_claims",
]

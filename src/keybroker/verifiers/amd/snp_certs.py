"""AMD's SEV-SNP certificates: the pinned roots, the endorsement keys' extensions, and the
checks that tie a report to them. Pure: certificates and a time in, facts or
:class:`EvidenceError` out.

AMD's hierarchy, per processor generation (product)::

    ARK-<Product>          AMD Root Key, self-signed, RSA-4096, RSA-PSS SHA-384   (pinned here)
    ├── SEV-<Product>      ASK, the AMD SEV Key: issues VCEKs                      (pinned here)
    │   └── SEV-VCEK       one per chip and TCB, ECDSA P-384: signs reports
    └── SEV-VLEK-<Product> ASVK, the AMD SEV VLEK Key: issues VLEKs                (pinned here)
        └── SEV-VLEK       one per cloud provider and TCB, ECDSA P-384: signs reports

The three PEM files under ``data/`` (ASK, ARK, ASVK each, as AMD's KDS publishes them) are the
only roots: an ARK that evidence carries is accepted only when its key is the pinned one, and
an ASK or ASVK from evidence only when the pinned ARK signed it. The ARK's CRL (KDS
``/vcek/v1/<Product>/crl``) revokes ASKs and ASVKs; AMD publishes no CRL for VCEKs or VLEKs,
which carry serial number 0 and are withdrawn by TCB instead.

A VCEK or VLEK names the TCB it was issued for in X.509 extensions (AMD 57230, "VCEK
Certificate Extensions"): blSPL, teeSPL, snpSPL, ucodeSPL (and fmcSPL on Turin) must equal the
report's REPORTED_TCB, and a VCEK's hwID must equal the report's CHIP_ID (Turin: its first 8
bytes). hwID was first encoded as the raw 64 bytes and is now a DER OCTET STRING; both are read.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from keybroker.errors import EvidenceError
from keybroker.protocol.x509chain import build_path
from keybroker.verifiers import der
from keybroker.verifiers.amd.snp_report import (
    COMPONENT_SIZE,
    Product,
    SnpReport,
    TcbVersion,
)

_AMD = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_AMD}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD}.3.9")
OID_HWID = x509.ObjectIdentifier(f"{_AMD}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD}.5")

VCEK_NAME = "SEV-VCEK"
VLEK_NAME = "SEV-VLEK"


class KeyKind(StrEnum):
    """Which endorsement key signed a report (the report's KEY_INFO.SIGNING_KEY)."""

    VCEK = "VCEK"
    VLEK = "VLEK"


def key_kind(report: SnpReport) -> KeyKind:
    if report.signing_key == 0:
        return KeyKind.VCEK
    if report.signing_key == 1:
        return KeyKind.VLEK
    raise EvidenceError(
        f"the SNP report's SIGNING_KEY is {report.signing_key}: only 0 (VCEK) and 1 (VLEK) "
        "sign verifiable reports"
    )


@dataclass(frozen=True)
class AmdRoots:
    """One product's certificate authorities: the ARK and the two keys it certifies."""

    product: Product
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate

    def intermediate(self, kind: KeyKind) -> x509.Certificate:
        return self.ask if kind is KeyKind.VCEK else self.asvk


def common_name(cert: x509.Certificate | x509.Name) -> str:
    name = cert.subject if isinstance(cert, x509.Certificate) else cert
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if len(values) == 1 else ""


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """One DER certificate, or every certificate of a PEM text.

    AMD issues every VCEK and VLEK with serial number 0, which RFC 5280 forbids and
    ``cryptography`` warns about on every load; the warning is silenced here only, where the
    certificates are known to be AMD's (the chain check decides whether they are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]


def roots_from_pem(product: Product, pem: bytes) -> AmdRoots:
    """The ASK, ARK and ASVK of a KDS-style bundle, checked to be the named product's and
    signed by the bundle's ARK."""
    certs = x509.load_pem_x509_certificates(pem)
    if len(certs) != 3:
        raise ValueError(f"the {product} AMD bundle holds {len(certs)} certificates, not 3")
    ask, ark, asvk = certs
    expected = (f"SEV-{product}", f"ARK-{product}", f"SEV-VLEK-{product}")
    if (common_name(ask), common_name(ark), common_name(asvk)) != expected:
        raise ValueError(f"the {product} AMD bundle is not ASK, ARK, ASVK")
    for cert in (ark, ask, asvk):
        cert.verify_directly_issued_by(ark)
    return AmdRoots(product, ark, ask, asvk)


@cache
def pinned_roots() -> Mapping[Product, AmdRoots]:
    """AMD's roots for Milan, Genoa and Turin, shipped with Keybroker (public certificates, as
    KDS serves them at ``/vcek/v1/<Product>/cert_chain`` plus the ASVK)."""
    folder = resources.files("keybroker.verifiers") / "data"
    return {
        product: roots_from_pem(
            product, (folder / f"amd-{product.value.lower()}-ask-ark-asvk.pem").read_bytes()
        )
        for product in Product
    }


# --- the endorsement key's extensions ------------------------------------------------------


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"the endorsement key's extension {oid.dotted_string} is malformed")
    return value.value


def _spl(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> int:
    raw = _extension(cert, oid)
    if raw is None:
        raise EvidenceError(f"the endorsement key certificate has no {name} extension")
    content = der.single(raw, der.INTEGER, f"the {name} extension")
    value = int.from_bytes(content, "big", signed=True) if content else -1
    if not 0 <= value <= 0xFF:
        raise EvidenceError(f"the {name} extension holds {value}, not a security patch level")
    return value


def _hwid(cert: x509.Certificate, sizes: tuple[int, ...]) -> bytes | None:
    raw = _extension(cert, OID_HWID)
    if raw is None:
        return None
    if len(raw) in sizes:  # the first KDS certificates held the bytes themselves
        return raw
    value = der.single(raw, der.OCTET_STRING, "the hwID extension")
    if len(value) not in sizes:
        raise EvidenceError(f"the hwID extension holds {len(value)} bytes")
    return value


@dataclass(frozen=True)
class EndorsementKey:
    """What a VCEK or VLEK certificate says about the chip and TCB whose reports it signs."""

    cert: x509.Certificate
    kind: KeyKind
    tcb: TcbVersion
    hwid: bytes | None  # VCEKs only


def endorsement_key(cert: x509.Certificate, turin: bool) -> EndorsementKey:
    names = {VCEK_NAME: KeyKind.VCEK, VLEK_NAME: KeyKind.VLEK}
    kind = names.get(common_name(cert))
    if kind is None:
        raise EvidenceError(
            f"{cert.subject.rfc4514_string()} is neither a {VCEK_NAME} nor a {VLEK_NAME}"
        )
    tcb = TcbVersion(
        bootloader=_spl(cert, OID_BL_SPL, "blSPL"),
        tee=_spl(cert, OID_TEE_SPL, "teeSPL"),
        snp=_spl(cert, OID_SNP_SPL, "snpSPL"),
        microcode=_spl(cert, OID_UCODE_SPL, "ucodeSPL"),
        fmc=_spl(cert, OID_FMC_SPL, "fmcSPL") if turin else None,
    )
    hwid = _hwid(cert, (8,) if turin else (64,)) if kind is KeyKind.VCEK else None
    if kind is KeyKind.VCEK and hwid is None:
        raise EvidenceError("the VCEK certificate has no hwID extension")
    return EndorsementKey(cert, kind, tcb, hwid)


def check_matches_report(key: EndorsementKey, report: SnpReport) -> None:
    """The key was issued for this chip (VCEK hwID = CHIP_ID) and this TCB (every SPL equals
    REPORTED_TCB). Its productName extension is not compared: the chain to one product's pinned
    ARK already decides the generation, and AMD names variants (``Milan-B0``; Siena parts under
    Genoa) in ways a string match would get wrong."""
    if key.kind is KeyKind.VCEK and key.hwid != report.hwid():
        raise EvidenceError("the VCEK's hwID does not match the report's CHIP_ID")
    reported = report.reported_tcb
    for name in ("bootloader", "tee", "snp", "microcode", "fmc"):
        certified, claimed = getattr(key.tcb, name), getattr(reported, name)
        if certified != claimed:
            raise EvidenceError(
                f"the report's REPORTED_TCB {name} SVN is {claimed}, the {key.kind} certifies "
                f"{certified}"
            )


# --- signatures, chain, revocation -----------------------------------------------------------


def verify_report_signature(report: SnpReport, key: EndorsementKey) -> None:
    """ECDSA P-384 with SHA-384 over bytes 0..0x2A0, r and s little-endian."""
    public = key.cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp384r1":
        raise EvidenceError(f"the {key.kind} does not hold a P-384 key")
    r = int.from_bytes(report.signature_r[:COMPONENT_SIZE], "little")
    s = int.from_bytes(report.signature_s[:COMPONENT_SIZE], "little")
    try:
        public.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            f"the SNP report signature does not verify with its {key.kind}"
        ) from None


def same_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return a.public_key().public_bytes(der, spki) == b.public_key().public_bytes(der, spki)


def verify_intermediate(
    candidate: x509.Certificate, roots: AmdRoots, kind: KeyKind, now: datetime.datetime
) -> x509.Certificate:
    """An ASK or ASVK (from evidence or a fetch), once the pinned ARK is shown to have signed
    it and it has the name the report's key needs."""
    expected = roots.intermediate(kind).subject
    if candidate.subject != expected:
        raise EvidenceError(
            f"{candidate.subject.rfc4514_string()} is not the {roots.product} "
            f"{'ASK' if kind is KeyKind.VCEK else 'ASVK'}"
        )
    _path(candidate, [], roots, now)
    return candidate


def verify_key_chain(
    key: x509.Certificate,
    intermediate: x509.Certificate,
    roots: AmdRoots,
    now: datetime.datetime,
) -> None:
    """VCEK → ASK → pinned ARK (or VLEK → ASVK → pinned ARK), each link signed (RSA-PSS),
    issued by a CA and valid at ``now`` (``keybroker.protocol.x509chain``)."""
    path = _path(key, [intermediate], roots, now)
    if len(path) != 3 or path[1] != intermediate:
        raise EvidenceError(
            f"the AMD {roots.product} chain is broken: {key.subject.rfc4514_string()} is not "
            f"issued by {intermediate.subject.rfc4514_string()}"
        )


def _path(
    cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: AmdRoots,
    now: datetime.datetime,
) -> list[x509.Certificate]:
    what = f"the AMD {roots.product} chain"
    return build_path(cert, intermediates, [roots.ark], now=now, error=EvidenceError, what=what)


def load_crl(unverified: bytes) -> x509.CertificateRevocationList:
    try:
        if unverified.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(unverified)
        return x509.load_der_x509_crl(unverified)
    except ValueError as e:
        raise EvidenceError(f"the AMD CRL does not parse: {e}") from None


def check_not_revoked(
    crl: x509.CertificateRevocationList,
    roots: AmdRoots,
    intermediate: x509.Certificate,
    now: datetime.datetime,
) -> None:
    """The ARK's CRL is the ARK's, current at ``now``, and does not list ``intermediate``."""
    if crl.issuer != roots.ark.subject:
        raise EvidenceError(
            f"the AMD CRL is issued by {crl.issuer.rfc4514_string()}, expected "
            f"{roots.ark.subject.rfc4514_string()}"
        )
    ark_key = roots.ark.public_key()
    if not isinstance(ark_key, rsa.RSAPublicKey) or not crl.is_signature_valid(ark_key):
        raise EvidenceError(f"the AMD {roots.product} CRL signature does not verify")
    next_update = crl.next_update_utc
    if next_update is None:
        raise EvidenceError(f"the AMD {roots.product} CRL has no nextUpdate")
    # thisUpdate is not compared: a clock a little behind AMD's must not refuse a fresh CRL
    if now >= next_update:
        raise EvidenceError(
            f"the AMD {roots.product} CRL expired at {next_update.isoformat()}, it is "
            f"{now.isoformat()} (refresh it from AMD KDS)"
        )
    if crl.get_revoked_certificate_by_serial_number(intermediate.serial_number) is not None:
        raise EvidenceError(f"{common_name(intermediate)} is revoked by the AMD CRL")


def product_of_issuer(key: x509.Certificate) -> Product:
    """The processor generation a VCEK's or VLEK's issuer names (``SEV-Milan``,
    ``SEV-VLEK-Genoa``): only a hint to pick the pinned roots, which then decide."""
    issuer = common_name(key.issuer)
    for product in Product:
        if issuer in (f"SEV-{product}", f"SEV-VLEK-{product}"):
            return product
    raise EvidenceError(f"the endorsement key's issuer {issuer!r} is no AMD SEV-SNP CA")

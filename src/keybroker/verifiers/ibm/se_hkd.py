"""Which IBM Z host keys may open an SE attestation request: host-key document verification.

A host-key document (HKD) is an X.509 certificate of one IBM Z machine's P-521 host key, signed
by IBM's *IBM Z host-key signing key*. That signing key is a code-signing certificate, not a
CA, issued by a DigiCert intermediate under DigiCert Trusted Root G4. So, as ``libpv`` does,
the check has two halves:

1. the signing key is found among the configured certificates by its subject (C=US,
   ST=New York, L=Poughkeepsie or Armonk, O and CN International Business Machines
   Corporation, OU ending in "Key Signing Service"; exactly one), and chains through the
   other configured certificates to a pinned root with :func:`keybroker.protocol.x509chain.
   build_path`; every certificate of that path but the root must have a current CRL from its
   issuer (among the configured CRLs) that does not list it;
2. each HKD is signed by the signing key, is inside its validity period, carries a P-521 key,
   and a current CRL signed by the signing key does not list it (at least one such CRL is
   required).

Pure: certificates, CRLs, roots and the time come in; the host keys come out. Nothing is
downloaded (upstream may fetch CRLs from the distribution points; here they are configured).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keybroker.errors import EvidenceError
from keybroker.protocol.x509chain import build_path

MAX_FILES = 64  # certificates, CRLs or host-key documents in one directory
MAX_FILE_BYTES = 1024 * 1024

_IBM = "International Business Machines Corporation"
_SIGNING_KEY_OU_SUFFIX = "Key Signing Service"


@dataclass(frozen=True)
class TrustMaterial:
    """What the operator configured: IBM's signing key with its chain, CRLs, pinned roots."""

    certificates: list[x509.Certificate]
    crls: list[x509.CertificateRevocationList]
    roots: list[x509.Certificate]


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """All certificates of a PEM file, or the one of a DER file."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise EvidenceError(f"{what} is not an X.509 certificate: {e}") from None


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise EvidenceError(f"{what} is not a CRL: {e}") from None


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def is_ibm_signing_key(cert: x509.Certificate) -> bool:
    subject = cert.subject
    ou = _attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (
        len(list(subject)) == 6
        and _attribute(subject, NameOID.COUNTRY_NAME) == "US"
        and _attribute(subject, NameOID.STATE_OR_PROVINCE_NAME) == "New York"
        and _attribute(subject, NameOID.LOCALITY_NAME) in ("Poughkeepsie", "Armonk")
        and _attribute(subject, NameOID.ORGANIZATION_NAME) == _IBM
        and _attribute(subject, NameOID.COMMON_NAME) == _IBM
        and ou is not None
        and ou.endswith(_SIGNING_KEY_OU_SUFFIX)
    )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    return crl.issuer == issuer.subject and crl.is_signature_valid(key)


def check_not_revoked(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
) -> None:
    """A current CRL of ``issuer`` exists, and none of ``issuer``'s CRLs lists ``cert``."""
    current = [
        crl
        for crl in crls
        if _crl_signed_by(crl, issuer)
        and crl.next_update_utc is not None
        and crl.last_update_utc <= now < crl.next_update_utc
    ]
    subject = cert.subject.rfc4514_string()
    if not current:
        raise EvidenceError(
            f"no current CRL from {issuer.subject.rfc4514_string()} is configured, so "
            f"{subject} cannot be checked for revocation"
        )
    for crl in current:
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise EvidenceError(f"{subject} is revoked")


def verify_signing_key(material: TrustMaterial, now: datetime) -> x509.Certificate:
    """IBM's host-key signing key, chained to a pinned root with every link's CRL checked."""
    signing_keys = [c for c in material.certificates if is_ibm_signing_key(c)]
    if len(signing_keys) != 1:
        raise EvidenceError(
            f"the SE certificates hold {len(signing_keys)} IBM Z host-key signing keys, "
            "expected exactly one"
        )
    signing_key = signing_keys[0]
    others = [c for c in material.certificates if c is not signing_key]
    path = build_path(
        signing_key,
        others,
        material.roots,
        now=now,
        error=EvidenceError,
        what="the IBM Z host-key signing key",
    )
    for cert, issuer in itertools.pairwise(path):
        if cert in material.roots:
            break
        check_not_revoked(cert, issuer, material.crls, now)
    return signing_key


def verify_host_key_document(
    hkd: x509.Certificate,
    signing_key: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
) -> ec.EllipticCurvePublicKey:
    """The host key of a document IBM's signing key vouches for, else EvidenceError."""
    subject = hkd.subject.rfc4514_string()
    key = hkd.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP521R1):
        raise EvidenceError(f"host-key document {subject} does not hold a P-521 key")
    if not hkd.not_valid_before_utc <= now < hkd.not_valid_after_utc:
        raise EvidenceError(f"host-key document {subject} is outside its validity period")
    if not _signed_by(hkd, signing_key):
        raise EvidenceError(
            f"host-key document {subject} is not signed by the IBM Z host-key signing key"
        )
    check_not_revoked(hkd, signing_key, crls, now)
    return key

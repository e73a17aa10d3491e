"""X.509 path building for token signers: does this leaf chain to a certificate we trust?

The chain (``x5c``) comes from the token and is untrusted: intermediates may arrive in any
order, with decoys, and the trust file may hold a root or an intermediate (a partial chain
ends at any trusted certificate). Each link is checked with the issuer's key; every
certificate must be valid at ``now``; every issuer that is not the trust anchor must be a CA.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from keybroker.errors import TokenVerificationError

MAX_DEPTH = 8
_SHA256 = hashes.SHA256()


def chains_to_trusted(
    leaf: x509.Certificate,
    unverified_intermediates: Sequence[x509.Certificate],
    trusted: Sequence[x509.Certificate],
    *,
    now: datetime,
) -> None:
    """Raise TokenVerificationError unless ``leaf`` chains to one of ``trusted``."""
    anchors = {cert.fingerprint(_SHA256): cert for cert in trusted}
    if not anchors:
        raise TokenVerificationError("no trusted certificates are configured")
    if not _search(leaf, list(unverified_intermediates), anchors, now, depth=0):
        raise TokenVerificationError(
            "the token signer's certificate chain does not lead to a trusted certificate"
        )


def _valid(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _search(
    cert: x509.Certificate,
    pool: list[x509.Certificate],
    anchors: dict[bytes, x509.Certificate],
    now: datetime,
    *,
    depth: int,
) -> bool:
    if depth > MAX_DEPTH or not _valid(cert, now):
        return False
    if cert.fingerprint(_SHA256) in anchors:
        return True
    for anchor in anchors.values():
        if _valid(anchor, now) and _issued_by(cert, anchor):
            return True
    for index, candidate in enumerate(pool):
        if _is_ca(candidate) and _issued_by(cert, candidate):
            rest = pool[:index] + pool[index + 1 :]  # each certificate is used once
            if _search(candidate, rest, anchors, now, depth=depth + 1):
                return True
    return False

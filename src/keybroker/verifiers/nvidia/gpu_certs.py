"""NVIDIA GPU device certificates: the pinned root, the chain a GPU sends, and its FWID.

A Hopper GPU sends its chain as PEM, leaf first::

    NVIDIA Device Identity CA              (self-signed root, P-384; pinned here)
    └── NVIDIA GH100 Identity
        └── NVIDIA GH100 Provisioner ICA 1
            └── GH100 A01 GSP BROM         (per chip)
                └── GH100 A01 GSP FMC LF   (the attestation key; carries the FWID)

The root is never taken from the evidence: the chain is built with
:func:`keybroker.protocol.x509chain.build_path` to the root shipped in
``verifiers/data/nvidia-device-identity-ca.pem`` (the ``nvidia_device_root.pem`` NVIDIA
publishes and upstream Trustee ships in ``deps/verifier/src/nvidia/``). The leaf's extension
2.23.133.5.4.1 holds ``SEQUENCE { INTEGER, SubjectPublicKeyInfo, SEQUENCE { sha-384,
OCTET STRING fwid } }``; the report's ``fwid`` opaque value must equal that digest.
"""

from __future__ import annotations

import datetime
from functools import cache
from importlib import resources

from cryptography import x509

from keybroker.errors import EvidenceError
from keybroker.protocol.x509chain import build_path
from keybroker.verifiers.der import OCTET_STRING, OID, SEQUENCE, object_identifier, read_tlv
from keybroker.verifiers.der import single as der_single

ROOT_FILE = "nvidia-device-identity-ca.pem"
FWID_EXTENSION = x509.ObjectIdentifier("2.23.133.5.4.1")
SHA384_OID = "2.16.840.1.101.3.4.2.2"
MAX_CHAIN_TEXT = 32 * 1024  # five PEM certificates are about 4 KiB
MAX_CERTIFICATES = 5  # leaf, BROM, provisioner, identity, root


@cache
def pinned_root() -> x509.Certificate:
    pem = (resources.files("keybroker.verifiers") / "data" / ROOT_FILE).read_bytes()
    return x509.load_pem_x509_certificate(pem)


def load_chain(unverified_pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM chain, leaf first; at least a leaf and one issuer."""
    if len(unverified_pem) > MAX_CHAIN_TEXT:
        raise EvidenceError(
            f"the NVIDIA certificate chain is {len(unverified_pem)} bytes, at most "
            f"{MAX_CHAIN_TEXT} are accepted"
        )
    if unverified_pem.count(b"-----BEGIN CERTIFICATE-----") > MAX_CERTIFICATES:
        raise EvidenceError(
            f"the NVIDIA certificate chain has more than {MAX_CERTIFICATES} certificates"
        )
    try:
        certs = x509.load_pem_x509_certificates(unverified_pem)
    except ValueError as e:
        raise EvidenceError("the NVIDIA certificate chain is not PEM certificates") from e
    if len(certs) < 2:
        # upstream's rule: a lone certificate (say, the root itself) is no device chain
        raise EvidenceError(
            "the NVIDIA certificate chain must hold the signing certificate and its issuers"
        )
    return certs


def verify_chain(
    certs: list[x509.Certificate], anchors: list[x509.Certificate], now: datetime.datetime
) -> x509.Certificate:
    """The leaf, once it chains to one of ``anchors`` (the pinned root in production)."""
    leaf = certs[0]
    if any(leaf == anchor for anchor in anchors):
        raise EvidenceError("the NVIDIA certificate chain's leaf is the root itself")
    build_path(
        leaf, certs[1:], anchors, now=now, error=EvidenceError, what="the NVIDIA device chain"
    )
    return leaf


def certificate_fwid(leaf: x509.Certificate) -> bytes:
    """The SHA-384 FWID the signing certificate carries."""
    what = "the NVIDIA signing certificate's FWID extension"
    try:
        extension = leaf.extensions.get_extension_for_oid(FWID_EXTENSION).value
    except x509.ExtensionNotFound:
        raise EvidenceError("the NVIDIA signing certificate carries no FWID extension") from None
    if not isinstance(extension, x509.UnrecognizedExtension):
        raise EvidenceError(f"{what} is not the expected structure")
    content = der_single(extension.value, SEQUENCE, what)
    found: list[bytes] = []
    offset = 0
    while offset < len(content):
        tag, element, offset = read_tlv(content, offset, what)
        if tag == SEQUENCE:
            digest = _sha384_fwid(element, what)
            if digest is not None:
                found.append(digest)
    if len(found) != 1:
        raise EvidenceError(f"{what} holds {len(found)} SHA-384 FWIDs, expected one")
    return found[0]


def _sha384_fwid(element: bytes, what: str) -> bytes | None:
    """The digest of a ``SEQUENCE { sha-384, OCTET STRING }``, None for any other SEQUENCE
    (the SubjectPublicKeyInfo beside it)."""
    tag, algorithm, offset = read_tlv(element, 0, what)
    if tag != OID or object_identifier(algorithm, what) != SHA384_OID:
        return None
    tag, digest, end = read_tlv(element, offset, what)
    if tag != OCTET_STRING or end != len(element) or len(digest) != 48:
        raise EvidenceError(f"{what} has a malformed SHA-384 FWID")
    return digest

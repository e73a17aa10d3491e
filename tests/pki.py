"""A small test PKI: a CA, intermediates, and a token-signer certificate."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def issue(
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = True,
    days: int = 3650,
    key: ec.EllipticCurvePrivateKey | None = None,
    issuer_name: str | None = None,
    path_length: int | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> Issued:
    """A certificate for ``name``, signed by ``issuer`` (self-signed without one). ``key``
    reuses a key; ``issuer_name`` names an issuer whose key is ``key`` (a self-issued CA under
    a shared key); ``extensions``: more (extension, critical) pairs."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(
            issuer.cert.subject
            if issuer
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(START + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return Issued(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


def write(path: Path, *issued: Issued) -> Path:
    path.write_bytes(b"".join(item.pem() for item in issued))
    return path

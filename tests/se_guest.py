"""A STAND-IN for IBM's side of Secure Execution: PKI, a host and a guest, without IBM Z.

- :class:`SePki`: a root CA (standing in for DigiCert Trusted Root G4), an intermediate CA, an
  *IBM Z host-key signing key* (IBM's subject; a code-signing certificate, not a CA), host-key
  documents for P-521 host keys, and a current CRL from each issuer;
- :func:`write_material`: the files upstream's SE verifier reads, in upstream's layout
  (``hkds/``, ``certs/``, ``crls/``, ``root_ca.crt``, ``hdr/hdr.bin``, ``rsa/``);
- :class:`Ultravisor`: what the firmware of a host does with an attestation request: find the
  key slot of its host key, unwrap the protection key, decrypt the measurement key and nonce,
  and HMAC the running image's tags, the CUID, the user data, the nonce and both host-key
  hashes;
- :func:`attest`: the guest's side (guest-components' SE attester): read the challenge, put
  the runtime-data digest in the user data, ask the Ultravisor, build the response.

The Ultravisor half is the only simulated part; it uses keybroker's format helpers only to
*parse* the request and computes the HMAC and unwrapping here with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from keybroker.verifiers.ibm.se_formats import ec_coordinates, parse_arcb

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
YEARS = datetime.timedelta(days=3650)
IBM = "International Business Machines Corporation"


def ibm_name(ou: str, locality: str = "Poughkeepsie") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, IBM),
            x509.NameAttribute(NameOID.COMMON_NAME, IBM),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "New York"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, locality),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
        ]
    )


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


@dataclass
class Cert:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def certify(
    subject: x509.Name,
    issuer: Cert | None,
    *,
    ca: bool,
    curve: ec.EllipticCurve | None = None,
    not_after: datetime.datetime | None = None,
) -> Cert:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    signer = issuer.key if issuer else key
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(not_after or START + YEARS)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA384())
    )
    return Cert(key, cert)


def crl(issuer: Cert, revoked: Sequence[x509.Certificate] = ()) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(START)
        .next_update(START + YEARS)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(START)
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA384())


@dataclass
class SePki:
    root: Cert = field(default_factory=lambda: certify(_cn("Test Trusted Root G4"), None, ca=True))
    intermediate: Cert = field(init=False)
    signing_key: Cert = field(init=False)
    host: Cert = field(init=False)

    def __post_init__(self) -> None:
        self.intermediate = certify(_cn("Test Code Signing CA"), self.root, ca=True)
        self.signing_key = certify(
            ibm_name("IBM Z Host Key Signing Service"), self.intermediate, ca=False
        )
        self.host = self.host_key_document()

    def host_key_document(self, **kwargs: object) -> Cert:
        return certify(
            ibm_name("IBM Z Host Key", "Armonk"),
            self.signing_key,
            ca=False,
            curve=ec.SECP521R1(),
            **kwargs,  # type: ignore[arg-type]
        )

    def crls(self, revoked: list[x509.Certificate] = ()) -> list[x509.CertificateRevocationList]:  # type: ignore[assignment]
        return [
            crl(issuer, list(revoked))
            for issuer in (self.root, self.intermediate, self.signing_key)
        ]


def pem_crl(value: x509.CertificateRevocationList) -> bytes:
    return value.public_bytes(serialization.Encoding.PEM)


def write_material(
    root: Path,
    pki: SePki,
    header: bytes,
    rsa_key: rsa.RSAPrivateKey,
    *,
    documents: list[Cert] | None = None,
    crls: list[x509.CertificateRevocationList] | None = None,
) -> Path:
    """Upstream's ``/run/confidential-containers/ibmse`` layout under ``root``."""
    for sub in ("hkds", "certs", "crls", "hdr", "rsa"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(documents if documents is not None else [pki.host]):
        (root / "hkds" / f"HKD-{i}.crt").write_bytes(doc.pem())
    (root / "certs" / "ibm-z-host-key-signing-gen2.crt").write_bytes(pki.signing_key.pem())
    (root / "certs" / "DigiCertCA.crt").write_bytes(pki.intermediate.pem())
    for i, value in enumerate(crls if crls is not None else pki.crls()):
        (root / "crls" / f"{i}.crl").write_bytes(pem_crl(value))
    (root / "root_ca.crt").write_bytes(pki.root.pem())
    (root / "hdr" / "hdr.bin").write_bytes(header)
    (root / "rsa" / "encrypt_key.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (root / "rsa" / "encrypt_key.pub").write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return root


def settings_for(root: Path) -> dict[str, str]:
    """``[attestation_service.verifier_config.se]`` for material written under ``root``."""
    return {
        "host_key_documents_dir": str(root / "hkds"),
        "certificates_dir": str(root / "certs"),
        "crls_dir": str(root / "crls"),
        "root_ca": str(root / "root_ca.crt"),
        "image_header": str(root / "hdr" / "hdr.bin"),
        "measurement_key_private": str(root / "rsa" / "encrypt_key.pem"),
        "measurement_key_public": str(root / "rsa" / "encrypt_key.pub"),
    }


@dataclass
class Ultravisor:
    """One host's firmware, running one SE guest image."""

    host_key: ec.EllipticCurvePrivateKey
    image_tags: bytes  # pld ‖ ald ‖ tld ‖ tag of the running image
    cuid: bytes = bytes(range(16))

    def phkh(self) -> bytes:
        return hashlib.sha256(ec_coordinates(self.host_key.public_key())).digest()

    def attest(self, request_blob: bytes, user_data: bytes) -> tuple[bytes, bytes]:
        """(measurement, additional data) for an attestation request."""
        view = parse_arcb(request_blob)
        slot = next(s for s in view.keyslots if s[:32] == self.phkh())
        x = int.from_bytes(view.customer_key[:80], "big")
        y = int.from_bytes(view.customer_key[80:], "big")
        peer = ec.EllipticCurvePublicNumbers(x, y, ec.SECP521R1()).public_key()
        shared = self.host_key.exchange(ec.ECDH(), peer)
        slot_key = hashlib.sha256(shared + b"\x00\x00\x00\x01").digest()
        protection_key = AESGCM(slot_key).decrypt(bytes(12), slot[32:], None)
        secret = AESGCM(protection_key).decrypt(view.iv, view.encrypted, view.aad)
        measurement_key, nonce = secret[:64], secret[64:]
        additional = self.phkh() + self.phkh()
        items = (
            self.image_tags
            + self.cuid
            + struct.pack(">HHI", len(user_data), 0, len(additional))
            + user_data
            + nonce
            + additional
        )
        return hmac.new(measurement_key, items, hashlib.sha512).digest(), additional


def attest(challenge_nonce: str, runtime_digest: bytes, ultravisor: Ultravisor) -> dict[str, str]:
    """The guest: guest-components' SE attester on one challenge."""
    request = json.loads(challenge_nonce)
    user_data = runtime_digest.ljust(64, b"\0")
    blob = base64.b64decode(request["request_blob"])
    measurement, additional = ultravisor.attest(blob, user_data)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "measurement": b64(measurement),
        "additional_data": b64(additional),
        "user_data": b64(user_data),
        "cuid": b64(ultravisor.cuid),
        "encr_measurement_key": request["encr_measurement_key"],
        "encr_request_nonce": request["encr_request_nonce"],
        "image_hdr_tags": request["image_hdr_tags"],
    }

"""A STAND-IN for Intel's DCAP PKI, for tests: Intel's shapes, test keys.

Not Intel's keys. It issues what Intel's PKI issues, with the same names so the verifier's
checks apply unchanged: a root named "Intel SGX Root CA", an "Intel SGX TCB Signing"
certificate, an "Intel SGX PCK Platform CA", PCK certificates that carry a copy of a real PCK
certificate's SGX extension (optionally with another FMSPC), CRLs, and TCB Info / QE Identity
documents signed over the exact bytes of their member. Tests hand ``pki.root.cert`` to the
verifier as its ``root``; production keeps the pinned Intel root.
"""

from __future__ import annotations

import datetime
from dataclasses import replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keybroker.verifiers.intel.dcap import Quote
from keybroker.verifiers.intel.dcap_collateral import Collateral
from keybroker.verifiers.intel.sgx_extensions import SGX_EXTENSION, sgx_extension
from pki import Issued

START = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
ORGANIZATION = "Keybroker test stand-in for Intel"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue(
    common_name: str,
    issuer: Issued | None = None,
    *,
    ca: bool,
    extension: x509.ExtensionType | None = None,
    not_before: datetime.datetime = START,
    days: int = 3650,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    return Issued(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


def raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def signed_document(member: str, body: bytes, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """``{member: body, "signature": hex}`` as Intel PCS serves it."""
    signature = raw_signature(signer, body).hex()
    return b'{"' + member.encode() + b'":' + body + b',"signature":"' + signature.encode() + b'"}'


class IntelPki:
    def __init__(self) -> None:
        self.root = issue("Intel SGX Root CA", ca=True, days=20 * 365)
        self.tcb_signing = issue("Intel SGX TCB Signing", self.root, ca=False)
        self.platform_ca = issue("Intel SGX PCK Platform CA", self.root, ca=True)

    def pck(self, template: x509.Certificate, *, fmspc: bytes | None = None) -> Issued:
        """A PCK certificate with ``template``'s SGX extension, its FMSPC optionally replaced."""
        extension = template.extensions.get_extension_for_oid(SGX_EXTENSION).value
        assert isinstance(extension, x509.UnrecognizedExtension)
        der = extension.value
        if fmspc is not None:
            old = sgx_extension(template)["fmspc"]
            assert isinstance(old, bytes)
            der = der.replace(b"\x04\x06" + old, b"\x04\x06" + fmspc, 1)  # OCTET STRING (6)
        return issue(
            "Intel SGX PCK Certificate",
            self.platform_ca,
            ca=False,
            extension=x509.UnrecognizedExtension(SGX_EXTENSION, der),
        )

    def quote(self, quote: Quote, pck: Issued) -> Quote:
        """``quote`` with its PCK chain replaced by one this PKI issued."""
        return replace(quote, pck_chain=(pck.cert, self.platform_ca.cert, self.root.cert))

    def chain(self, signer: Issued) -> bytes:
        return signer.pem() + self.root.pem()

    def crl(
        self,
        issuer: Issued,
        *,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        revoked: tuple[x509.Certificate, ...] = (),
        number: int = 1,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(this_update)
                .build()
            )
        crl = builder.sign(issuer.key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)

    def collateral(
        self,
        *,
        tcb_info_body: bytes,
        qe_identity_body: bytes,
        now: datetime.datetime,
        revoked_pcks: tuple[x509.Certificate, ...] = (),
        revoked_by_root: tuple[x509.Certificate, ...] = (),
        crl_days: int = 30,
    ) -> Collateral:
        """Collateral as PCS would serve it for this PKI, its CRLs issued a day before ``now``."""
        this_update = now - datetime.timedelta(days=1)
        next_update = this_update + datetime.timedelta(days=crl_days)
        signer = self.tcb_signing.key
        return Collateral(
            tcb_info=signed_document("tcbInfo", tcb_info_body, signer),
            tcb_info_issuer_chain=self.chain(self.tcb_signing),
            qe_identity=signed_document("enclaveIdentity", qe_identity_body, signer),
            qe_identity_issuer_chain=self.chain(self.tcb_signing),
            pck_crl=self.crl(
                self.platform_ca,
                this_update=this_update,
                next_update=next_update,
                revoked=revoked_pcks,
            ),
            pck_crl_issuer_chain=self.chain(self.platform_ca),
            root_ca_crl=self.crl(
                self.root,
                this_update=this_update,
                next_update=this_update + datetime.timedelta(days=365),
                revoked=revoked_by_root,
            ),
        )

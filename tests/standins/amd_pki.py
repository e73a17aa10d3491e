"""A STAND-IN for AMD's SEV-SNP PKI, for tests: AMD's shapes, test keys.

Not AMD's keys. It issues what AMD issues, under the same names (``ARK-<Product>``,
``SEV-<Product>``, ``SEV-VLEK-<Product>``, ``SEV-VCEK``, ``SEV-VLEK``, AMD's organization
attributes), signed as AMD signs (RSA-PSS with SHA-384, salt 48), with AMD's VCEK extensions
(SPLs as DER INTEGERs, hwID as a DER OCTET STRING or as the legacy raw bytes, productName), and
signs SNP reports with a P-384 endorsement key. Because the names are AMD's, a chain from this
PKI is exactly the "internally consistent forgery" the pinned roots must refuse; tests that
want it accepted hand ``pki.roots()`` to the appraiser.

Also: :func:`build_report` (a binary report of any version, signed) and :func:`report_json`
(the ``sev`` crate's serde form of a report, as upstream's attester sends it).
"""

from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keybroker.verifiers.amd.snp_certs import (
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    AmdRoots,
)
from keybroker.verifiers.amd.snp_report import SIGNED_SIZE, Product, SnpReport, TcbVersion

START = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CPUID = {
    Product.MILAN: (0x19, 0x01, 1),
    Product.GENOA: (0x19, 0x11, 1),
    Product.TURIN: (0x1A, 0x02, 1),
}


def amd_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass
class Issued:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def signer(self) -> ec.EllipticCurvePrivateKey:
        """The P-384 key of an endorsement key (VCEK or VLEK), which signs reports."""
        assert isinstance(self.key, ec.EllipticCurvePrivateKey)
        return self.key

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _der_integer(value: int) -> bytes:
    content = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return b"\x02" + bytes([len(content)]) + content


def _sign(builder: x509.CertificateBuilder, issuer: Issued) -> x509.Certificate:
    assert isinstance(issuer.key, rsa.RSAPrivateKey)
    return builder.sign(issuer.key, hashes.SHA384(), rsa_padding=PSS)


class AmdPki:
    def __init__(self, product: Product = Product.GENOA) -> None:
        self.product = product
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ark = Issued(ark_key, self._ca(f"ARK-{product}", ark_key, None))
        self.ask = self._intermediate(f"SEV-{product}")
        self.asvk = self._intermediate(f"SEV-VLEK-{product}")

    def _ca(self, name: str, key: rsa.RSAPrivateKey, issuer: Issued | None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(amd_name(name))
            .issuer_name(issuer.cert.subject if issuer else amd_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(START)
            .not_valid_after(START + datetime.timedelta(days=25 * 365))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
                critical=True,
            )
        )
        signer = key if issuer is None else issuer.key
        assert isinstance(signer, rsa.RSAPrivateKey)
        return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)

    def _intermediate(self, name: str) -> Issued:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return Issued(key, self._ca(name, key, self.ark))

    def roots(self) -> dict[Product, AmdRoots]:
        return {self.product: AmdRoots(self.product, self.ark.cert, self.ask.cert, self.asvk.cert)}

    def endorsement_key(
        self,
        tcb: TcbVersion,
        *,
        chip_id: bytes | None = None,
        vlek: bool = False,
        legacy_hwid: bool = False,
        product_name: str | None = None,
        issuer: Issued | None = None,
        not_before: datetime.datetime = START,
        days: int = 7 * 365,
    ) -> Issued:
        """A VCEK (for ``chip_id``) or a VLEK certifying ``tcb``, with AMD's extensions."""
        key = ec.generate_private_key(ec.SECP384R1())
        turin = self.product is Product.TURIN
        extensions: list[tuple[x509.ObjectIdentifier, bytes]] = [
            (OID_STRUCT_VERSION, _der_integer(1 if turin else 0)),
            (OID_PRODUCT_NAME, _ia5(product_name or self.product.value)),
            (OID_BL_SPL, _der_integer(tcb.bootloader)),
            (OID_TEE_SPL, _der_integer(tcb.tee)),
            (OID_SNP_SPL, _der_integer(tcb.snp)),
            (OID_UCODE_SPL, _der_integer(tcb.microcode)),
        ]
        if turin:
            extensions.append((OID_FMC_SPL, _der_integer(tcb.fmc or 0)))
        if not vlek:
            assert chip_id is not None
            hwid = chip_id[:8] if turin else chip_id
            raw = hwid if legacy_hwid else b"\x04" + bytes([len(hwid)]) + hwid
            extensions.append((OID_HWID, raw))
        builder = (
            x509.CertificateBuilder()
            .subject_name(amd_name("SEV-VLEK" if vlek else "SEV-VCEK"))
            .issuer_name((issuer or (self.asvk if vlek else self.ask)).cert.subject)
            .public_key(key.public_key())
            .serial_number(1)  # AMD's serial is 0, which the builder refuses
            .not_valid_before(not_before)
            .not_valid_after(not_before + datetime.timedelta(days=days))
        )
        for oid, value in extensions:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
        return Issued(key, _sign(builder, issuer or (self.asvk if vlek else self.ask)))

    def crl(
        self,
        *,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        revoked: tuple[x509.Certificate, ...] = (),
        signer: Issued | None = None,
    ) -> bytes:
        """The ARK's CRL (DER), as KDS serves it at ``/vcek/v1/<Product>/crl``."""
        signer = signer or self.ark
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.cert.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(this_update)
                .build()
            )
        assert isinstance(signer.key, rsa.RSAPrivateKey)
        crl = builder.sign(signer.key, hashes.SHA384(), rsa_padding=PSS)
        return crl.public_bytes(serialization.Encoding.DER)


def _ia5(text: str) -> bytes:
    return b"\x16" + bytes([len(text)]) + text.encode("ascii")


def build_report(
    signer: ec.EllipticCurvePrivateKey,
    *,
    product: Product = Product.GENOA,
    version: int = 3,
    tcb: TcbVersion,
    chip_id: bytes,
    report_data: bytes = bytes(64),
    host_data: bytes = bytes(32),
    measurement: bytes = b"\x5a" * 48,
    policy: int = 0x30000,
    platform_info: int = 0x25,
    signing_key: int = 0,
    vmpl: int = 0,
    signature_algo: int = 1,
    cpuid: tuple[int, int, int] | None = None,
) -> bytes:
    """A binary SNP report with these fields, signed by ``signer`` (r, s little-endian)."""
    turin = product is Product.TURIN
    out = bytearray(0x4A0)
    struct.pack_into("<IIQ", out, 0, version, 1, policy)
    struct.pack_into("<II", out, 0x30, vmpl, signature_algo)
    struct.pack_into("<QI", out, 0x40, platform_info, signing_key << 2)
    out[0x50:0x90] = report_data
    out[0x90:0xC0] = measurement
    out[0xC0:0xE0] = host_data
    for offset in (0x38, 0x180, 0x1E0, 0x1F0):
        out[offset : offset + 8] = tcb.encode(turin)
    if version >= 3:
        out[0x188:0x18B] = bytes(cpuid or CPUID[product])
    out[0x1A0:0x1E0] = chip_id
    out[0x1E8:0x1EB] = bytes([40, 55, 1])  # build, minor, major
    out[0x1EC:0x1EF] = bytes([40, 55, 1])
    if version >= 5:
        struct.pack_into("<QQ", out, 0x1F8, 3, 3)
    r, s = decode_dss_signature(signer.sign(bytes(out[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
    out[0x2A0 : 0x2A0 + 72] = r.to_bytes(72, "little")
    out[0x2A0 + 72 : 0x2A0 + 144] = s.to_bytes(72, "little")
    return bytes(out)


def _tcb_json(tcb: TcbVersion) -> dict[str, Any]:
    return {
        "fmc": tcb.fmc,
        "bootloader": tcb.bootloader,
        "tee": tcb.tee,
        "snp": tcb.snp,
        "microcode": tcb.microcode,
    }


def report_json(report: SnpReport) -> dict[str, Any]:
    """The ``sev`` crate's serde form of ``report`` (what upstream's attester sends)."""
    document: dict[str, Any] = {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": report.policy,
        "family_id": list(report.family_id),
        "image_id": list(report.image_id),
        "vmpl": report.vmpl,
        "sig_algo": report.signature_algo,
        "current_tcb": _tcb_json(report.current_tcb),
        "plat_info": report.platform_info,
        "key_info": report.key_info,
        "report_data": list(report.report_data),
        "measurement": list(report.measurement),
        "host_data": list(report.host_data),
        "id_key_digest": list(report.id_key_digest),
        "author_key_digest": list(report.author_key_digest),
        "report_id": list(report.report_id),
        "report_id_ma": list(report.report_id_ma),
        "reported_tcb": _tcb_json(report.reported_tcb),
        "cpuid_fam_id": report.cpuid_fam_id,
        "cpuid_mod_id": report.cpuid_mod_id,
        "cpuid_step": report.cpuid_step,
        "chip_id": list(report.chip_id),
        "committed_tcb": _tcb_json(report.committed_tcb),
        "current": dict(vars(report.current)),
        "committed": dict(vars(report.committed)),
        "launch_tcb": _tcb_json(report.launch_tcb),
        "signature": {"r": list(report.signature_r), "s": list(report.signature_s)},
    }
    if report.version >= 5:
        document["launch_mit_vector"] = report.launch_mit_vector
        document["current_mit_vector"] = report.current_mit_vector
    return document


def evidence(report: SnpReport, *certs: tuple[str, bytes]) -> dict[str, Any]:
    """Upstream's SNP evidence: the report and a ``cert_chain`` of (cert_type, DER) entries."""
    chain = [{"cert_type": kind, "data": list(der)} for kind, der in certs] if certs else None
    return {"attestation_report": report_json(report), "cert_chain": chain}

"""Test PKIs for the NVIDIA verifiers, generated per test run (no private key is committed).

``gpu_pki`` stands in for NVIDIA's device hierarchy (a root the verifier does not pin and a
signing certificate carrying a FWID in NVIDIA's 2.23.133.5.4.1 layout); ``dpu_pki`` builds a
BlueField-style DICE chain (root → DeviceID with a TCG DiceTcbInfo → Alias) and the evidence
upstream's attester sends.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keybroker.protocol.models import JsonValue

TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.1")
SHA384_OID_DER = bytes.fromhex("0609608648016503040202")


def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def fwid_der(digest: bytes) -> bytes:
    return der(0x30, SHA384_OID_DER + der(0x04, digest))


def certificate(
    name: str | x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool,
    not_before: datetime.datetime,
    extensions: list[tuple[x509.ObjectIdentifier, bytes, bool]] = (),  # type: ignore[assignment]
) -> x509.Certificate:
    subject = (
        name
        if isinstance(name, x509.Name)
        else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=3650))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    for oid, value, critical in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical)
    return builder.sign(signer, hashes.SHA384())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


@dataclass
class GpuPki:
    root: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    def chain_b64(self) -> str:
        return base64.b64encode(pem(self.leaf, self.root)).decode()


def gpu_pki(fwid: bytes, now: datetime.datetime, root_name: x509.Name | None = None) -> GpuPki:
    """A root (named ``root_name``, say NVIDIA's root's name) and a P-384 signing certificate
    carrying ``fwid`` as a Hopper leaf does."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = certificate(root_name or "Test Device Identity CA", root_key, ca=True, not_before=now)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    spki = leaf_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    value = der(0x30, der(0x02, b"\x01") + spki + fwid_der(fwid))
    leaf = certificate(
        "Test GSP FMC LF",
        leaf_key,
        issuer=(root, root_key),
        ca=False,
        not_before=now,
        extensions=[(TCB_INFO, value, False)],
    )
    return GpuPki(root, leaf, leaf_key)


def resign(report: bytes, signed_size: int, key: ec.EllipticCurvePrivateKey) -> bytes:
    """``report`` up to ``signed_size`` with a fresh signature by ``key``."""
    return report[:signed_size] + raw_signature(key, report[:signed_size])


@dataclass
class DpuPki:
    root: x509.Certificate
    device_id: x509.Certificate
    alias: x509.Certificate
    alias_key: ec.EllipticCurvePrivateKey

    def evidence(
        self, report_data: bytes, *, signature: bytes | None = None
    ) -> dict[str, JsonValue]:
        signed = report_data + bytes(64 - len(report_data))
        return {
            "version": 1,
            "devices": [
                {
                    "architecture": "bluefield3",
                    "alias_cert": _b64(self.alias.public_bytes(serialization.Encoding.DER)),
                    "device_id_cert": _b64(self.device_id.public_bytes(serialization.Encoding.DER)),
                    "report_data_signature": _b64(
                        signature
                        if signature is not None
                        else raw_signature(self.alias_key, signed)
                    ),
                }
            ],
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tcb_info(fwids: list[bytes]) -> bytes:
    """A TCG DiceTcbInfo: vendor, model and the FWIDs ([6] IMPLICIT SEQUENCE OF FWID)."""
    return der(
        0x30,
        der(0x80, b"NVIDIA")
        + der(0x81, b"BlueField-3")
        + der(0xA6, b"".join(fwid_der(f) for f in fwids)),
    )


def dpu_pki(
    now: datetime.datetime,
    fwids: list[bytes],
    *,
    alias_age: datetime.timedelta = datetime.timedelta(minutes=5),
    tcb_info_value: bytes | None = None,
) -> DpuPki:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = certificate(
        "Test DPU Root CA", root_key, ca=True, not_before=now - datetime.timedelta(days=1)
    )
    device_key = ec.generate_private_key(ec.SECP384R1())
    device_id = certificate(
        "bluefield3",
        device_key,
        issuer=(root, root_key),
        ca=True,
        not_before=now - datetime.timedelta(days=1),
        extensions=[(TCB_INFO, tcb_info_value or tcb_info(fwids), True)],
    )
    alias_key = ec.generate_private_key(ec.SECP384R1())
    alias = certificate(
        "Alias",
        alias_key,
        issuer=(device_id, device_key),
        ca=False,
        not_before=now - alias_age,
    )
    return DpuPki(root, device_id, alias, alias_key)

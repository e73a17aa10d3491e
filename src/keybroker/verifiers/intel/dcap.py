"""Intel DCAP quotes: parse SGX (v3) and TDX (v4, v5) ECDSA quotes and check their signatures.

Pure: bytes in, frozen structures out, no I/O and no clock of its own. What this module proves
about an ``unverified`` quote, in order (each step fails closed with :class:`EvidenceError`):

1. the quote is well-formed: a known version, attestation key type ECDSA-P256, TEE type and body
   size; no trailing or missing bytes;
2. the PCK certificate chain carried in the quote (certification data type 5) ends in a
   certificate issued by the Intel SGX Root CA **pinned in this package**
   (``data/intel-sgx-root-ca.pem``); the root the quote carries is never trusted; the path
   is built and checked by ``keybroker.protocol.x509chain`` (validity at the injected time,
   CA constraints, critical extensions, bounds);
3. the QE report is signed by the PCK certificate's key;
4. the QE report binds the attestation key: its ``report_data`` is SHA-256(attestation key ||
   QE authentication data) followed by 32 zero bytes;
5. the quote header and body are signed by that attestation key.

What it does not do: TCB evaluation from collateral (TCB Info, QE Identity, CRLs), which decides
whether the platform's firmware is up to date; that is the collateral layer's work.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.errors import EvidenceError
from keybroker.protocol.x509chain import build_path

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
MAX_QUOTE_SIZE = 64 * 1024
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    reserved: bytes  # v4/v5: 4 reserved bytes; v3: QE SVN and PCE SVN
    vendor_id: bytes
    user_data: bytes
    raw: bytes


@dataclass(frozen=True)
class SgxReportBody:
    cpu_svn: bytes
    misc_select: bytes
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    reserved2: bytes
    mr_signer: bytes
    reserved3: bytes
    config_id: bytes
    isv_prod_id: bytes
    isv_svn: bytes
    config_svn: bytes
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes
    raw: bytes


@dataclass(frozen=True)
class TdReportBody:
    tcb_svn: bytes
    mr_seam: bytes
    mrsigner_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None  # TDX 1.5 only
    mr_servicetd: bytes | None  # TDX 1.5 only


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signed: bytes  # the bytes the attestation key signs
    signature: bytes  # raw r || s
    attestation_key: bytes  # raw x || y
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: tuple[x509.Certificate, ...]  # leaf first, as carried (unverified)
    body_type: int  # 1 SGX, 2 TD 1.0, 3 TD 1.5


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self.offset = data, 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.offset + size > len(self._data):
            raise EvidenceError(f"DCAP quote is truncated: {what} needs {size} more bytes")
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def done(self, what: str) -> None:
        if self.offset != len(self._data):
            raise EvidenceError(
                f"{what} has {len(self._data) - self.offset} unexpected trailing bytes"
            )


def _fields(data: bytes, sizes: list[int]) -> list[bytes]:
    out, offset = [], 0
    for size in sizes:
        out.append(data[offset : offset + size])
        offset += size
    return out


def parse_sgx_report(raw: bytes) -> SgxReportBody:
    if len(raw) != SGX_REPORT_SIZE:
        raise EvidenceError(f"an SGX report body is {SGX_REPORT_SIZE} bytes, found {len(raw)}")
    p = _fields(raw, [16, 4, 12, 16, 16, 32, 32, 32, 32, 64, 2, 2, 2, 42, 16, 64])
    return SgxReportBody(
        cpu_svn=p[0],
        misc_select=p[1],
        reserved1=p[2],
        isv_ext_prod_id=p[3],
        attributes=p[4],
        mr_enclave=p[5],
        reserved2=p[6],
        mr_signer=p[7],
        reserved3=p[8],
        config_id=p[9],
        isv_prod_id=p[10],
        isv_svn=p[11],
        config_svn=p[12],
        reserved4=p[13],
        isv_family_id=p[14],
        report_data=p[15],
        raw=raw,
    )


def parse_td_report(raw: bytes) -> TdReportBody:
    if len(raw) not in (TD10_REPORT_SIZE, TD15_REPORT_SIZE):
        raise EvidenceError(f"a TD report body is 584 or 648 bytes, found {len(raw)}")
    p = _fields(raw, [16, 48, 48, 8, 8, 8, 48, 48, 48, 48, 48, 48, 48, 48, 64])
    extra = raw[TD10_REPORT_SIZE:]
    return TdReportBody(
        tcb_svn=p[0],
        mr_seam=p[1],
        mrsigner_seam=p[2],
        seam_attributes=p[3],
        td_attributes=p[4],
        xfam=p[5],
        mr_td=p[6],
        mr_config_id=p[7],
        mr_owner=p[8],
        mr_owner_config=p[9],
        rtmrs=(p[10], p[11], p[12], p[13]),
        report_data=p[14],
        tee_tcb_svn2=extra[:16] if extra else None,
        mr_servicetd=extra[16:64] if extra else None,
    )


def parse_quote(unverified_quote: bytes) -> Quote:
    """Parse an SGX v3 or TDX v4/v5 ECDSA-P256 quote; nothing in it is verified yet."""
    if len(unverified_quote) > MAX_QUOTE_SIZE:
        raise EvidenceError(f"DCAP quote is larger than {MAX_QUOTE_SIZE} bytes")
    reader = _Reader(unverified_quote)
    raw_header = reader.take(HEADER_SIZE, "the header")
    version, att_key_type, tee_type = struct.unpack("<HHI", raw_header[:8])
    header = QuoteHeader(
        version,
        att_key_type,
        tee_type,
        raw_header[8:12],
        raw_header[12:28],
        raw_header[28:48],
        raw_header,
    )
    if att_key_type != ECDSA_P256:
        raise EvidenceError(f"DCAP attestation key type {att_key_type} is not ECDSA-P256 (2)")
    body, body_type, signed = _parse_body(header, reader)
    signature_data = _Reader(reader.take(reader.u32("the signature length"), "the signature data"))
    # Quote buffers are often handed over zero-padded; the padding is outside the signed and
    # certified data, so it is ignored. Anything else after the quote is refused.
    if any(unverified_quote[reader.offset :]):
        raise EvidenceError("the DCAP quote is followed by unexpected non-zero bytes")
    signature = signature_data.take(64, "the quote signature")
    attestation_key = signature_data.take(64, "the attestation key")
    if version == 3:
        certification = signature_data
    else:
        kind = signature_data.u16("the certification data type")
        size = signature_data.u32("the certification data size")
        certification = _Reader(signature_data.take(size, "the certification data"))
        signature_data.done("the signature data")
        if kind != CERT_DATA_QE_REPORT:
            raise EvidenceError(f"certification data type {kind} is not a QE report (6)")
    qe_report = parse_sgx_report(certification.take(SGX_REPORT_SIZE, "the QE report"))
    qe_report_signature = certification.take(64, "the QE report signature")
    qe_auth_data = certification.take(certification.u16("the QE auth data size"), "QE auth data")
    chain = _pck_chain(certification)
    return Quote(
        header,
        body,
        signed,
        signature,
        attestation_key,
        qe_report,
        qe_report_signature,
        qe_auth_data,
        chain,
        body_type,
    )


def _parse_body(
    header: QuoteHeader, reader: _Reader
) -> tuple[SgxReportBody | TdReportBody, int, bytes]:
    """(body, body type, the signed bytes) for the quote version."""
    version, tee_type = header.version, header.tee_type
    if version == 3:
        if tee_type != TEE_SGX:
            raise EvidenceError(f"a version 3 quote is SGX, found TEE type {tee_type:#x}")
        raw_body = reader.take(SGX_REPORT_SIZE, "the SGX report")
        return parse_sgx_report(raw_body), 1, header.raw + raw_body
    if version not in (4, 5):
        raise EvidenceError(f"DCAP quote version {version} is not supported (3, 4 or 5)")
    if tee_type != TEE_TDX:
        raise EvidenceError(
            f"Keybroker reads version {version} quotes of TDX, found TEE type {tee_type:#x}"
        )
    if version == 4:
        raw_body = reader.take(TD10_REPORT_SIZE, "the TD report")
        return parse_td_report(raw_body), 2, header.raw + raw_body
    body_type = reader.u16("the body type")
    size = reader.u32("the body size")
    if {2: TD10_REPORT_SIZE, 3: TD15_REPORT_SIZE}.get(body_type) != size:
        raise EvidenceError(f"quote v5 body type {body_type} of {size} bytes is not a TD report")
    raw_body = reader.take(size, "the TD report")
    signed = header.raw + struct.pack("<HI", body_type, size) + raw_body
    return parse_td_report(raw_body), body_type, signed


def _pck_chain(certification: _Reader) -> tuple[x509.Certificate, ...]:
    kind = certification.u16("the PCK certification data type")
    chain_data = certification.take(certification.u32("the PCK chain size"), "the PCK chain")
    certification.done("the certification data")
    if kind != CERT_DATA_PCK_CHAIN:
        raise EvidenceError(f"PCK certification data type {kind} is not a PEM chain (5)")
    try:
        chain = tuple(x509.load_pem_x509_certificate(pem) for pem in _PEM.findall(chain_data))
    except ValueError as e:
        raise EvidenceError(f"the quote's PCK certificate chain does not parse: {e}") from None
    if not chain:
        raise EvidenceError("the quote carries no PCK certificate")
    return chain


@cache
def intel_root() -> x509.Certificate:
    """The Intel SGX Root CA shipped with Keybroker (SHA-256 fingerprint 44a0196b…674d3)."""
    pem = (resources.files("keybroker.verifiers") / "data" / "intel-sgx-root-ca.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem)


def _p256(raw_key: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_key)
    except ValueError:
        raise EvidenceError("the quote's attestation key is not a P-256 point") from None


def verify_p256(
    key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes, what: str
) -> None:
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(f"{what} does not verify") from None


def verify_pck_chain(
    chain: tuple[x509.Certificate, ...],
    now: datetime.datetime,
    root: x509.Certificate | None = None,
) -> x509.Certificate:
    """The PCK leaf, once it chains to the pinned root at ``now``."""
    return verify_chain(chain, now, root or intel_root(), "the PCK chain")[0]


def verify_chain(
    chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
    now: datetime.datetime,
    anchor: x509.Certificate,
    what: str,
) -> list[x509.Certificate]:
    """The path from ``chain``'s first certificate up to, not including, ``anchor``, leaf
    first (``keybroker.protocol.x509chain``: each link signed by a CA, valid at ``now``). A
    root the chain carries is never trusted: only the anchor's key ends a path."""
    if not chain:
        raise EvidenceError(f"{what} holds no certificate")
    path = build_path(chain[0], chain[1:], [anchor], now=now, error=EvidenceError, what=what)
    if len(path) < 2:
        raise EvidenceError(f"{what} holds only the root")
    return path[:-1]


def verify_quote(
    quote: Quote, now: datetime.datetime, *, root: x509.Certificate | None = None
) -> x509.Certificate:
    """Check steps 2 to 5 of the module docstring; return the verified PCK certificate."""
    pck = verify_pck_chain(quote.pck_chain, now, root)
    pck_key = pck.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey):
        raise EvidenceError("the PCK certificate's key is not an EC key")
    verify_p256(pck_key, quote.qe_report_signature, quote.qe_report.raw, "the QE report signature")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != binding:
        raise EvidenceError("the QE report does not bind the quote's attestation key")
    verify_p256(_p256(quote.attestation_key), quote.signature, quote.signed, "the quote signature")
    return pck

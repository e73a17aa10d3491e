"""The one strict DER reader of the vendor certificate extensions (Intel SGX, AMD VCEK)."""

from __future__ import annotations

import pytest
from cryptography import x509

from keybroker.errors import EvidenceError
from keybroker.verifiers import der
from keybroker.verifiers.amd.snp_certs import (
    OID_BL_SPL,
    OID_HWID,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    endorsement_key,
)
from keybroker.verifiers.intel.sgx_extensions import SGX_EXTENSION, sgx_extension
from pki import issue


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x02", "truncated"),
        (b"\x02\x02\x01", "truncated"),
        (b"\x02\x81\x01\x03", "shortest form"),  # 1 in the long form
        (b"\x04\x82\x00\x80" + bytes(128), "shortest form"),  # a leading zero length octet
        (b"\x04\x84\x00\x00\x00\x01\x00", "bad DER length"),  # more length octets than allowed
        (b"\x04\x80", "bad DER length"),  # indefinite length: BER, not DER
        (b"\x1f\x81\x01\x00", "multi-byte DER tag"),
    ],
    ids=["no-length", "short-content", "long-form-1", "leading-zero", "5-octets", "indef", "tag"],
)
def test_malformed_der_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        der.read_tlv(data, 0, "the test element")


def test_der_elements_and_object_identifiers_read() -> None:
    assert der.read_tlv(b"\x04\x81\x80" + bytes(128), 0, "x") == (0x04, bytes(128), 131)
    assert der.single(b"\x02\x01\x05", der.INTEGER, "x") == b"\x05"
    oid = der.single(b"\x06\x09\x2a\x86\x48\x86\xf8\x4d\x01\x0d\x01", der.OID, "x")
    assert der.object_identifier(oid, "x") == SGX_EXTENSION.dotted_string
    with pytest.raises(EvidenceError, match="shortest form"):
        der.object_identifier(b"\x2a\x80\x01", "x")
    with pytest.raises(EvidenceError, match="malformed OBJECT IDENTIFIER"):
        der.object_identifier(b"\x2a\x86", "x")


def test_sgx_extension_with_a_non_minimal_der_length_is_refused() -> None:
    raw = x509.UnrecognizedExtension(SGX_EXTENSION, b"\x30\x81\x00")  # an empty SEQUENCE
    cert = issue("Intel SGX PCK Certificate", ca=False, extensions=[(raw, False)]).cert
    with pytest.raises(EvidenceError, match="SGX extension has a DER length that is not in"):
        sgx_extension(cert)


def test_vcek_spl_with_a_non_minimal_der_length_is_refused() -> None:
    """The same reader, the same rules, for AMD's extensions (they had a looser copy)."""
    spls = [
        (x509.UnrecognizedExtension(OID_BL_SPL, b"\x02\x81\x01\x03"), False),
        *(
            (x509.UnrecognizedExtension(oid, b"\x02\x01\x00"), False)
            for oid in (OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL)
        ),
        (x509.UnrecognizedExtension(OID_HWID, b"\x04\x40" + bytes(64)), False),
    ]
    vcek = issue("SEV-VCEK", ca=False, extensions=spls).cert
    with pytest.raises(EvidenceError, match="blSPL extension has a DER length that is not in"):
        endorsement_key(vcek, turin=False)

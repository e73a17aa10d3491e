"""TPM 2.0 quotes: the recorded Azure vTPM and plain TPM quotes verify; every structural and
cryptographic defect is refused."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.azure.az_hcl import HclReportType, parse_hcl_report
from keybroker.verifiers.tpm.quote import (
    TPM_ALG_ECDSA,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    TpmsAttest,
    TpmSignature,
    parse_attest,
    parse_tpm2b_attest,
    parse_tpmt_signature,
    pcr_values,
    verify_signature,
)
from standins.azure_vtpm import attest_message

TPM_ALG_SHA1 = 0x0004
TPM_ALG_RSAPSS = 0x0016


def _azure(tee: str) -> Path:
    return vector("verifier", tee)


def _ak(tee: str) -> rsa.RSAPublicKey:
    raw = (_azure(tee) / "hcl-report.bin").read_bytes()
    kind = HclReportType.SNP if tee == "az-snp-vtpm" else HclReportType.TDX
    return parse_hcl_report(raw, kind).runtime_data.attestation_key


def _hex_quote(tee: str) -> tuple[bytes, bytes, list[bytes]]:
    document = json.loads((_azure(tee) / "tpm-quote-v1.json").read_text())
    return (
        bytes.fromhex(document["signature"]),
        bytes.fromhex(document["message"]),
        [bytes.fromhex(pcr) for pcr in document["pcrs"]],
    )


def _bincode_quote(raw: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """The recorded ``quote.bin``: bincode of {signature: Vec<u8>, message: Vec<u8>, pcrs:
    Vec<[u8; 32]>} (u64 little-endian lengths)."""
    offset = 0

    def length() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<Q", raw, offset)
        offset += 8
        return int(value)

    def take(size: int) -> bytes:
        nonlocal offset
        offset += size
        return raw[offset - size : offset]

    signature = take(length())
    message = take(length())
    pcrs = [take(32) for _ in range(length())]
    assert offset == len(raw)
    return signature, message, pcrs


@pytest.mark.parametrize("tee", ["az-snp-vtpm", "az-tdx-vtpm"])
def test_recorded_vtpm_quote_verifies_with_the_hcl_attestation_key(tee: str) -> None:
    signature, message, pcrs = _hex_quote(tee)
    attest = parse_attest(message)
    verify_signature(attest, TpmSignature.rsassa(signature), _ak(tee))
    values = pcr_values(attest, pcrs, TPM_ALG_SHA256)
    assert attest.extra_data == b"challenge"
    assert attest.pcr_select[0].hash_alg == TPM_ALG_SHA256
    assert attest.pcr_select[0].pcrs == tuple(range(24))
    assert values[TPM_ALG_SHA256, 0] == pcrs[0] and len(values) == 24


@pytest.mark.parametrize("tee", ["az-snp-vtpm", "az-tdx-vtpm"])
def test_bincode_quote_is_the_json_quote(tee: str) -> None:
    """``quote.bin`` is the same quote as ``tpm-quote-v1.json``, in its older encoding."""
    assert _bincode_quote((_azure(tee) / "quote.bin").read_bytes()) == _hex_quote(tee)


# The attestation key that signed tpm-quote.msg: it was in upstream's earlier, 2048-byte
# az-snp-vtpm/hcl-report.bin (trustee commit aca6dd51 replaced that report and left this quote
# behind), so no report in the vectors carries it. Its modulus, read from that report:
EARLIER_AK_MODULUS = int(
    "a781b08600007bdfa91b6e5af1e61c43c4f986e3ed6f296a7beadd3b557846d64e26a578492e988218a06b56"
    "ca7b46aa6d41cacab01048c8e9b906bd6ae5b4f701bb6feb0a28f47f4a4243b02a0d966e8a17910b56ec69c2"
    "4e19c264d38802c014767e10640941e8ff7629981b241b6d6c1963cc23804712efc638f5d4fb1e7b4bd0ea15"
    "47bb97e555550b9972282f5bdec7054cb90f552024026092a2401c218dcba9c66190ae2470e092ec29d539e3"
    "30e593954e9e088b31f988bc31dc9ae3e2726ffcf13e04b50966c25fe7209511cf4746e34c2831087519637a"
    "69e0e8762fa41c06572352237f0c649d3a7c7b9eb78ee8527aaddd2f68acc1119cf4bdf5",
    16,
)


def test_recorded_quote_message_and_signature_files_verify() -> None:
    """``tpm-quote.msg`` / ``.sig``: a quote of PCRs 0-7 and 14 (no PCR values recorded),
    signed by the earlier report's attestation key and by no key in today's report."""
    folder = _azure("az-snp-vtpm")
    attest = parse_attest((folder / "tpm-quote.msg").read_bytes())
    signature = TpmSignature.rsassa((folder / "tpm-quote.sig").read_bytes())
    verify_signature(
        attest, signature, rsa.RSAPublicNumbers(65537, EARLIER_AK_MODULUS).public_key()
    )
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        verify_signature(attest, signature, _ak("az-snp-vtpm"))
    assert attest.extra_data == b"challenge"
    assert attest.pcr_select[0].pcrs == (*range(8), 14)
    assert attest.clock_info.safe and attest.firmware_version == 0x2020031200120003
    assert attest.qualified_signer[:2] == struct.pack(">H", TPM_ALG_SHA256)


def test_plain_tpm_evidence_with_a_tpmt_signature_verifies() -> None:
    """The ``tpm`` attester's evidence: base64 message, marshalled TPMT_SIGNATURE, DER AK."""
    document = json.loads(vector("verifier", "tpm_evidence.json").read_text())
    quote = document["tpm_quote"]
    key = serialization.load_der_public_key(base64.b64decode(document["ak_public"]))
    assert isinstance(key, rsa.RSAPublicKey)
    attest = parse_attest(base64.b64decode(quote["message"]))
    signature = parse_tpmt_signature(base64.b64decode(quote["signature"]))
    verify_signature(attest, signature, key)
    pcrs = pcr_values(attest, [bytes.fromhex(p) for p in quote["pcrs"]], signature.hash_alg)
    assert signature.hash_alg == TPM_ALG_SHA256 and len(signature.signature) == 256
    assert len(pcrs) == 24


def test_tpm2b_attest_is_unwrapped() -> None:
    _signature, message, _pcrs = _hex_quote("az-snp-vtpm")
    assert parse_tpm2b_attest(struct.pack(">H", len(message)) + message) == parse_attest(message)


def test_ecdsa_quote_verifies() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pcrs = [bytes([i]) * 32 for i in range(24)]
    message = attest_message(b"nonce", pcrs)
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA384())))
    marshalled = struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA384)
    for value in (r, s):
        marshalled += struct.pack(">H", 48) + value.to_bytes(48, "big")
    signature = parse_tpmt_signature(marshalled)
    verify_signature(parse_attest(message), signature, key.public_key())
    tampered = TpmSignature(signature.scheme, signature.hash_alg, r=signature.r, s=bytes(48))
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        verify_signature(parse_attest(message), tampered, key.public_key())


def _recorded() -> tuple[TpmsAttest, TpmSignature, list[bytes]]:
    signature, message, pcrs = _hex_quote("az-snp-vtpm")
    return parse_attest(message), TpmSignature.rsassa(signature), pcrs


def test_flipped_bit_in_tpm_quote_signature_is_refused() -> None:
    attest, signature, _pcrs = _recorded()
    flipped = bytes([signature.signature[0] ^ 1]) + signature.signature[1:]
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        verify_signature(attest, TpmSignature.rsassa(flipped), _ak("az-snp-vtpm"))


def test_flipped_bit_in_tpm_quote_message_is_refused() -> None:
    attest, signature, _pcrs = _recorded()
    raw = bytearray(attest.raw)
    raw[-1] ^= 1  # inside the PCR digest
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        verify_signature(parse_attest(bytes(raw)), signature, _ak("az-snp-vtpm"))


def test_tampered_pcr_value_does_not_match_the_pcr_digest() -> None:
    attest, _signature, pcrs = _recorded()
    pcrs[11] = bytes([pcrs[11][0] ^ 1]) + pcrs[11][1:]
    with pytest.raises(EvidenceError, match="do not hash to the TPM quote's PCR digest"):
        pcr_values(attest, pcrs, TPM_ALG_SHA256)


def test_missing_or_extra_pcr_values_are_refused() -> None:
    attest, _signature, pcrs = _recorded()
    with pytest.raises(EvidenceError, match="covers 24 PCRs, the evidence gives 23"):
        pcr_values(attest, pcrs[:-1], TPM_ALG_SHA256)
    with pytest.raises(EvidenceError, match="is 31 bytes"):
        pcr_values(attest, [*pcrs[:-1], bytes(31)], TPM_ALG_SHA256)


def test_quote_signed_by_another_key_is_refused() -> None:
    attest, signature, _pcrs = _recorded()
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        verify_signature(attest, signature, _ak("az-tdx-vtpm"))


def test_rsa_signature_checked_with_an_ec_key_is_refused() -> None:
    attest, signature, _pcrs = _recorded()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(EvidenceError, match="cannot be made by"):
        verify_signature(attest, signature, key)


def test_sha1_signature_is_refused() -> None:
    """A SHA-1 quote signature or PCR digest can be forged by collision."""
    attest, signature, pcrs = _recorded()
    weak = TpmSignature.rsassa(signature.signature, TPM_ALG_SHA1)
    with pytest.raises(EvidenceError, match="not accepted"):
        verify_signature(attest, weak, _ak("az-snp-vtpm"))
    with pytest.raises(EvidenceError, match="not accepted"):
        pcr_values(attest, pcrs, TPM_ALG_SHA1)


def test_unsupported_signature_scheme_is_refused() -> None:
    with pytest.raises(EvidenceError, match="scheme 0x0016 is not supported"):
        parse_tpmt_signature(struct.pack(">HHH", TPM_ALG_RSAPSS, TPM_ALG_SHA256, 0))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"\xff\x54\x43\x48" + raw[4:], "not TPM_GENERATED_VALUE"),
        (lambda raw: raw[:4] + b"\x80\x17" + raw[6:], "not a quote"),
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw + b"\0", "trailing"),
        (lambda raw: raw[:10], "truncated"),
        (lambda raw: raw + bytes(2048), "larger than"),
    ],
    ids=["magic", "certify-type", "short-digest", "trailing-byte", "cut", "oversized"],
)
def test_malformed_attest_is_refused(mutate: object, message: str) -> None:
    _signature, raw, _pcrs = _hex_quote("az-snp-vtpm")
    assert callable(mutate)
    with pytest.raises(EvidenceError, match=message):
        parse_attest(mutate(raw))


def test_oversized_pcr_bitmap_is_refused() -> None:
    raw = attest_message(b"n", [bytes(32)] * 24)
    selection = struct.pack(">IHB", 1, TPM_ALG_SHA256, 3)
    oversized = raw.replace(selection, struct.pack(">IHB", 1, TPM_ALG_SHA256, 9), 1)
    with pytest.raises(EvidenceError, match="bitmap of 9 bytes"):
        parse_attest(oversized)


def test_pcr_digest_uses_the_signing_hash() -> None:
    """The quote's digest is over the selected PCRs with the key's scheme hash (SHA-256 here),
    so the same values hashed with SHA-384 must not match."""
    pcrs = [bytes([i]) * 32 for i in range(24)]
    attest = parse_attest(attest_message(b"n", pcrs))
    assert attest.pcr_digest == hashlib.sha256(b"".join(pcrs)).digest()
    with pytest.raises(EvidenceError, match="do not hash"):
        pcr_values(attest, pcrs, TPM_ALG_SHA384)


def test_rsassa_signature_of_a_generated_key_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = attest_message(b"n", [bytes(32)] * 24)
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    verify_signature(parse_attest(message), TpmSignature.rsassa(signature), key.public_key())

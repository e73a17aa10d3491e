"""DCAP quotes: the recorded vectors parse and verify to the pinned Intel root; every named
tampering is refused. Offline, with an injected time inside each PCK chain's validity."""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.intel.dcap import (
    TdReportBody,
    intel_root,
    parse_quote,
    verify_pck_chain,
    verify_quote,
)
from keybroker.verifiers.intel.sgx_claims import sgx_claims
from keybroker.verifiers.intel.sgx_extensions import sgx_extension
from keybroker.verifiers.intel.tdx_claims import tdx_claims
from pki import issue

# a moment inside every vector's PCK chain validity
NOW = {
    "tdx_quote_4.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    "tdx_quote_5.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    "tdx_quote_6.dat": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    "occlum_quote.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
}
# byte offsets in a v4 TDX quote: header 48, TD report 584, then signature data
TD_REPORT_OFFSET, SIGNATURE_OFFSET = 48, 48 + 584 + 4
QE_REPORT_OFFSET = SIGNATURE_OFFSET + 64 + 64 + 2 + 4


def _quote(name: str) -> bytes:
    return vector("verifier", name).read_bytes()


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize("name", sorted(NOW))
def test_recorded_quote_verifies_to_the_pinned_root(name: str) -> None:
    quote = parse_quote(_quote(name))
    pck = verify_quote(quote, NOW[name])
    assert "Intel SGX PCK Certificate" in pck.subject.rfc4514_string()
    expected_version = {"tdx_quote_5.dat": 5, "occlum_quote.dat": 3}.get(name, 4)
    assert quote.header.version == expected_version


def test_pinned_root_is_intels() -> None:
    root = intel_root()
    assert root.fingerprint(hashes.SHA256()).hex() == (
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )
    assert root.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")


def test_tdx_1_5_body_of_a_v5_quote() -> None:
    quote = parse_quote(_quote("tdx_quote_5.dat"))
    assert isinstance(quote.body, TdReportBody) and quote.body_type == 3
    assert quote.body.tee_tcb_svn2 is not None and len(quote.body.mr_servicetd or b"") == 48


def test_tdx_claims_equal_upstream_parse() -> None:
    """Everything upstream's parser reports for this quote, but the event log (its own step)."""
    expected = json.loads(vector("verifier", "parse_tdx_claims_expected.json").read_text())
    expected.pop("uefi_event_logs")
    quote = parse_quote(_quote("tdx_quote_4.dat"))
    pck = verify_quote(quote, NOW["tdx_quote_4.dat"])
    assert tdx_claims(quote, pck) == expected


def test_pck_extension_fields() -> None:
    quote = parse_quote(_quote("occlum_quote.dat"))
    extension = sgx_extension(quote.pck_chain[0])
    assert extension["fmspc"] == bytes.fromhex("00606a000000")
    assert extension["pcesvn"] == 11 and extension["pceid"] == b"\x00\x00"


# --- named attacks ---------------------------------------------------------------------------


def test_flipped_bit_in_td_report_body_is_refused() -> None:
    quote = parse_quote(_flip(_quote("tdx_quote_4.dat"), TD_REPORT_OFFSET + 100))
    with pytest.raises(EvidenceError, match="the quote signature does not verify"):
        verify_quote(quote, NOW["tdx_quote_4.dat"])


def test_flipped_bit_in_quote_signature_is_refused() -> None:
    quote = parse_quote(_flip(_quote("tdx_quote_4.dat"), SIGNATURE_OFFSET + 5))
    with pytest.raises(EvidenceError, match="the quote signature does not verify"):
        verify_quote(quote, NOW["tdx_quote_4.dat"])


def test_flipped_bit_in_qe_report_is_refused() -> None:
    quote = parse_quote(_flip(_quote("tdx_quote_4.dat"), QE_REPORT_OFFSET + 10))
    with pytest.raises(EvidenceError, match="the QE report signature does not verify"):
        verify_quote(quote, NOW["tdx_quote_4.dat"])


def test_swapped_attestation_key_is_refused() -> None:
    """Re-signing the quote with the attacker's own key breaks the QE report's binding."""
    quote = parse_quote(_quote("tdx_quote_4.dat"))
    key = ec.generate_private_key(ec.SECP256R1())
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    with pytest.raises(EvidenceError, match="does not bind the quote's attestation key"):
        verify_quote(replace(quote, attestation_key=raw), NOW["tdx_quote_4.dat"])


def test_flipped_bit_in_pck_certificate_is_refused() -> None:
    quote = parse_quote(_quote("tdx_quote_4.dat"))
    leaf = quote.pck_chain[0]
    der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
    serial = leaf.serial_number.to_bytes((leaf.serial_number.bit_length() + 7) // 8, "big")
    der[der.index(serial) + 3] ^= 0x01  # the serial number, inside the signed part
    tampered = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(EvidenceError, match="does not verify"):
        verify_quote(
            replace(quote, pck_chain=(tampered, *quote.pck_chain[1:])), NOW["tdx_quote_4.dat"]
        )


def test_chain_to_a_self_made_root_is_refused() -> None:
    """A chain whose names copy Intel's but whose root key is the attacker's."""
    fake_root = issue("Intel SGX Root CA")
    quote = parse_quote(_quote("tdx_quote_4.dat"))
    with pytest.raises(EvidenceError, match=r"not issued by|does not verify"):
        verify_pck_chain((quote.pck_chain[0], fake_root.cert), NOW["tdx_quote_4.dat"])


def test_expired_pck_chain_is_refused() -> None:
    quote = parse_quote(_quote("tdx_quote_4.dat"))
    later = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(EvidenceError, match="is not valid at 2040"):
        verify_quote(quote, later)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q: q[:40], "truncated"),
        (lambda q: q[:2] + b"\x07\x00" + q[4:], "not ECDSA-P256"),
        (lambda q: b"\x09\x00" + q[2:], "version 9 is not supported"),
        (lambda q: q + b"\x01", "non-zero bytes"),
    ],
    ids=["truncated", "key-type", "version", "trailing-garbage"],
)
def test_malformed_quotes_are_refused(change: object, message: str) -> None:
    assert callable(change)
    with pytest.raises(EvidenceError, match=message):
        parse_quote(change(_quote("tdx_quote_4.dat")))


def test_sgx_claims_equal_upstream_token() -> None:
    """The quote of the upstream AS request vector gives the `sgx` claims of upstream's token,
    but for what the collateral layer adds (TCB status, advisories, dates, CRL numbers)."""
    request = json.loads(vector("attestation-service", "coco-as-request.json").read_text())
    evidence = json.loads(base64.b64decode(request["verification_requests"][0]["evidence"] + "=="))
    token = json.loads(vector("attestation-service", "example.token.json").read_text())
    expected = token["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["sgx"]
    quote = parse_quote(base64.b64decode(evidence["quote"]))
    claims = sgx_claims(quote, verify_quote(quote, NOW["occlum_quote.dat"]))
    assert claims == {name: expected[name] for name in claims}
    assert set(expected) - set(claims) == COLLATERAL_CLAIMS


COLLATERAL_CLAIMS = {
    "advisory_ids",
    "collateral_expiration_status",
    "earliest_expiration_date",
    "earliest_issue_date",
    "latest_issue_date",
    "pck_crl_num",
    "root_ca_crl_num",
    "root_key_id",
    "tcb_date",
    "tcb_eval_num",
    "tcb_status",
}

"""IBM SE binary formats against libpv's published test assets (tests/vectors/verifier/se)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.ibm.se_formats import (
    AttestationSecrets,
    BootHdrTags,
    build_arcb,
    ec_coordinates,
    measurement,
    open_arcb,
    parse_arcb,
    parse_se_header,
    public_host_key_hash,
    unwrap_keyslot,
)

# libpv's arcb.bin was built with these (rust/pv/src/uvattest/arcb.rs, `mk_arcb`)
ARPK = bytes([0x17] * 32)
IV = bytes([0x55] * 12)
MEAS_KEY = bytes([0x77] * 64)
NONCE = bytes([0xAB] * 16)

# libpv's expected tags of secure_guest.hdr (rust/pv/src/brcb.rs, EXP_HDR), first and last bytes
EXP_PLD_PREFIX = bytes.fromhex("be94b5eab3c1b118")
EXP_ALD_PREFIX = bytes.fromhex("2858c3368b2a0af0")
EXP_TLD_SUFFIX = bytes.fromhex("0a825d479fe67af5")
EXP_TAG = bytes.fromhex("92309d4589b9a85b427f8753171d1520")


def _host_key() -> ec.EllipticCurvePublicKey:
    cert = x509.load_pem_x509_certificate(vector("verifier", "se", "host.pem.crt").read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_libpv_header_vector_yields_its_tags() -> None:
    header = parse_se_header(vector("verifier", "se", "secure_guest.hdr").read_bytes())
    assert header.tags.pld.startswith(EXP_PLD_PREFIX)
    assert header.tags.ald.startswith(EXP_ALD_PREFIX)
    assert header.tags.tld.endswith(EXP_TLD_SUFFIX)
    assert header.tags.tag == EXP_TAG
    assert header.pcf == 0 and header.dump_allowed is False


def test_dump_flag_is_bit_34_of_the_plaintext_control_flags() -> None:
    data = bytearray(vector("verifier", "se", "secure_guest.hdr").read_bytes())
    struct.pack_into(">Q", data, 0x38, 1 << (63 - 34))
    assert parse_se_header(bytes(data)).dump_allowed is True


@pytest.mark.parametrize("cut", [1, 0x1A0, 0x27F])
def test_truncated_se_header_is_refused(cut: int) -> None:
    data = vector("verifier", "se", "secure_guest.hdr").read_bytes()
    with pytest.raises(EvidenceError):
        parse_se_header(data[:cut] if cut > 1 else data[1:])


def test_se_header_with_wrong_magic_is_refused() -> None:
    data = bytearray(vector("verifier", "se", "secure_guest.hdr").read_bytes())
    data[0], data[1] = data[1], data[0]
    with pytest.raises(EvidenceError, match="magic"):
        parse_se_header(bytes(data))


def test_libpv_request_vector_parses_and_opens_with_its_protection_key() -> None:
    blob = vector("verifier", "se", "arcb.bin").read_bytes()
    view = parse_arcb(blob)
    assert view.flags == 0x70 << 56  # nonce, image PHKH, attestation PHKH (MSB 0 bits 1-3)
    assert view.mai == 1  # HMAC-SHA-512
    assert view.iv == IV
    assert view.customer_key == vector("verifier", "se", "public_cust.bin").read_bytes()
    assert [slot[:32] for slot in view.keyslots] == [public_host_key_hash(_host_key())]
    assert open_arcb(view, ARPK) == AttestationSecrets(measurement_key=MEAS_KEY, nonce=NONCE)


def test_tampered_request_does_not_open() -> None:
    blob = bytearray(vector("verifier", "se", "arcb.bin").read_bytes())
    blob[0x3C] ^= 0x11  # the reserved word of the authenticated part
    with pytest.raises(InvalidTag):
        open_arcb(parse_arcb(bytes(blob)), ARPK)


def test_our_request_has_libpv_layout_and_the_host_can_open_it() -> None:
    expected = vector("verifier", "se", "arcb.bin").read_bytes()
    host = ec.generate_private_key(ec.SECP521R1())
    secrets = AttestationSecrets(measurement_key=MEAS_KEY, nonce=NONCE)
    blob = build_arcb([host.public_key()], secrets, protection_key=ARPK, iv=IV)
    assert len(blob) == len(expected)
    assert blob[:64] == expected[:64]  # request header, flags, measurement algorithm
    view = parse_arcb(blob)
    assert view.keyslots[0][:32] == hashlib.sha256(ec_coordinates(host.public_key())).digest()
    protection_key = unwrap_keyslot(view.keyslots[0], host, view.customer_key)
    assert protection_key == ARPK
    assert open_arcb(view, protection_key) == secrets


def test_request_for_another_host_does_not_unwrap() -> None:
    host, other = (ec.generate_private_key(ec.SECP521R1()) for _ in range(2))
    secrets = AttestationSecrets(measurement_key=MEAS_KEY, nonce=NONCE)
    view = parse_arcb(build_arcb([host.public_key()], secrets))
    with pytest.raises(InvalidTag):
        unwrap_keyslot(view.keyslots[0], other, view.customer_key)


def test_request_needs_a_host_key() -> None:
    with pytest.raises(EvidenceError, match="host keys"):
        build_arcb([], AttestationSecrets(measurement_key=MEAS_KEY, nonce=NONCE))


# libpv's known answers (rust/pv/src/uvattest/attest.rs): key 64 x 0x41, tags (1, 2, 3, 4),
# CUID 16 x 5, user data 256 x 7, nonce 16 x 8, additional data 128 x 9.
KAT_TAGS = BootHdrTags(
    pld=bytes([1] * 64), ald=bytes([2] * 64), tld=bytes([3] * 64), tag=bytes([4] * 16)
)
KAT = {
    "all": (
        True,
        True,
        "88794c62cce7bcf26216deb3f48f13fea6374b6d7e35bcc5c2ce68121db6f45d"
        "fc8c171856463549408bf8e7d1aca11efad0a878af97dc9e21a1fc2a32f3a675",
    ),
    "user_add": (
        True,
        False,
        "fbd4f738a390edd947cd4f11af3a2f3bab2fdf8bf89bf81beb495117f4382cf4"
        "2f0730c8c7d9e3ca27fb25adfceb21224f57fdb398dcf41a83c146e6a23db760",
    ),
    "minimal": (
        False,
        False,
        "c5c34c93835d1ec23f5c2d778dfa20129b11b305601742cb2f38e0ed9894dcdb"
        "73fc8695ab6a8dbad0744073ddc81a5eaafa52e4a15af8deb8d761091922847f",
    ),
}


@pytest.mark.parametrize("case", sorted(KAT))
def test_measurement_matches_libpv_known_answers(case: str) -> None:
    with_user, with_nonce, expected = KAT[case]
    user = bytes([7] * 256) if with_user else b""
    additional = bytes([9] * 128) if with_user else b""
    result = measurement(
        bytes([0x41] * 64),
        KAT_TAGS,
        bytes([5] * 16),
        user_data=user,
        nonce=bytes([8] * 16) if with_nonce else None,
        additional_data=additional,
    )
    assert result == bytes.fromhex(expected)

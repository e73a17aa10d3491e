"""SNP attestation reports: the binary layout of every version in the vectors (v2 Milan, v3
Milan VLEK, v3 Genoa as JSON, v2 inside an Azure HCL report), a synthetic v5 Turin report, the
re-encoding of upstream's JSON form (checked by the report's own signature), and upstream's
claim names and encodings."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.amd.snp import parse_report, report_from_json, snp_claims
from keybroker.verifiers.amd.snp_certs import EndorsementKey, KeyKind, load_certificates
from keybroker.verifiers.amd.snp_certs import verify_report_signature as _verify
from keybroker.verifiers.amd.snp_report import FirmwareVersion, Product, SnpReport, TcbVersion
from standins.amd_pki import build_report, report_json

SNP = vector("verifier", "snp")


def _signed_by(report: SnpReport, der: bytes) -> None:
    (cert,) = load_certificates(der)
    _verify(report, EndorsementKey(cert, KeyKind.VCEK, report.reported_tcb, None))


def _e2e() -> dict[str, Any]:
    document = json.loads(vector("attestation-service", "e2e-evidence.json").read_text())
    assert isinstance(document, dict)
    return document


def test_version_2_milan_report_fields() -> None:
    report = parse_report((SNP / "test-report.bin").read_bytes())
    assert (report.version, report.vmpl, report.signature_algo) == (2, 0, 1)
    assert report.product is None  # version 2 has no CPUID fields
    assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (None, None, None)
    assert report.reported_tcb == TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    assert report.signing_key == 0  # VCEK
    assert report.chip_id.hex().startswith("c38427a30d4c7af9")
    assert report.launch_mit_vector is None
    assert len(report.raw) == 0x4A0 and report.signed == report.raw[:0x2A0]
    _signed_by(report, (SNP / "test-vcek.der").read_bytes())


def test_version_3_vlek_report_names_its_processor() -> None:
    report = parse_report((SNP / "test-vlek-report.bin").read_bytes())
    assert report.version == 3
    assert (report.cpuid_fam_id, report.cpuid_mod_id) == (0x19, 0x01)
    assert report.product is Product.MILAN
    assert report.signing_key == 1  # VLEK
    assert report.reported_tcb == TcbVersion(bootloader=4, tee=0, snp=24, microcode=217)
    _signed_by(report, (SNP / "test-vlek.der").read_bytes())


def test_azure_hcl_report_carries_a_version_2_report() -> None:
    hcl = vector("verifier", "az-snp-vtpm", "hcl-report.bin").read_bytes()
    report = parse_report(hcl[32 : 32 + 0x4A0])
    assert report.version == 2
    pem = vector("verifier", "az-snp-vtpm", "vcek.pem").read_bytes()
    cert = load_certificates(pem)[0]  # the VCEK, then AMD's chain
    _verify(report, EndorsementKey(cert, KeyKind.VCEK, report.reported_tcb, None))


def test_e2e_json_report_reencodes_to_the_bytes_its_vcek_signed() -> None:
    document = _e2e()
    report = report_from_json(document["attestation_report"])
    assert report.version == 3 and report.product is Product.GENOA
    assert report.current == FirmwareVersion(major=1, minor=55, build=40)
    _signed_by(report, bytes(document["cert_chain"][0]["data"]))
    assert report_json(report) == document["attestation_report"]  # the mapping is exact


def test_json_report_with_a_changed_field_no_longer_verifies() -> None:
    document = copy.deepcopy(_e2e()["attestation_report"])
    document["guest_svn"] = 1
    report = report_from_json(document)
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _signed_by(report, bytes(_e2e()["cert_chain"][0]["data"]))


def test_binary_and_json_forms_parse_alike() -> None:
    binary = parse_report((SNP / "test-vlek-report.bin").read_bytes())
    assert report_from_json(report_json(binary)) == binary


def test_version_5_turin_layout_and_mitigation_vectors() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    tcb = TcbVersion(bootloader=3, tee=1, snp=8, microcode=15, fmc=5)
    chip_id = bytes(range(1, 9)) + bytes(56)
    raw = build_report(key, product=Product.TURIN, version=5, tcb=tcb, chip_id=chip_id)
    report = parse_report(raw)
    assert report.product is Product.TURIN
    assert report.reported_tcb == tcb  # FMC at byte 0, SNP at byte 3
    assert raw[0x180:0x188] == bytes([5, 3, 1, 8, 0, 0, 0, 15])
    assert (report.launch_mit_vector, report.current_mit_vector) == (3, 3)
    assert report.hwid() == bytes(range(1, 9))
    assert report_from_json(report_json(report)) == report


def test_version_2_turin_is_told_by_its_short_chip_id() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    tcb = TcbVersion(bootloader=3, tee=1, snp=8, microcode=15, fmc=5)
    raw = build_report(
        key, product=Product.TURIN, version=2, tcb=tcb, chip_id=b"\x11" * 8 + bytes(56)
    )
    assert parse_report(raw).reported_tcb == tcb


@pytest.mark.parametrize("version", [0, 1, 6])
def test_unknown_report_version_is_refused(version: int) -> None:
    raw = bytearray((SNP / "test-vlek-report.bin").read_bytes())
    raw[0:4] = version.to_bytes(4, "little")
    with pytest.raises(EvidenceError, match=f"version {version} is not supported"):
        parse_report(bytes(raw))


def test_truncated_report_is_refused() -> None:
    with pytest.raises(EvidenceError, match="not 1183"):
        parse_report((SNP / "test-report.bin").read_bytes()[:-1])


def test_unknown_processor_is_refused() -> None:
    raw = bytearray((SNP / "test-vlek-report.bin").read_bytes())
    raw[0x188] = 0x17  # Zen 2: no SEV-SNP
    with pytest.raises(EvidenceError, match="not a known SEV-SNP processor"):
        parse_report(bytes(raw))


def test_version_2_report_with_masked_chip_id_is_refused() -> None:
    raw = bytearray((SNP / "test-report.bin").read_bytes())
    raw[0x1A0:0x1E0] = bytes(64)
    with pytest.raises(EvidenceError, match="CHIP_ID is masked"):
        parse_report(bytes(raw))


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("measurement", [0] * 47, "measurement"),
        ("report_data", [256] * 64, "report_data"),
        ("vmpl", "0", "vmpl"),
        ("policy", -1, "policy"),
        ("signature", {"r": [0] * 72}, "signature.s"),
    ],
)
def test_malformed_json_report_is_refused(field: str, value: object, where: str) -> None:
    document = copy.deepcopy(_e2e()["attestation_report"])
    document[field] = value
    with pytest.raises(EvidenceError, match=f"malformed at {where}"):
        report_from_json(document)


# --- claims ----------------------------------------------------------------------------------

# upstream Trustee, deps/verifier/src/snp/mod.rs parse_tee_evidence
UPSTREAM_CLAIMS = {
    "policy_abi_major": int,
    "policy_abi_minor": int,
    "policy_smt_allowed": bool,
    "policy_migrate_ma": bool,
    "policy_debug_allowed": bool,
    "policy_single_socket": bool,
    "reported_tcb_bootloader": int,
    "reported_tcb_tee": int,
    "reported_tcb_snp": int,
    "reported_tcb_microcode": int,
    "platform_tsme_enabled": bool,
    "platform_smt_enabled": bool,
    "measurement": str,
    "report_data": str,
    "init_data": str,
    "chip_id": str,
}


def test_claims_have_upstreams_names_and_types() -> None:
    claims = snp_claims(parse_report((SNP / "test-report.bin").read_bytes()))
    assert set(claims) == set(UPSTREAM_CLAIMS)
    for name, kind in UPSTREAM_CLAIMS.items():
        assert type(claims[name]) is kind, name


def test_claims_of_the_milan_report() -> None:
    claims = snp_claims(parse_report((SNP / "test-report.bin").read_bytes()))
    assert claims == {
        "policy_abi_major": 0,
        "policy_abi_minor": 31,
        "policy_smt_allowed": True,
        "policy_migrate_ma": False,
        "policy_debug_allowed": False,
        "policy_single_socket": False,
        "reported_tcb_bootloader": 3,
        "reported_tcb_tee": 0,
        "reported_tcb_snp": 8,
        "reported_tcb_microcode": 115,
        "platform_tsme_enabled": False,
        "platform_smt_enabled": True,
        "measurement": "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f6"
        "3fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c",
        "report_data": "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c1440"
        "0ad7e2" + "0" * 64,
        "init_data": "0" * 64,
        "chip_id": "c38427a30d4c7af9d96f7a15b97269825a64cb76a2352ffd5d18115d89ad473f"
        "8e8c0bcd9a5d9286612bad4aadfb4426205a3b9e4fea82301135a170e477524e",
    }


def test_claims_lengths_as_upstreams_hex_test() -> None:
    claims = snp_claims(report_from_json(_e2e()["attestation_report"]))
    lengths = {"measurement": 96, "report_data": 128, "init_data": 64, "chip_id": 128}
    for name, length in lengths.items():
        value = claims[name]
        assert isinstance(value, str) and len(value) == length
        bytes.fromhex(value)
        assert value == value.lower()


def test_policy_and_platform_bits() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    policy = 0x02 << 8 | 0x07 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19 | 1 << 20
    raw = build_report(
        key,
        tcb=TcbVersion(1, 2, 3, 4),
        chip_id=b"\x01" * 64,
        policy=policy,
        platform_info=0b10,
        host_data=b"\xab" * 32,
    )
    claims = snp_claims(parse_report(raw))
    assert (claims["policy_abi_major"], claims["policy_abi_minor"]) == (2, 7)
    assert claims["policy_smt_allowed"] and claims["policy_migrate_ma"]
    assert claims["policy_debug_allowed"] and claims["policy_single_socket"]
    assert claims["platform_tsme_enabled"] and not claims["platform_smt_enabled"]
    assert claims["init_data"] == "ab" * 32
    assert (claims["reported_tcb_bootloader"], claims["reported_tcb_microcode"]) == (1, 4)

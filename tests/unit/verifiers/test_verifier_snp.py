"""The SNP verifier: every SNP vector verified to the pinned AMD roots, and one named test per
attack. Collateral comes from an in-memory fetcher (the real interface); the KDS client itself
is tested in test_verifier_snp_fetcher.py. Tests that need certificates AMD would never issue
(wrong TCB, other chip, revoked ASK) use the stand-in AMD PKI, handed to the appraiser as its
roots; tests of forged chains keep the pinned roots."""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import vector
from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.amd.snp import (
    SnpAppraiser,
    SnpVerifier,
    parse_evidence,
    parse_report,
    snp_claims,
)
from keybroker.verifiers.amd.snp_certs import (
    KeyKind,
    endorsement_key,
    load_certificates,
    pinned_roots,
    verify_key_chain,
)
from keybroker.verifiers.amd.snp_fetcher import SnpCollateralFetcher, VcekRequest
from keybroker.verifiers.amd.snp_report import Product, SnpReport, TcbVersion
from keybroker.verifiers.azure.az_snp_vtpm import AzSnpVtpmVerifier
from keybroker.verifiers.azure.az_tdx_vtpm import AzTdxVtpmVerifier
from standins.amd_pki import AmdPki, Issued, build_report, evidence

_DER = serialization.Encoding.DER

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)  # the vectors' VCEKs and VLEK are valid
SNP = vector("verifier", "snp")
AZURE = vector("verifier", "az-snp-vtpm")
TCB = TcbVersion(bootloader=10, tee=0, snp=23, microcode=25)
CHIP = bytes(range(64, 128))


class FakeKds(SnpCollateralFetcher):
    """Collateral held in memory, behind the real fetcher interface."""

    def __init__(self) -> None:
        self.vceks: dict[VcekRequest, bytes] = {}
        self.crls: dict[Product, bytes] = {}
        self.chains: dict[tuple[Product, KeyKind], bytes] = {}
        self.available = True
        self.asked: list[str] = []

    def _gate(self, what: str) -> None:
        self.asked.append(what)
        if not self.available:
            raise ConnectionError(f"{what}: connection refused")

    def _vcek(self, request: VcekRequest) -> bytes:
        self._gate("vcek")
        return self.vceks[request]

    def _crl(self, product: Product) -> bytes:
        self._gate("crl")
        return self.crls[product]

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        self._gate("cert_chain")
        return self.chains[product, kind]


@pytest.fixture(scope="module")
def pki() -> AmdPki:
    return AmdPki(Product.GENOA)


@dataclass
class World:
    pki: AmdPki
    kds: FakeKds
    vcek: Issued
    extra: dict[str, Any] = field(default_factory=dict)

    def appraiser(self) -> SnpAppraiser:
        return SnpAppraiser(self.kds, roots=self.pki.roots())

    def report(self, *, key: Issued | None = None, **fields: Any) -> SnpReport:
        options: dict[str, Any] = {"tcb": TCB, "chip_id": CHIP, "product": self.pki.product}
        options.update(fields)
        return parse_report(build_report((key or self.vcek).signer(), **options))


@pytest.fixture
def world(pki: AmdPki) -> World:
    kds = FakeKds()
    kds.crls[pki.product] = pki.crl(
        this_update=NOW - datetime.timedelta(days=1), next_update=NOW + datetime.timedelta(days=7)
    )
    return World(pki, kds, pki.endorsement_key(TCB, chip_id=CHIP))


def _der(path: str) -> bytes:
    return (SNP / path).read_bytes()


def _skip_crl_appraiser(kds: SnpCollateralFetcher | None = None) -> SnpAppraiser:
    """Pinned roots, no CRL: AMD's real ARK CRLs are not in the vectors."""
    return SnpAppraiser(kds or FakeKds(), insecure_skip_crl=True)


def _e2e() -> dict[str, Any]:
    document = json.loads(vector("attestation-service", "e2e-evidence.json").read_text())
    assert isinstance(document, dict)
    return document


# --- every vector, to the pinned roots ---------------------------------------------------------


def test_milan_vcek_report_verifies_to_the_pinned_root(caplog: pytest.LogCaptureFixture) -> None:
    report = parse_report(_der("test-report.bin"))
    with caplog.at_level(logging.WARNING):
        _skip_crl_appraiser().verify(report, load_certificates(_der("test-vcek.der")), NOW)
    assert "INSECURE: the AMD Milan CRL is not checked" in caplog.text


def test_vlek_report_verifies_through_the_pinned_asvk() -> None:
    report = parse_report(_der("test-vlek-report.bin"))
    _skip_crl_appraiser().verify(report, load_certificates(_der("test-vlek.der")), NOW)


def test_e2e_genoa_evidence_verifies_and_yields_upstreams_claims() -> None:
    document = _e2e()
    report, _ = parse_evidence(document)
    verifier = SnpVerifier(_skip_crl_appraiser(), clock=NOW.timestamp)
    (result,) = verifier.verify(
        document,
        expected_report_data=report.report_data,
        expected_init_data=bytes(32),
    )
    assert (result.tee, result.tee_class) == (Tee.SNP, "cpu")
    assert result.claims == snp_claims(report)
    assert result.claims["reported_tcb_snp"] == 23
    assert result.claims["chip_id"] == bytes(document["attestation_report"]["chip_id"]).hex()


def test_e2e_evidence_with_amds_own_ark_and_ask_carried_verifies() -> None:
    document = _e2e()
    roots = pinned_roots()[Product.GENOA]
    chain = document["cert_chain"] + [
        {"cert_type": "ASK", "data": list(roots.ask.public_bytes(_DER))},
        {"cert_type": "ARK", "data": list(roots.ark.public_bytes(_DER))},
        {"cert_type": "CRL", "data": [1, 2, 3]},  # not a certificate: skipped, never trusted
        {"cert_type": {"OTHER": "0b1c9a4e-0000-4000-8000-000000000000"}, "data": [0]},
    ]
    report, carried = parse_evidence({**document, "cert_chain": chain})
    _skip_crl_appraiser().verify(report, carried, NOW)


def test_azure_vceks_verify_to_the_pinned_roots() -> None:
    genoa = load_certificates((AZURE / "vcek-genoa.pem").read_bytes())[0]
    milan = load_certificates((AZURE / "vcek.pem").read_bytes())[0]
    for cert, product in ((genoa, Product.GENOA), (milan, Product.MILAN)):
        roots = pinned_roots()[product]
        verify_key_chain(cert, roots.ask, roots, NOW)
    with pytest.raises(EvidenceError, match="is not issued by"):
        verify_key_chain(
            genoa, pinned_roots()[Product.MILAN].ask, pinned_roots()[Product.MILAN], NOW
        )


def test_azure_hcl_reports_verify_with_their_vceks() -> None:
    hcl = (AZURE / "hcl-report.bin").read_bytes()
    carried = load_certificates((AZURE / "vcek.pem").read_bytes())  # VCEK, ASK, ARK
    _skip_crl_appraiser().verify(parse_report(hcl[32 : 32 + 0x4A0]), carried, NOW)
    genoa = json.loads((AZURE / "evidence-genoa.json").read_text())
    report = parse_report(bytes(genoa["report"])[32 : 32 + 0x4A0])
    _skip_crl_appraiser().verify(report, load_certificates(genoa["vcek"].encode()), NOW)


@pytest.mark.parametrize(
    ("name", "encoding"), [("test-vcek-invalid-legacy.der", 64), ("test-vcek-invalid-new.der", 66)]
)
def test_upstreams_invalid_vceks_are_refused_for_their_broken_signature(
    name: str, encoding: int
) -> None:
    """Upstream made these by rewriting the hwID (raw bytes in the legacy one, a DER OCTET
    STRING in the new one) and SPLs of a real Milan VCEK without AMD's key: the hwID reads in
    both encodings, and the ASK's signature no longer verifies."""
    (cert,) = load_certificates(_der(name))
    raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"))
    assert isinstance(raw.value, x509.UnrecognizedExtension)
    assert len(raw.value.value) == encoding
    assert endorsement_key(cert, turin=False).hwid == bytes(range(64))
    report = parse_report(_der("test-report.bin"))
    with pytest.raises(EvidenceError, match=r"signature of CN=SEV-VCEK.* does not verify with"):
        _skip_crl_appraiser().verify(report, [cert], NOW)


def test_vcek_is_fetched_when_the_evidence_carries_none() -> None:
    document = _e2e()
    report, _ = parse_evidence({**document, "cert_chain": None})
    kds = FakeKds()
    request = VcekRequest(Product.GENOA, report.chip_id, report.reported_tcb)
    kds.vceks[request] = bytes(document["cert_chain"][0]["data"])
    _skip_crl_appraiser(kds).verify(report, [], NOW)
    assert kds.asked == ["vcek"]


def test_crl_is_required_unless_insecurely_skipped() -> None:
    report = parse_report(_der("test-report.bin"))
    kds = FakeKds()
    kds.available = False
    with pytest.raises(ServiceUnavailableError, match="the AMD Milan CRL could not be fetched"):
        SnpAppraiser(kds).verify(report, load_certificates(_der("test-vcek.der")), NOW)


# --- the stand-in PKI, accepted when it is the trust anchor ------------------------------------


def test_report_signed_by_a_vcek_of_the_trusted_pki_verifies(world: World) -> None:
    world.appraiser().verify(world.report(), [world.vcek.cert], NOW)
    assert world.kds.asked == ["crl"]


def test_vcek_fetched_for_the_reports_chip_and_tcb(world: World) -> None:
    world.kds.vceks[VcekRequest(Product.GENOA, CHIP, TCB)] = world.vcek.der()
    world.appraiser().verify(world.report(), [], NOW)
    assert world.kds.asked == ["vcek", "crl"]


def test_vlek_report_verifies_through_the_asvk(world: World) -> None:
    vlek = world.pki.endorsement_key(TCB, vlek=True)
    world.appraiser().verify(world.report(key=vlek, signing_key=1), [vlek.cert], NOW)


def test_legacy_raw_hwid_is_read(world: World) -> None:
    vcek = world.pki.endorsement_key(TCB, chip_id=CHIP, legacy_hwid=True)
    world.appraiser().verify(world.report(key=vcek), [vcek.cert], NOW)


def test_turin_version_5_report_binds_the_fmc_svn() -> None:
    pki = AmdPki(Product.TURIN)
    kds = FakeKds()
    kds.crls[Product.TURIN] = pki.crl(
        this_update=NOW - datetime.timedelta(days=1), next_update=NOW + datetime.timedelta(days=1)
    )
    tcb = TcbVersion(bootloader=1, tee=1, snp=4, microcode=70, fmc=2)
    chip = b"\x42" * 8 + bytes(56)
    vcek = pki.endorsement_key(tcb, chip_id=chip)
    raw = build_report(vcek.signer(), product=Product.TURIN, version=5, tcb=tcb, chip_id=chip)
    kds.vceks[VcekRequest(Product.TURIN, chip[:8], tcb)] = vcek.der()
    SnpAppraiser(kds, roots=pki.roots()).verify(parse_report(raw), [], NOW)
    other = pki.endorsement_key(TcbVersion(1, 1, 4, 70, fmc=3), chip_id=chip)
    raw = build_report(other.signer(), product=Product.TURIN, version=5, tcb=tcb, chip_id=chip)
    with pytest.raises(EvidenceError, match="fmc SVN is 2, the VCEK certifies 3"):
        SnpAppraiser(kds, roots=pki.roots()).verify(parse_report(raw), [other.cert], NOW)


def test_ask_rotated_since_packaging_is_taken_from_kds(world: World) -> None:
    new_ask = world.pki._intermediate(f"SEV-{world.pki.product}")
    vcek = world.pki.endorsement_key(TCB, chip_id=CHIP, issuer=new_ask)
    world.kds.chains[Product.GENOA, KeyKind.VCEK] = new_ask.pem() + world.pki.ark.pem()
    world.appraiser().verify(world.report(key=vcek), [vcek.cert], NOW)
    world.kds.chains.clear()  # without KDS the pinned ASK's verdict stands
    with pytest.raises(EvidenceError, match="does not verify with"):
        world.appraiser().verify(world.report(key=vcek), [vcek.cert], NOW)


# --- attacks -----------------------------------------------------------------------------------


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def test_flipped_bit_in_the_report_body_is_refused() -> None:
    report = parse_report(_flip(_der("test-report.bin"), 0x90))  # MEASUREMENT
    with pytest.raises(EvidenceError, match="signature does not verify with its VCEK"):
        _skip_crl_appraiser().verify(report, load_certificates(_der("test-vcek.der")), NOW)


def test_flipped_bit_in_the_signature_is_refused() -> None:
    report = parse_report(_flip(_der("test-report.bin"), 0x2A0 + 5))
    with pytest.raises(EvidenceError, match="signature does not verify with its VCEK"):
        _skip_crl_appraiser().verify(report, load_certificates(_der("test-vcek.der")), NOW)


@pytest.mark.parametrize(
    ("carried", "reason"),
    [
        (("VCEK", "ASK", "ARK"), "which is not AMD's pinned Genoa ARK"),
        (("VCEK", "ASK"), r"signature of CN=SEV-Genoa.* does not verify with .*ARK-Genoa"),
        (("VCEK",), r"signature of CN=SEV-VCEK.* does not verify with .*SEV-Genoa"),
    ],
)
def test_vcek_from_a_self_made_ark_is_refused(
    world: World, carried: tuple[str, ...], reason: str
) -> None:
    """A chain with AMD's names and structure, internally consistent, rooted in another ARK."""
    pki = world.pki
    certs = {"VCEK": world.vcek.cert, "ASK": pki.ask.cert, "ARK": pki.ark.cert}
    with pytest.raises(EvidenceError, match=reason):
        SnpAppraiser(world.kds).verify(world.report(), [certs[c] for c in carried], NOW)


def test_tcb_mismatch_between_report_and_vcek_is_refused(world: World) -> None:
    newer = TcbVersion(bootloader=10, tee=0, snp=24, microcode=25)
    with pytest.raises(EvidenceError, match="snp SVN is 24, the VCEK certifies 23"):
        world.appraiser().verify(world.report(tcb=newer), [world.vcek.cert], NOW)


def test_tcb_mismatch_in_the_real_milan_report_is_refused() -> None:
    report = parse_report(_flip(_der("test-report.bin"), 0x180))  # REPORTED_TCB boot loader
    with pytest.raises(EvidenceError, match="bootloader SVN is 2, the VCEK certifies 3"):
        _skip_crl_appraiser().verify(report, load_certificates(_der("test-vcek.der")), NOW)


def test_chip_id_mismatch_is_refused(world: World) -> None:
    other_chip = bytes(range(64))
    with pytest.raises(EvidenceError, match="hwID does not match the report's CHIP_ID"):
        world.appraiser().verify(world.report(chip_id=other_chip), [world.vcek.cert], NOW)


def test_wrong_product_milan_vcek_for_a_genoa_report_is_refused() -> None:
    document = _e2e()
    milan_vcek: JsonValue = {"cert_type": "VCEK", "data": list(_der("test-vcek.der"))}
    report, carried = parse_evidence({**document, "cert_chain": [milan_vcek]})
    with pytest.raises(EvidenceError, match="issued for Milan processors, the report is from"):
        _skip_crl_appraiser().verify(report, carried, NOW)


def test_vlek_report_verified_with_a_vcek_is_refused() -> None:
    report = parse_report(_der("test-vlek-report.bin"))
    with pytest.raises(EvidenceError, match="signed by a VLEK, the evidence carries only SEV-VCEK"):
        _skip_crl_appraiser().verify(report, load_certificates(_der("test-vcek.der")), NOW)


def test_vlek_report_without_its_vlek_is_refused(world: World) -> None:
    with pytest.raises(EvidenceError, match="must carry its VLEK"):
        world.appraiser().verify(world.report(signing_key=1), [], NOW)
    assert world.kds.asked == []


def test_revoked_ask_is_refused(world: World) -> None:
    world.kds.crls[Product.GENOA] = world.pki.crl(
        this_update=NOW - datetime.timedelta(days=1),
        next_update=NOW + datetime.timedelta(days=7),
        revoked=(world.pki.ask.cert,),
    )
    with pytest.raises(EvidenceError, match="SEV-Genoa is revoked by the AMD CRL"):
        world.appraiser().verify(world.report(), [world.vcek.cert], NOW)


def test_revoked_asvk_is_refused_for_a_vlek(world: World) -> None:
    vlek = world.pki.endorsement_key(TCB, vlek=True)
    world.kds.crls[Product.GENOA] = world.pki.crl(
        this_update=NOW - datetime.timedelta(days=1),
        next_update=NOW + datetime.timedelta(days=7),
        revoked=(world.pki.asvk.cert,),
    )
    with pytest.raises(EvidenceError, match="SEV-VLEK-Genoa is revoked"):
        world.appraiser().verify(world.report(key=vlek, signing_key=1), [vlek.cert], NOW)


def test_expired_crl_is_refused(world: World) -> None:
    world.kds.crls[Product.GENOA] = world.pki.crl(
        this_update=NOW - datetime.timedelta(days=30), next_update=NOW - datetime.timedelta(hours=1)
    )
    with pytest.raises(EvidenceError, match=r"Genoa CRL expired at .*, it is 2025-06-01"):
        world.appraiser().verify(world.report(), [world.vcek.cert], NOW)


def test_crl_not_signed_by_the_ark_is_refused(world: World) -> None:
    world.kds.crls[Product.GENOA] = world.pki.crl(
        this_update=NOW - datetime.timedelta(days=1),
        next_update=NOW + datetime.timedelta(days=7),
        signer=world.pki.ask,
    )
    with pytest.raises(EvidenceError, match="CRL signature does not verify"):
        world.appraiser().verify(world.report(), [world.vcek.cert], NOW)


def test_expired_vcek_is_refused(world: World) -> None:
    old = world.pki.endorsement_key(TCB, chip_id=CHIP, days=30)
    with pytest.raises(EvidenceError, match="is not valid at"):
        world.appraiser().verify(world.report(key=old), [old.cert], NOW)


def test_bad_signature_algo_is_refused(world: World) -> None:
    with pytest.raises(EvidenceError, match="signature algorithm is 2, expected 1"):
        world.appraiser().verify(world.report(signature_algo=2), [world.vcek.cert], NOW)


def test_unknown_signing_key_is_refused(world: World) -> None:
    with pytest.raises(EvidenceError, match="SIGNING_KEY is 7"):
        world.appraiser().verify(world.report(signing_key=7), [world.vcek.cert], NOW)


def test_version_2_report_without_its_key_is_refused() -> None:
    with pytest.raises(EvidenceError, match="version 2 SNP report does not name its processor"):
        _skip_crl_appraiser().verify(parse_report(_der("test-report.bin")), [], NOW)


def test_masked_chip_id_cannot_fetch_a_vcek(world: World) -> None:
    with pytest.raises(EvidenceError, match="CHIP_ID is masked"):
        world.appraiser().verify(world.report(chip_id=bytes(64)), [], NOW)


def test_kds_unavailable_is_service_unavailable(world: World) -> None:
    world.kds.available = False
    with pytest.raises(
        ServiceUnavailableError,
        match=r"VCEK for Genoa hwid .* could not be fetched: vcek: connection refused",
    ):
        world.appraiser().verify(world.report(), [], NOW)


# --- the snp TEE: bindings and evidence ----------------------------------------------------------


def _verifier(world: World) -> SnpVerifier:
    return SnpVerifier(world.appraiser(), clock=NOW.timestamp)


def test_snp_verifier_binds_report_data_and_host_data(world: World) -> None:
    digest, init_digest = os.urandom(48), os.urandom(32)
    report = world.report(report_data=digest + bytes(16), host_data=init_digest)
    (claims,) = _verifier(world).verify(
        evidence(report, ("VCEK", world.vcek.der())),
        expected_report_data=digest,
        expected_init_data=init_digest,
    )
    assert claims.claims["report_data"] == (digest + bytes(16)).hex()
    assert claims.claims["init_data"] == init_digest.hex()


def test_report_data_mismatch_is_refused(world: World) -> None:
    report = world.report(report_data=b"\x01" * 48 + bytes(16))
    with pytest.raises(EvidenceError, match="REPORT_DATA does not match"):
        _verifier(world).verify(
            evidence(report, ("VCEK", world.vcek.der())),
            expected_report_data=b"\x02" * 48,
            expected_init_data=None,
        )
    assert world.kds.asked == []  # refused before any collateral is fetched


def test_host_data_mismatch_is_refused(world: World) -> None:
    report = world.report(host_data=b"\x01" * 32)
    with pytest.raises(EvidenceError, match="HOST_DATA does not match the init-data digest"):
        _verifier(world).verify(
            evidence(report, ("VCEK", world.vcek.der())),
            expected_report_data=None,
            expected_init_data=b"\x02" * 32,
        )


def test_vmpl_above_zero_is_refused(world: World) -> None:
    with pytest.raises(EvidenceError, match="VMPL 1, not 0"):
        _verifier(world).verify(
            evidence(world.report(vmpl=1), ("VCEK", world.vcek.der())),
            expected_report_data=None,
            expected_init_data=None,
        )


@pytest.mark.parametrize(
    ("unverified", "reason"),
    [
        ({"quote": "x"}, "`attestation_report` object"),
        ({"attestation_report": {}}, "malformed"),
        ("report", "`attestation_report` object"),
    ],
)
def test_malformed_evidence_is_refused(world: World, unverified: Any, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        _verifier(world).verify(unverified, expected_report_data=None, expected_init_data=None)


@pytest.mark.parametrize(
    ("chain", "reason"),
    [
        ("VCEK", "null or a list"),
        ([{"cert_type": "VCEK", "data": "MII="}], "VCEK data is not bytes"),
        ([{"cert_type": "VCEK", "data": [300]}], "VCEK data is not bytes"),
        ([{"cert_type": "ASK", "data": [1, 2, 3]}], "ASK is no certificate"),
        ([{"data": []}], "not {cert_type, data}"),
        ([{"cert_type": "Empty", "data": []}] * 17, "at most 16"),
    ],
)
def test_malformed_cert_chain_is_refused(world: World, chain: Any, reason: str) -> None:
    document = evidence(world.report())
    document["cert_chain"] = chain
    with pytest.raises(EvidenceError, match=reason):
        _verifier(world).verify(document, expected_report_data=None, expected_init_data=None)


def test_snp_and_azure_verifiers_are_registered_without_touching_the_network() -> None:
    config = {"snp": {"kds_url": "https://kds.invalid", "timeout": 1}}
    verifiers = build_verifiers(config)
    assert isinstance(verifiers[Tee.SNP], SnpVerifier)
    assert isinstance(verifiers[Tee.AZ_SNP_VTPM], AzSnpVtpmVerifier)
    assert isinstance(verifiers[Tee.AZ_TDX_VTPM], AzTdxVtpmVerifier)
    assert all(verifiers[t].may_block for t in (Tee.SNP, Tee.AZ_SNP_VTPM, Tee.AZ_TDX_VTPM))

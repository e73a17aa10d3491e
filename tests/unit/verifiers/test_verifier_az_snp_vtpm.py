"""The az-snp-vtpm verifier: every recorded Azure SNP vector verified to the pinned AMD roots
with the real SnpAppraiser, upstream's claims, and one named test per attack.

AMD's real ARK CRLs are not in the vectors, so the recorded evidence is appraised with
``insecure_skip_crl`` and a KDS double that records every request (none may be made: the VCEK
comes with the evidence). The CRL path, init-data binding and VMPL are shown on evidence the
stand-ins make (the AMD PKI stand-in signs the SNP report, the Azure stand-in writes the HCL
report and the vTPM quote), appraised with the stand-in's roots and a served CRL.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.amd.snp import SnpAppraiser, parse_report
from keybroker.verifiers.amd.snp_certs import KeyKind, load_certificates
from keybroker.verifiers.amd.snp_fetcher import SnpCollateralFetcher, VcekRequest
from keybroker.verifiers.amd.snp_report import Product, TcbVersion
from keybroker.verifiers.azure.az_hcl import (
    HclReportType,
    check_runtime_data_binding,
    parse_hcl_report,
)
from keybroker.verifiers.azure.az_snp_vtpm import AzSnpVtpmVerifier
from keybroker.verifiers.azure.az_vtpm import b64url_bytes
from keybroker.verifiers.tpm.quote import init_data_pcr_value
from standins.amd_pki import AmdPki, Issued, build_report
from standins.azure_vtpm import AzureVtpm, b64url, hcl_report

NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)  # the recorded VCEKs are valid
CHALLENGE = b"challenge"  # the nonce of the v0, v1 and genoa recordings
V2_REPORT_DATA = bytes.fromhex(
    "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9a"
    "a398f647caa2338748cd0fd9f5f819ef"
)
GENOA_REPORT_DATA = bytes.fromhex(
    "0218488bae25d2509232bf676f1a66a30d7372add909109b36016ef136f2938c"
    "a05475f8b46094de6b64270ea35d950f"
)
MILAN_PCR0 = "e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced"
V2_PCR0 = "84275b2f4312cd4fc6cbe6b152ad3c3683e513d9f1e23c34fca160c8cca7a6a7"
GENOA_PCR0 = "afd689d0bb1c5f36f023fbaf574135f555a28a10c1f6b938d2a25e70c7783338"
# (file, the session digest it is bound to, its PCR 0), as upstream's tests expect them
RECORDINGS = [
    ("evidence-v0.json", CHALLENGE, MILAN_PCR0),
    ("evidence-v1.json", CHALLENGE, MILAN_PCR0),
    ("evidence-v2.json", V2_REPORT_DATA, V2_PCR0),
    ("evidence-genoa.json", GENOA_REPORT_DATA, GENOA_PCR0),
]
UPSTREAM_CLAIMS = {
    "policy_abi_major",
    "policy_abi_minor",
    "policy_smt_allowed",
    "policy_migrate_ma",
    "policy_debug_allowed",
    "policy_single_socket",
    "reported_tcb_bootloader",
    "reported_tcb_tee",
    "reported_tcb_snp",
    "reported_tcb_microcode",
    "platform_tsme_enabled",
    "platform_smt_enabled",
    "measurement",
    "report_data",
    "init_data",
    "tpm",
}


class RecordingKds(SnpCollateralFetcher):
    """Collateral in memory behind the real fetcher interface; every request is recorded, and
    whatever it does not hold fails as an unreachable KDS would."""

    def __init__(self, crl: bytes | None = None) -> None:
        self.crl_der = crl
        self.asked: list[str] = []

    def _vcek(self, request: VcekRequest) -> bytes:
        self.asked.append("vcek")
        raise ConnectionError("no network in unit tests")

    def _crl(self, product: Product) -> bytes:
        self.asked.append(f"crl {product}")
        if self.crl_der is None:
            raise ConnectionError("no network in unit tests")
        return self.crl_der

    def _cert_chain(self, product: Product, kind: KeyKind) -> bytes:
        self.asked.append("cert_chain")
        raise ConnectionError("no network in unit tests")


def _folder() -> Path:
    return vector("verifier", "az-snp-vtpm")


def _recording(name: str) -> dict[str, Any]:
    document = json.loads((_folder() / name).read_text())
    assert isinstance(document, dict)
    return document


def _pinned(kds: RecordingKds | None = None) -> AzSnpVtpmVerifier:
    appraiser = SnpAppraiser(kds or RecordingKds(), insecure_skip_crl=True)
    return AzSnpVtpmVerifier(appraiser, clock=NOW.timestamp)


def _verify(
    evidence: JsonValue,
    report_data: bytes | None = CHALLENGE,
    init_data: bytes | None = None,
    verifier: AzSnpVtpmVerifier | None = None,
) -> dict[str, JsonValue]:
    [result] = (verifier or _pinned()).verify(
        evidence, expected_report_data=report_data, expected_init_data=init_data
    )
    assert (result.tee, result.tee_class) == (Tee.AZ_SNP_VTPM, "cpu")
    return result.claims


# --- the recordings, to the pinned AMD roots ------------------------------------------------


@pytest.mark.parametrize(("name", "report_data", "pcr00"), RECORDINGS)
def test_recorded_evidence_verifies_to_the_pinned_roots(
    name: str, report_data: bytes, pcr00: str
) -> None:
    kds = RecordingKds()
    claims = _verify(_recording(name), report_data, verifier=_pinned(kds))
    assert claims["report_data"] == report_data.hex()
    tpm = claims["tpm"]
    assert isinstance(tpm, dict) and tpm["pcr00"] == pcr00
    assert kds.asked == []  # the VCEK came with the evidence; the CRL check was skipped


def test_claims_have_upstreams_names_and_encodings() -> None:
    evidence = _recording("evidence-v1.json")
    claims = _verify(evidence)
    assert set(claims) == UPSTREAM_CLAIMS
    assert claims["policy_abi_major"] == "0" and claims["policy_abi_minor"] == "31"
    assert claims["policy_smt_allowed"] == "true" and claims["policy_debug_allowed"] == "false"
    assert claims["platform_smt_enabled"] == "true" and claims["platform_tsme_enabled"] == "false"
    assert (claims["reported_tcb_bootloader"], claims["reported_tcb_snp"]) == ("4", "24")
    assert claims["reported_tcb_microcode"] == "219" and claims["reported_tcb_tee"] == "0"
    assert claims["measurement"] == (
        "agY76d159jcchC5ID43DtccllhNE5XEw6Ixa30no9/bHm3Wl63f8dplZ9K6y+UAe"
    )  # standard base64, as upstream encodes it
    tpm = claims["tpm"]
    assert isinstance(tpm, dict) and sorted(tpm) == [f"pcr{i:02}" for i in range(24)]
    assert tpm["pcr08"] == claims["init_data"] == "00" * 32  # init_data is PCR 8, not HOST_DATA
    assert tpm["pcr23"] == evidence["tpm_quote"]["pcrs"][23]


def test_v0_and_v1_encodings_of_one_quote_give_the_same_claims() -> None:
    assert _verify(_recording("evidence-v0.json")) == _verify(_recording("evidence-v1.json"))


def test_genoa_vcek_file_is_the_genoa_evidences_vcek() -> None:
    evidence = _recording("evidence-genoa.json")
    evidence["vcek"] = (_folder() / "vcek-genoa.pem").read_text()
    claims = _verify(evidence, GENOA_REPORT_DATA)
    assert claims["reported_tcb_bootloader"] == "10"


def test_recorded_hcl_report_binds_its_runtime_data_and_verifies_with_vcek_pem() -> None:
    """``hcl-report.bin`` with ``vcek.pem`` (VCEK, ASK, ARK): the SNP report is genuine and its
    REPORT_DATA is the runtime data's hash."""
    hcl = parse_hcl_report((_folder() / "hcl-report.bin").read_bytes(), HclReportType.SNP)
    report = parse_report(hcl.hw_report)
    check_runtime_data_binding(hcl, report.report_data, "SNP report")
    certs = load_certificates((_folder() / "vcek.pem").read_bytes())
    SnpAppraiser(RecordingKds(), insecure_skip_crl=True).verify(report, certs, NOW)
    assert hcl.runtime_data.user_data == bytes(64)
    assert hcl.runtime_data.attestation_key.key_size == 2048


# --- attacks on the recordings ---------------------------------------------------------------


def test_tpm_quote_with_wrong_nonce_is_refused() -> None:
    """A quote recorded for another session (replay)."""
    with pytest.raises(EvidenceError, match=r"nonce \(extraData\) does not match"):
        _verify(_recording("evidence-v1.json"), b"challengf")


def test_nonce_is_compared_exactly_not_as_a_prefix() -> None:
    with pytest.raises(EvidenceError, match="does not match"):
        _verify(_recording("evidence-v1.json"), CHALLENGE + bytes(23))


def test_tampered_pcr_value_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    pcr = bytearray.fromhex(evidence["tpm_quote"]["pcrs"][11])
    pcr[0] ^= 1
    evidence["tpm_quote"]["pcrs"][11] = pcr.hex()
    with pytest.raises(EvidenceError, match="PCR values do not hash"):
        _verify(evidence)


def test_flipped_bit_in_tpm_quote_signature_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    signature = bytearray.fromhex(evidence["tpm_quote"]["signature"])
    signature[0] ^= 1
    evidence["tpm_quote"]["signature"] = signature.hex()
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(evidence)


def test_tpm_quote_signed_by_an_ak_not_in_the_hcl_runtime_data_is_refused() -> None:
    """Another VM's vTPM quote (same nonce), carried with this VM's HCL report."""
    evidence = _recording("evidence-v1.json")
    other = json.loads(vector("verifier", "az-tdx-vtpm", "evidence-v1.json").read_text())
    evidence["tpm_quote"] = other["tpm_quote"]
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(evidence)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


def test_hcl_runtime_data_that_does_not_hash_to_report_data_is_refused() -> None:
    evidence = _recording("evidence-v0.json")
    raw = bytes(evidence["report"])
    at = raw.index(b'"vmUniqueId":"') + 15  # a character of the VM id: still valid JSON
    evidence["report"] = list(_flip(raw, at))
    with pytest.raises(EvidenceError, match="runtime data does not hash to the SNP report"):
        _verify(evidence)


def test_flipped_bit_in_the_hcl_snp_report_is_refused() -> None:
    evidence = _recording("evidence-v0.json")
    evidence["report"] = list(_flip(bytes(evidence["report"]), 32 + 0x90))  # MEASUREMENT
    with pytest.raises(EvidenceError, match="SNP report signature does not verify"):
        _verify(evidence)


def test_hcl_report_of_a_tdx_vm_is_refused() -> None:
    evidence = _recording("evidence-v1.json")
    other = json.loads(vector("verifier", "az-tdx-vtpm", "evidence-v1.json").read_text())
    evidence["hcl_report"] = other["hcl_report"]
    with pytest.raises(EvidenceError, match="type 4, expected SNP"):
        _verify(evidence)


def test_unknown_evidence_version_is_refused() -> None:
    evidence = _recording("evidence-v2.json")
    evidence["version"] = 3
    with pytest.raises(EvidenceError, match="version 3 is not supported"):
        _verify(evidence, V2_REPORT_DATA)


@pytest.mark.parametrize("member", ["hcl_report", "vcek"])
def test_malformed_base64_is_refused(member: str) -> None:
    evidence = _recording("evidence-v1.json")
    evidence[member] = "SENMQQ+/" + evidence[member][8:]  # the standard alphabet, not URL-safe
    with pytest.raises(EvidenceError, match="not URL-safe base64"):
        _verify(evidence)


def test_unpadded_base64url_is_accepted() -> None:
    evidence = _recording("evidence-v1.json")
    evidence["hcl_report"] = evidence["hcl_report"].rstrip("=")
    evidence["vcek"] = evidence["vcek"].rstrip("=")
    assert _verify(evidence)["report_data"] == CHALLENGE.hex()


def test_version_2_requires_the_report_data_in_the_hcl_user_data() -> None:
    """A version 1 recording relabelled version 2: its user-data (zeros) does not carry the
    session digest, which version 2 promises."""
    evidence = _recording("evidence-v1.json")
    evidence["version"] = 2
    with pytest.raises(EvidenceError, match="user-data does not start with"):
        _verify(evidence)


def test_evidence_without_runtime_data_is_refused() -> None:
    with pytest.raises(EvidenceError, match="without runtime data"):
        _verify(_recording("evidence-v1.json"), None)


def test_init_data_not_in_pcr8_is_refused() -> None:
    with pytest.raises(EvidenceError, match="PCR 8 does not match the init-data digest"):
        _verify(_recording("evidence-v1.json"), init_data=bytes(32))


def test_init_data_digest_other_than_sha256_is_refused() -> None:
    with pytest.raises(EvidenceError, match="binds a 32-byte"):
        _verify(_recording("evidence-v1.json"), init_data=bytes(48))


def _v1_with(path: tuple[str, ...], value: JsonValue) -> dict[str, Any]:
    evidence = _recording("evidence-v1.json")
    target = evidence
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return evidence


def _v0_with_report_byte(value: int) -> dict[str, Any]:
    evidence = _recording("evidence-v0.json")
    evidence["report"][100] = value
    return evidence


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        ([], "must be a JSON object"),
        ("x", "must be a JSON object"),
        ({}, "has no `quote`"),
        ({"version": True}, "version True is not supported"),
        ({"version": "1"}, "version '1' is not supported"),
        (_v1_with(("tpm_quote",), None), "has no `tpm_quote`"),
        (_v1_with(("vcek",), None), "has no `vcek`"),
        (_v1_with(("tpm_quote", "pcrs"), "00"), "`pcrs` is not a list"),
        (_v1_with(("tpm_quote", "message"), "ff5"), "message is not a hex string"),
        (_v1_with(("tpm_quote", "signature"), [1, 2]), "signature is not a hex string"),
        (_v1_with(("vcek",), b64url(b"not a certificate")), "VCEK does not parse"),
        (_v1_with(("hcl_report",), b64url(b"HCLA")), "shorter than its fixed"),
        (_v0_with_report_byte(256), "HCL report is not a list of bytes"),
    ],
    ids=[
        "array",
        "string",
        "empty",
        "bool-version",
        "string-version",
        "no-quote",
        "no-vcek",
        "pcrs-not-list",
        "odd-hex",
        "list-signature-in-v1",
        "bad-vcek",
        "short-hcl",
        "v0-byte-out-of-range",
    ],
)
def test_malformed_evidence_is_refused(evidence: JsonValue, match: str) -> None:
    with pytest.raises(EvidenceError, match=match):
        _verify(evidence)


def test_v0_vcek_must_be_pem() -> None:
    evidence = _recording("evidence-v0.json")
    evidence["vcek"] = _recording("evidence-v1.json")["vcek"]
    with pytest.raises(EvidenceError, match="PEM"):
        _verify(evidence)


# --- stand-in evidence: CRL, init data, VMPL ---------------------------------------------------

TCB = TcbVersion(bootloader=4, tee=0, snp=24, microcode=219)
CHIP = bytes(range(64))
SESSION = hashlib.sha384(b"a session's runtime data").digest()


@pytest.fixture(scope="module")
def pki() -> AmdPki:
    return AmdPki(Product.GENOA)


@dataclass
class Azure:
    """One Azure SNP VM made of stand-ins, and a verifier trusting the stand-in AMD PKI."""

    pki: AmdPki
    vcek: Issued
    vtpm: AzureVtpm
    kds: RecordingKds

    def evidence(
        self,
        nonce: bytes = SESSION,
        *,
        vmpl: int = 0,
        runtime: bytes | None = None,
        quote_signer: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, JsonValue]:
        runtime = runtime or self.vtpm.runtime_data(nonce.ljust(64, b"\0"))
        report = build_report(
            self.vcek.signer(),
            product=Product.GENOA,
            tcb=TCB,
            chip_id=CHIP,
            report_data=hashlib.sha256(runtime).digest() + bytes(32),
            vmpl=vmpl,
        )
        return {
            "version": 2,
            "tpm_quote": self.vtpm.quote(nonce, signer=quote_signer),
            "hcl_report": b64url(hcl_report(report, runtime)),
            "vcek": b64url(self.vcek.der()),
        }

    def verifier(self) -> AzSnpVtpmVerifier:
        appraiser = SnpAppraiser(self.kds, roots=self.pki.roots())
        return AzSnpVtpmVerifier(appraiser, clock=NOW.timestamp)


@pytest.fixture
def azure(pki: AmdPki) -> Azure:
    crl = pki.crl(
        this_update=NOW - datetime.timedelta(days=1), next_update=NOW + datetime.timedelta(days=7)
    )
    return Azure(pki, pki.endorsement_key(TCB, chip_id=CHIP), AzureVtpm(), RecordingKds(crl))


def test_stand_in_evidence_verifies_with_the_crl_checked(azure: Azure) -> None:
    claims = _verify(azure.evidence(), SESSION, verifier=azure.verifier())
    assert azure.kds.asked == ["crl Genoa"]
    assert claims["report_data"] == SESSION.hex()


def test_init_data_bound_in_pcr8_verifies(azure: Azure) -> None:
    digest = hashlib.sha256(b"init-data TOML").digest()
    azure.vtpm.extend(8, digest)
    claims = _verify(azure.evidence(), SESSION, digest, verifier=azure.verifier())
    assert claims["init_data"] == init_data_pcr_value(digest).hex()
    with pytest.raises(EvidenceError, match="PCR 8 does not match"):
        _verify(azure.evidence(), SESSION, bytes(32), verifier=azure.verifier())


def test_revoked_ask_is_refused(azure: Azure) -> None:
    azure.kds.crl_der = azure.pki.crl(
        this_update=NOW - datetime.timedelta(days=1),
        next_update=NOW + datetime.timedelta(days=7),
        revoked=(azure.pki.ask.cert,),
    )
    with pytest.raises(EvidenceError, match="revoked"):
        _verify(azure.evidence(), SESSION, verifier=azure.verifier())


def test_snp_report_requested_above_vmpl0_is_refused(azure: Azure) -> None:
    """A report the guest OS (VMPL 1+) asked for could carry any runtime data it liked."""
    with pytest.raises(EvidenceError, match="VMPL 1, not 0"):
        _verify(azure.evidence(vmpl=1), SESSION, verifier=azure.verifier())


def test_tpm_quote_signed_by_an_attackers_key_is_refused(azure: Azure) -> None:
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(azure.evidence(quote_signer=attacker), SESSION, verifier=azure.verifier())


def test_attackers_ak_in_the_runtime_data_is_refused(azure: Azure) -> None:
    """The attacker signs the quote with its own key and names that key in the HCL runtime
    data: the TPM layer passes, but the genuine SNP report hashes the genuine runtime data."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    genuine = azure.evidence()
    forged = azure.evidence(quote_signer=attacker)
    hcl = parse_hcl_report(b64url_bytes(genuine["hcl_report"], "HCL"), HclReportType.SNP)
    runtime = azure.vtpm.runtime_data(SESSION.ljust(64, b"\0"), ak=attacker.public_key())
    forged["hcl_report"] = b64url(hcl_report(hcl.hw_report, runtime))
    with pytest.raises(EvidenceError, match="runtime data does not hash to the SNP report"):
        _verify(forged, SESSION, verifier=azure.verifier())


def test_user_data_of_another_session_is_refused(azure: Azure) -> None:
    runtime = azure.vtpm.runtime_data(hashlib.sha384(b"another session").digest())
    with pytest.raises(EvidenceError, match="user-data does not start with"):
        _verify(azure.evidence(runtime=runtime), SESSION, verifier=azure.verifier())

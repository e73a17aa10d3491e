"""The Hygon CSV verifier: upstream's vector, csv-rs's recorded genuine chain, a test PKI, and
the named attacks (each must be refused)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import vector
from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.protocol.models import Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.hygon.certs import (
    CA_CERT,
    CSV_CERT,
    CsvCertificate,
    Usage,
    pinned_hrk,
    split_hsk_cek,
    verify_chain,
    verify_signed_by,
)
from keybroker.verifiers.hygon.collateral import HskCekFetcher, HygonDirectoryFetcher
from keybroker.verifiers.hygon.csv import CsvVerifier, parse_wrapper
from keybroker.verifiers.hygon.csv_report import EXT_MAGIC
from keybroker.verifiers.hygon.layout import encode
from keybroker.verifiers.tcg.eventlog import parse_event_log, replay_registers
from standins.hygon_pki import HygonPki, to_json

DIGEST = bytes(range(48))  # a SHA-384 runtime-data digest
MEASURE = bytes.fromhex("ae2a2cf1f41a485fa37bf9ae92f678783c59fbc79de7b5d237743d58f5538034")
UPSTREAM_CLAIMS = {
    "version", "policy", "user_pubkey_digest", "vm_id", "vm_version", "report_data", "mnonce",
    "measure", "sig_usage", "sig_algo", "serial_number",
}  # fmt: skip
POLICY_CLAIMS = {
    "nodbg", "noks", "es", "nosend", "domain", "csv", "csv3", "asid_reuse", "hsk_version",
    "cek_version", "api_major", "api_minor",
}  # fmt: skip


class Fixed(HskCekFetcher):
    """An HSK/CEK source holding given files (or none), recording what was asked."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.asked: list[str] = []

    def _hsk_cek(self, chip_id: str) -> bytes:
        self.asked.append(chip_id)
        if chip_id not in self.files:
            raise ServiceUnavailableError(f"no HSK/CEK for {chip_id}")
        return self.files[chip_id]


@pytest.fixture(scope="module")
def pki() -> HygonPki:
    return HygonPki()


def _verify(
    pki: HygonPki, evidence: Any, expected: bytes | None = DIGEST, hrk: bool = True
) -> dict[str, Any]:
    verifier = CsvVerifier(Fixed({"TESTCHIP0001": pki.hsk_cek}), hrk=pki.hrk if hrk else None)
    (claims,) = verifier.verify(evidence, expected_report_data=expected, expected_init_data=None)
    assert claims.tee is Tee.CSV and claims.tee_class == "cpu"
    return claims.claims


def _v1(pki: HygonPki, **kwargs: Any) -> dict[str, Any]:
    return pki.csv_evidence(pki.csv_report_v1(DIGEST, measure=MEASURE, **kwargs))


# --- upstream's vector and csv-rs's recorded chain -------------------------------------------


def _upstream_vector() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(vector("verifier", "csv_evidence.json").read_text())
    return loaded


def test_upstream_vector_report_is_signed_by_the_pek_it_carries() -> None:
    evidence = _upstream_vector()
    report = parse_wrapper(evidence["attestation_report"])
    pek_raw = encode(CSV_CERT, evidence["cert_chain"]["pek"], "pek")
    pek = CsvCertificate.from_bytes(pek_raw, "PEK")
    verify_signed_by(pek, Usage.PEK, report.signed, report.signature, "CSV report")
    assert report.version == 1 and report.measure == MEASURE


def test_upstream_vector_needs_its_chips_hsk_cek_and_asks_for_it_by_serial() -> None:
    # the vector carries no HSK/CEK; upstream downloads them from Hygon's KDS
    fetcher = Fixed({})
    with pytest.raises(ServiceUnavailableError, match="KPA64911240507"):
        CsvVerifier(fetcher).verify(
            _upstream_vector(), expected_report_data=None, expected_init_data=None
        )
    assert fetcher.asked == ["KPA64911240507"]


def _recorded_csv_rs_evidence() -> tuple[dict[str, Any], bytes]:
    raw = vector("verifier", "hygon", "csv-rs-report.cert").read_bytes()
    anonce = int.from_bytes(raw[188:192], "little")
    mask = anonce.to_bytes(4, "little")
    signer = bytes(b ^ mask[i % 4] for i, b in enumerate(raw[336 : 336 + 2084 + 64]))
    evidence = {
        "attestation_report": {"magic": [0] * 16, "flags": 0, "data": list(raw.ljust(4096, b"\0"))},
        "cert_chain": {"pek": to_json(CSV_CERT, signer[:2084])},
        "serial_number": list(signer[2084:]),
        "cc_eventlog": None,
    }
    return evidence, vector("verifier", "hygon", "csv-rs-hsk_cek.cert").read_bytes()


def test_recorded_genuine_chain_verifies_to_the_pinned_hrk(tmp_path: Path) -> None:
    evidence, hsk_cek = _recorded_csv_rs_evidence()
    folder = tmp_path / "hsk_cek" / "NZA9T14052605"
    folder.mkdir(parents=True)
    (folder / "hsk_cek.cert").write_bytes(hsk_cek)
    (claims,) = CsvVerifier(HygonDirectoryFetcher(tmp_path)).verify(
        evidence, expected_report_data=b"user data", expected_init_data=None
    )
    assert claims.claims["serial_number"] == "NZA9T14052605"
    assert claims.claims["report_data"] == b"user data".ljust(64, b"\0").hex()
    assert claims.claims["version"] == "1"
    assert set(claims.claims) == UPSTREAM_CLAIMS | {"anonce"}


def test_recorded_chain_carried_in_the_evidence_verifies_without_a_fetch() -> None:
    evidence, hsk_cek = _recorded_csv_rs_evidence()
    hsk, cek = split_hsk_cek(hsk_cek)
    evidence["cert_chain"]["hsk_cek"] = {
        "hsk": to_json(CA_CERT, hsk_cek[:832]),
        "cek": to_json(CSV_CERT, hsk_cek[832:]),
    }
    verify_chain(pinned_hrk(), hsk, cek, None)
    fetcher = Fixed({})
    CsvVerifier(fetcher).verify(
        evidence, expected_report_data=b"user data", expected_init_data=None
    )
    assert fetcher.asked == []


def test_csv_is_registered() -> None:
    verifiers = build_verifiers({"hygon": {"offline_dir": "/nonexistent"}})
    assert isinstance(verifiers[Tee.CSV], CsvVerifier)


# --- the test PKI: what verifies ---------------------------------------------------------------


def test_version_1_report_yields_upstreams_claims(pki: HygonPki) -> None:
    claims = _verify(pki, _v1(pki, policy=0x00060001))
    assert set(claims) == UPSTREAM_CLAIMS | {"anonce"}
    assert set(claims["policy"]) == POLICY_CLAIMS
    assert claims["policy"]["nodbg"] == 1 and claims["policy"]["api_major"] == 6
    assert claims["measure"] == MEASURE.hex()
    assert claims["sig_usage"] == "02100000" and claims["sig_algo"] == "04000000"
    assert claims["anonce"] == "26d7c75d"
    assert claims["serial_number"] == "TESTCHIP0001"


def test_version_2_report_yields_build_and_rtmrs(pki: HygonPki) -> None:
    rtmrs = [bytes([i]) * 32 for i in range(5)]
    report = pki.csv_report_v2(DIGEST, measure=MEASURE, rtmrs=rtmrs)
    claims = _verify(pki, pki.csv_evidence(report, version=2, with_hsk_cek=True))
    assert claims["version"] == "2" and claims["build"] == 2337 and claims["rtmr_version"] == 1
    assert [claims[f"rtmr{i}"] for i in range(5)] == [r.hex() for r in rtmrs]
    assert "anonce" not in claims


def _csv_event_log() -> tuple[str, list[bytes]]:
    raw = vector("eventlog", "CCEL_data_csv").read_bytes()
    registers = replay_registers(parse_event_log(raw).events, "SM3", 4)
    return base64.b64encode(raw).decode(), [bytes(32), *registers]


def test_version_2_event_log_that_replays_to_rtmr1_to_4_is_kept(pki: HygonPki) -> None:
    log, rtmrs = _csv_event_log()
    report = pki.csv_report_v2(DIGEST, measure=MEASURE, rtmrs=rtmrs)
    claims = _verify(pki, pki.csv_evidence(report, version=2, cc_eventlog=log))
    assert len(claims["uefi_event_logs"]) > 0


def test_event_log_that_does_not_replay_to_the_rtmrs_is_refused(pki: HygonPki) -> None:
    log, rtmrs = _csv_event_log()
    rtmrs[3] = bytes(32)
    report = pki.csv_report_v2(DIGEST, measure=MEASURE, rtmrs=rtmrs)
    with pytest.raises(EvidenceError, match="RTMR3"):
        _verify(pki, pki.csv_evidence(report, version=2, cc_eventlog=log))


# --- named attacks -------------------------------------------------------------------------


def test_flipped_signature_byte_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["attestation_report"]["data"][200] ^= 0x01  # inside the signature's r
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(pki, evidence)


def test_flipped_signed_byte_of_the_report_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["attestation_report"]["data"][150] ^= 0x01  # inside MEASURE
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(pki, evidence)


def test_flipped_pek_signature_byte_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["cert_chain"]["pek"]["sigs"][0]["signature"]["s"][3] ^= 0x01
    with pytest.raises(EvidenceError, match="PEK certificate verifies"):
        _verify(pki, evidence)


def test_wrong_nonce_is_refused(pki: HygonPki) -> None:
    with pytest.raises(EvidenceError, match="REPORT_DATA does not match"):
        _verify(pki, _v1(pki), expected=bytes(48))


def test_version_1_anonce_changed_by_a_relay_breaks_the_binding(pki: HygonPki) -> None:
    # anonce is outside the signed bytes: changing it alters every decoded field (here: turns
    # debugging off), and the report-data binding is what catches it
    evidence = _v1(pki, policy=0x0)
    data = evidence["attestation_report"]["data"]
    data[188] ^= 0x01
    with pytest.raises(EvidenceError, match="REPORT_DATA does not match"):
        _verify(pki, evidence)


def test_chain_to_unpinned_root_is_refused(pki: HygonPki) -> None:
    with pytest.raises(EvidenceError, match="HSK"):
        _verify(pki, _v1(pki), hrk=False)  # the pinned Hygon HRK did not sign the test HSK


def test_chain_from_another_test_root_is_refused(pki: HygonPki) -> None:
    other = HygonPki()
    evidence = pki.csv_evidence(pki.csv_report_v1(DIGEST, measure=MEASURE), with_hsk_cek=True)
    verifier = CsvVerifier(Fixed({}), hrk=other.hrk)
    with pytest.raises(EvidenceError):
        verifier.verify(evidence, expected_report_data=DIGEST, expected_init_data=None)


def test_truncated_report_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    del evidence["attestation_report"]["data"][-1]
    with pytest.raises(EvidenceError, match="4096 bytes"):
        _verify(pki, evidence)


def test_truncated_certificate_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    del evidence["cert_chain"]["pek"]["body"]["data"]["reserved2"][-1]
    with pytest.raises(EvidenceError, match="608 bytes"):
        _verify(pki, evidence)


def test_pek_certified_for_another_usage_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["cert_chain"]["pek"]["body"]["data"]["pubkey"]["usage"] = int(Usage.CEK)
    with pytest.raises(EvidenceError, match="usage"):
        _verify(pki, evidence)


def test_version_3_report_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["attestation_report"]["magic"] = list(EXT_MAGIC)
    evidence["attestation_report"]["flags"] = 3
    with pytest.raises(EvidenceError, match="unsupported CSV report kind"):
        _verify(pki, evidence)


def test_serial_number_that_is_no_chip_id_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["serial_number"] = list(b"../../etc/passwd")
    with pytest.raises(EvidenceError, match="not a chip id"):
        _verify(pki, evidence)


def test_unknown_certificate_field_is_refused(pki: HygonPki) -> None:
    evidence = copy.deepcopy(_v1(pki))
    evidence["cert_chain"]["pek"]["body"]["extra"] = 1
    with pytest.raises(EvidenceError, match="exactly the fields"):
        _verify(pki, evidence)


def test_byte_list_with_a_boolean_is_refused(pki: HygonPki) -> None:
    evidence = _v1(pki)
    evidence["attestation_report"]["data"][5] = True
    with pytest.raises(EvidenceError, match="list of 4096 bytes"):
        _verify(pki, evidence)

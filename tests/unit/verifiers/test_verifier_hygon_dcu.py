"""The Hygon DCU verifier (a device of a CSV guest), on a test PKI: no upstream vector exists.
HSK/CEK come from a Hygon KDS stand-in over real HTTP through the production fetcher."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from keybroker.errors import EvidenceError, ServiceUnavailableError
from keybroker.protocol.models import Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.hygon.dcu import MAX_REPORTS, HygonDcuVerifier
from keybroker.verifiers.hygon.kds_fetcher import HygonKdsFetcher
from standins.hygon_kds import HygonKdsStandIn
from standins.hygon_pki import HygonPki
from standins.server import ServedApp

DIGEST = bytes(range(100, 148))
MEASURE = bytes(range(32))
UPSTREAM_BODY = {"version", "chip_id", "user_data", "measure", "reserved", "sig_usage", "sig_algo"}


@pytest.fixture(scope="module")
def pki() -> HygonPki:
    return HygonPki()


@dataclass
class Kds:
    stand_in: HygonKdsStandIn
    url: str


@pytest.fixture(scope="module")
def kds(pki: HygonPki) -> Iterator[Kds]:
    stand_in = HygonKdsStandIn()
    stand_in.hsk_ceks["DCU0001"] = pki.hsk_cek
    stand_in.hsk_ceks["DCU0002"] = pki.hsk_cek
    server = ServedApp(stand_in.app())
    server.start()
    yield Kds(stand_in, server.url)
    server.stop()


def _verifier(pki: HygonPki, kds: Kds, *, pinned: bool = False) -> HygonDcuVerifier:
    fetcher = HygonKdsFetcher(kds.url, insecure_http=True)
    return HygonDcuVerifier(fetcher, hrk=None if pinned else pki.hrk)


def _evidence(pki: HygonPki, *chips: bytes, user_data: bytes = DIGEST) -> dict[str, Any]:
    return {
        "attestation_reports": [
            pki.dcu_report(user_data, chip_id=chip, measure=MEASURE) for chip in chips
        ]
    }


def _verify(pki: HygonPki, kds: Kds, evidence: Any, expected: bytes | None = DIGEST) -> list[Any]:
    return _verifier(pki, kds).verify(
        evidence, expected_report_data=expected, expected_init_data=None
    )


def test_every_dcu_yields_upstreams_claims_in_class_dcu(pki: HygonPki, kds: Kds) -> None:
    first, second = _verify(pki, kds, _evidence(pki, b"DCU0001", b"DCU0002"))
    for claims in (first, second):
        assert claims.tee is Tee.HYGON_DCU and claims.tee_class == "dcu"
        assert set(claims.claims) == {"body", "report_data"}
        assert set(claims.claims["body"]) == UPSTREAM_BODY
        assert claims.claims["report_data"] == DIGEST.ljust(64, b"\0").hex()
        assert claims.claims["body"]["sig_usage"] == "1004"
        assert claims.claims["body"]["measure"] == MEASURE.hex()
    assert first.claims["body"]["chip_id"] == b"DCU0001".ljust(16, b"\0").hex()
    assert "snumber=DCU0001" in kds.stand_in.requests
    assert "snumber=DCU0002" in kds.stand_in.requests


def test_hygondcu_is_registered() -> None:
    verifiers = build_verifiers({"hygon": {"offline_dir": "/nonexistent"}})
    assert isinstance(verifiers[Tee.HYGON_DCU], HygonDcuVerifier)


def test_flipped_signature_byte_is_refused(pki: HygonPki, kds: Kds) -> None:
    evidence = _evidence(pki, b"DCU0001")
    evidence["attestation_reports"][0]["sig"]["r"][0] ^= 0x01
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(pki, kds, evidence)


def test_flipped_measure_byte_is_refused(pki: HygonPki, kds: Kds) -> None:
    evidence = _evidence(pki, b"DCU0001")
    evidence["attestation_reports"][0]["body"]["measure"][0] ^= 0x01
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(pki, kds, evidence)


def test_wrong_nonce_is_refused(pki: HygonPki, kds: Kds) -> None:
    with pytest.raises(EvidenceError, match="does not match"):
        _verify(pki, kds, _evidence(pki, b"DCU0001"), expected=bytes(48))


def test_report_without_report_data_to_bind_is_refused(pki: HygonPki, kds: Kds) -> None:
    with pytest.raises(EvidenceError, match="must be bound"):
        _verify(pki, kds, _evidence(pki, b"DCU0001"), expected=None)


def test_chain_to_unpinned_root_is_refused(pki: HygonPki, kds: Kds) -> None:
    verifier = _verifier(pki, kds, pinned=True)  # the real HRK did not sign the test HSK
    with pytest.raises(EvidenceError, match="HSK"):
        verifier.verify(
            _evidence(pki, b"DCU0001"), expected_report_data=DIGEST, expected_init_data=None
        )


def test_truncated_report_is_refused(pki: HygonPki, kds: Kds) -> None:
    evidence = _evidence(pki, b"DCU0001")
    del evidence["attestation_reports"][0]["body"]["user_data"][-1]
    with pytest.raises(EvidenceError, match="64 bytes"):
        _verify(pki, kds, evidence)


def test_too_many_reports_are_refused(pki: HygonPki, kds: Kds) -> None:
    evidence = _evidence(pki, b"DCU0001")
    evidence["attestation_reports"] *= MAX_REPORTS + 1
    with pytest.raises(EvidenceError, match="1 to 16 reports"):
        _verify(pki, kds, evidence)


def test_chip_unknown_to_kds_is_a_service_error(pki: HygonPki, kds: Kds) -> None:
    with pytest.raises(ServiceUnavailableError, match="404"):
        _verify(pki, kds, _evidence(pki, b"DCU9999"))

"""The NVIDIA BlueField DPU verifier on a DICE chain generated per test (upstream has no
recorded DPU evidence), and the attacks it must refuse."""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import FakeClock
from json_shapes import at, mutable_obj, string
from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.nvidia.dpu import NvidiaDpuVerifier
from nvidia_pki import DpuPki, der, dpu_pki, fwid_der, pem, raw_signature

CLOCK = FakeClock()
NOW = datetime.datetime.fromtimestamp(CLOCK.now, datetime.UTC)
REPORT_DATA = hashlib.sha384(b"runtime data").digest()
FWIDS = [hashlib.sha384(b"bootloader").digest(), hashlib.sha384(b"firmware").digest()]


def _verify(
    pki: DpuPki, evidence: Any, report_data: bytes | None = REPORT_DATA, **kwargs: Any
) -> dict[str, Any]:
    verifier = NvidiaDpuVerifier([pki.root], clock=CLOCK, **kwargs)
    verified = verifier.verify(evidence, expected_report_data=report_data, expected_init_data=None)
    assert len(verified) == 1 and verified[0].tee is Tee.NVIDIA_DPU
    assert verified[0].tee_class == "nvidia-dpu"
    return verified[0].claims


def test_genuine_dpu_evidence_verifies_with_upstreams_claims() -> None:
    pki = dpu_pki(NOW, FWIDS)
    claims = _verify(pki, pki.evidence(REPORT_DATA))
    assert claims == {
        "device_serial": format(pki.device_id.serial_number, "x"),
        "device_class": "bluefield3",
        "firmware_layers_count": 2,
        "accumulated_fwid": hashlib.sha384(b"".join(FWIDS)).hexdigest(),
        "alias_timestamp": int(pki.alias.not_valid_before_utc.timestamp()),
        "session_nonce": REPORT_DATA.hex(),
    }


def test_der_encoded_signature_is_accepted() -> None:
    pki = dpu_pki(NOW, FWIDS)
    signed = REPORT_DATA + bytes(16)
    der_signature = pki.alias_key.sign(signed, ec.ECDSA(hashes.SHA384()))
    assert _verify(pki, pki.evidence(REPORT_DATA, signature=der_signature))


def test_upstreams_wrapped_fwid_list_is_read_too() -> None:
    wrapped = der(0x30, der(0xA6, der(0x30, b"".join(fwid_der(f) for f in FWIDS))))
    pki = dpu_pki(NOW, FWIDS, tcb_info_value=wrapped)
    assert _verify(pki, pki.evidence(REPORT_DATA))["firmware_layers_count"] == 2


def test_flipped_signature_byte_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS)
    signature = bytearray(raw_signature(pki.alias_key, REPORT_DATA + bytes(16)))
    signature[10] ^= 0x01
    with pytest.raises(EvidenceError, match="does not verify"):
        _verify(pki, pki.evidence(REPORT_DATA, signature=bytes(signature)))


def test_wrong_nonce_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS)
    evidence = pki.evidence(hashlib.sha384(b"another session").digest())
    with pytest.raises(EvidenceError, match="does not bind this session"):
        _verify(pki, evidence)


def test_empty_signature_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS)
    with pytest.raises(EvidenceError, match="empty"):
        _verify(pki, pki.evidence(REPORT_DATA, signature=b""))


def test_chain_to_an_unpinned_root_is_refused() -> None:
    pki, other = dpu_pki(NOW, FWIDS), dpu_pki(NOW, FWIDS)
    verifier = NvidiaDpuVerifier([other.root], clock=CLOCK)
    with pytest.raises(EvidenceError, match="does not lead to a trusted certificate"):
        verifier.verify(
            pki.evidence(REPORT_DATA), expected_report_data=REPORT_DATA, expected_init_data=None
        )


def test_alias_from_another_device_is_refused() -> None:
    """The DeviceID of one DPU with the Alias (and signature) of another under the same root."""
    pki, other = dpu_pki(NOW, FWIDS), dpu_pki(NOW, FWIDS)
    evidence = pki.evidence(REPORT_DATA)
    alias_cert = at(other.evidence(REPORT_DATA), "devices", 0, "alias_cert")
    mutable_obj(at(evidence, "devices", 0))["alias_cert"] = alias_cert
    with pytest.raises(EvidenceError, match="does not lead to a trusted certificate"):
        _verify(pki, evidence)


@pytest.mark.parametrize("field", ["alias_cert", "device_id_cert"])
def test_truncated_certificate_is_refused(field: str) -> None:
    pki = dpu_pki(NOW, FWIDS)
    evidence = pki.evidence(REPORT_DATA)
    device = mutable_obj(at(evidence, "devices", 0))
    device[field] = base64.b64encode(base64.b64decode(string(device[field]))[:-20]).decode()
    with pytest.raises(EvidenceError, match="not a DER certificate"):
        _verify(pki, evidence)


def test_stale_alias_certificate_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS, alias_age=datetime.timedelta(hours=2))
    with pytest.raises(EvidenceError, match="at most 3600 s"):
        _verify(pki, pki.evidence(REPORT_DATA))
    assert _verify(pki, pki.evidence(REPORT_DATA), max_cert_age=3 * 3600)


def test_alias_certificate_from_the_future_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS, alias_age=-datetime.timedelta(minutes=5))
    with pytest.raises(EvidenceError):
        _verify(pki, pki.evidence(REPORT_DATA))


def test_malformed_tcb_info_is_refused_not_read_as_no_firmware() -> None:
    broken = der(0x30, der(0xA6, der(0x30, der(0x04, b"x"))))
    pki = dpu_pki(NOW, FWIDS, tcb_info_value=broken)
    with pytest.raises(EvidenceError, match="FWID"):
        _verify(pki, pki.evidence(REPORT_DATA))


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2},
        {"devices": []},
        {"devices": ["x", "y"]},
    ],
)
def test_malformed_evidence_is_refused(change: dict[str, Any]) -> None:
    pki = dpu_pki(NOW, FWIDS)
    with pytest.raises(EvidenceError):
        _verify(pki, {**pki.evidence(REPORT_DATA), **change})


def test_two_devices_are_refused_as_upstream() -> None:
    pki = dpu_pki(NOW, FWIDS)
    evidence = pki.evidence(REPORT_DATA)
    evidence["devices"] = evidence["devices"] * 2  # type: ignore[operator]
    with pytest.raises(EvidenceError, match="exactly one device"):
        _verify(pki, evidence)


def test_without_a_configured_root_every_evidence_is_refused() -> None:
    pki = dpu_pki(NOW, FWIDS)
    verifier = build_verifiers(None, clock=CLOCK)[Tee.NVIDIA_DPU]
    with pytest.raises(EvidenceError, match="no DPU root is configured"):
        verifier.verify(
            pki.evidence(REPORT_DATA), expected_report_data=REPORT_DATA, expected_init_data=None
        )


def test_configured_root_file_is_used(tmp_path: Path) -> None:
    pki = dpu_pki(NOW, FWIDS)
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    config = {"nvidia_dpu_verifier": {"root_ca_cert_path": str(tmp_path / "root.pem")}}
    verifier = build_verifiers(config, clock=CLOCK)[Tee.NVIDIA_DPU]
    verified = verifier.verify(
        pki.evidence(REPORT_DATA), expected_report_data=REPORT_DATA, expected_init_data=None
    )
    assert verified[0].claims["device_class"] == "bluefield3"


def test_unreadable_root_file_fails_at_start_up(tmp_path: Path) -> None:
    config = {"nvidia_dpu_verifier": {"root_ca_cert_path": str(tmp_path / "missing.pem")}}
    with pytest.raises(ConfigError, match="root_ca_cert_path"):
        build_verifiers(config, clock=CLOCK)

"""The NVIDIA GPU verifier (local mode) on upstream's recorded Hopper reports, and the attacks
it must refuse. Reports re-signed under a test PKI show each refusal is the check named."""

from __future__ import annotations

import base64
import datetime
import json
from importlib import resources
from typing import Any

import pytest

from conftest import FakeClock, vector
from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.nvidia.gpu import NvidiaVerifier
from keybroker.verifiers.nvidia.gpu_certs import pinned_root
from keybroker.verifiers.nvidia.spdm import REQUEST_SIZE, parse_report
from nvidia_pki import GpuPki, gpu_pki, resign

NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
COCO_REPORT_DATA = bytes.fromhex(
    "87d8e24ab336adafe228d49e83d745f6dba4ae505372b6a5704820856b343fece279b616efefc2aae21da80cf5581250"
)
NOW = datetime.datetime.fromtimestamp(FakeClock().now, datetime.UTC)


def _text(name: str) -> str:
    return vector("verifier", "nvidia", name).read_text()


def _report() -> bytes:
    return bytes.fromhex(_text("hopperAttestationReport.txt").strip())


def _chain(name: str = "hopper_cert_chain_case1.txt") -> str:
    return base64.b64encode(vector("verifier", "nvidia", name).read_bytes()).decode()


def _evidence(report: bytes | str, chain: str | None = None, **device: Any) -> dict[str, Any]:
    entry = {
        "arch": "HOPPER",
        "uuid": "1111-2222-33333-444444-555555",
        "evidence": report if isinstance(report, str) else report.hex(),
        "certificate": chain if chain is not None else _chain(),
        **device,
    }
    return {"device_evidence_list": [entry]}


def _verify(evidence: Any, report_data: bytes | None = NONCE, **kwargs: Any) -> dict[str, Any]:
    verified = NvidiaVerifier(clock=FakeClock(), **kwargs).verify(
        evidence, expected_report_data=report_data, expected_init_data=None
    )
    assert len(verified) == 1 and verified[0].tee is Tee.NVIDIA
    assert verified[0].tee_class == "gpu"
    return verified[0].claims


def test_recorded_hopper_report_verifies_with_upstreams_claims() -> None:
    expected = json.loads(_text("hopperAttestationReport-claims.txt"))
    assert _verify(_evidence(_report())) == expected


def test_recorded_coco_ci_report_verifies_against_its_report_data() -> None:
    """The CI report was bound to a 48-byte SHA-384 digest: its first 32 bytes are the nonce."""
    evidence = _evidence(_text("hopper_coco_report1.txt"), _chain("hopper_coco_certs1.txt"))
    claims = _verify(evidence, COCO_REPORT_DATA)
    assert claims["arch"] == "Hopper" and claims["config"]["driver_version"] == "580.95.05"


def test_base64_encoded_report_is_accepted() -> None:
    encoded = base64.b64encode(_report()).decode()
    assert _verify(_evidence(encoded))["config"]["vbios_version"] == "96.00.9f.00.01"


def test_missing_uuid_reads_unknown_as_upstream() -> None:
    evidence = _evidence(_report())
    del evidence["device_evidence_list"][0]["uuid"]
    assert _verify(evidence)["uuid"] == "unknown"


def test_flipped_signature_byte_is_refused() -> None:
    report = bytearray(_report())
    report[-1] ^= 0x01
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(_evidence(bytes(report)))


def test_flipped_measurement_byte_is_refused() -> None:
    report = bytearray(_report())
    report[REQUEST_SIZE + 20] ^= 0x01  # inside the first measurement block
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(_evidence(bytes(report)))


def test_wrong_nonce_is_refused() -> None:
    with pytest.raises(EvidenceError, match="nonce does not bind"):
        _verify(_evidence(_report()), bytes(32))


def test_missing_report_data_is_refused() -> None:
    with pytest.raises(EvidenceError, match="against report data"):
        _verify(_evidence(_report()), None)


def test_truncated_report_is_refused() -> None:
    report = _report()
    for size in (10, REQUEST_SIZE + 5, len(report) // 2, len(report) - 1):
        with pytest.raises(EvidenceError, match="truncated"):
            _verify(_evidence(report[:size]))


def test_bytes_after_the_signature_are_refused() -> None:
    with pytest.raises(EvidenceError, match="after its signature"):
        _verify(_evidence(_report() + b"\x01"))


def _pki_report(pki: GpuPki, nonce: bytes = NONCE) -> bytes:
    """The recorded report with ``nonce`` in its request, signed by the test PKI's leaf."""
    report = _report()
    signed_size = len(parse_report(report).signed)
    patched = report[:4] + nonce + report[4 + 32 :]
    return resign(patched, signed_size, pki.leaf_key)


def _fwid() -> bytes:
    return bytes.fromhex(str(parse_report(_report()).opaque["fwid"]))


def test_chain_to_an_unpinned_root_is_refused() -> None:
    pki = gpu_pki(_fwid(), NOW)
    evidence = _evidence(_pki_report(pki), pki.chain_b64())
    # the same evidence verifies when its root is trusted: the root is what is refused
    assert _verify(evidence, anchors=[pki.root])["arch"] == "Hopper"
    with pytest.raises(EvidenceError, match="does not lead to a trusted certificate"):
        _verify(evidence)


def test_unpinned_root_with_nvidias_name_is_refused() -> None:
    """A self-signed root named exactly as NVIDIA's, with another key, sent in the chain."""
    pki = gpu_pki(_fwid(), NOW, root_name=pinned_root().subject)
    assert pki.root.subject == pinned_root().subject
    with pytest.raises(EvidenceError, match="does not verify against the root"):
        _verify(_evidence(_pki_report(pki), pki.chain_b64()))


def test_report_signed_by_another_device_key_is_refused() -> None:
    pki = gpu_pki(_fwid(), NOW)
    with pytest.raises(EvidenceError, match="signature does not verify"):
        _verify(_evidence(_pki_report(pki)))  # NVIDIA's recorded chain, the test key's report


def test_fwid_other_than_the_certificates_is_refused() -> None:
    pki = gpu_pki(bytes(48), NOW)
    with pytest.raises(EvidenceError, match="fwid is not the one"):
        _verify(_evidence(_pki_report(pki), pki.chain_b64()), anchors=[pki.root])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("hopper_cert_chain_case2.txt", "must hold the signing certificate"),  # the root alone
        ("hopper_cert_chain_case3.txt", "does not lead to a trusted certificate"),  # ICA missing
        ("hopper_cert_chain_case4.txt", "no FWID extension"),  # the leaf missing
    ],
)
def test_upstreams_broken_chains_are_refused(case: str, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        _verify(_evidence(_report(), _chain(case)))


def test_root_alone_twice_is_refused() -> None:
    root = vector("verifier", "nvidia", "hopper_cert_chain_case2.txt").read_bytes()
    with pytest.raises(EvidenceError, match="leaf is the root"):
        _verify(_evidence(_report(), base64.b64encode(root + root).decode()))


@pytest.mark.parametrize("arch", ["BLACKWELL", "LS10", "Ampere", "hopper"])
def test_devices_other_than_hopper_are_refused(arch: str) -> None:
    with pytest.raises(EvidenceError, match="only Hopper"):
        _verify(_evidence(_report(), arch=arch))


def test_too_many_devices_are_refused() -> None:
    evidence = {"device_evidence_list": _evidence(_report())["device_evidence_list"] * 17}
    with pytest.raises(EvidenceError, match="at most 16"):
        _verify(evidence)


@pytest.mark.parametrize(
    "evidence",
    [{}, {"device_evidence_list": []}, {"device_evidence_list": ["x"]}, [], "text"],
)
def test_malformed_evidence_is_refused(evidence: Any) -> None:
    with pytest.raises(EvidenceError):
        _verify(evidence)


def test_every_device_of_a_list_is_verified() -> None:
    good = _evidence(_report())["device_evidence_list"][0]
    bad = {**good, "evidence": _report()[:-1].hex()}
    verifier = NvidiaVerifier(clock=FakeClock())
    two = verifier.verify(
        {"device_evidence_list": [good, good]},
        expected_report_data=NONCE,
        expected_init_data=None,
    )
    assert [c.tee_class for c in two] == ["gpu", "gpu"]
    with pytest.raises(EvidenceError):
        verifier.verify(
            {"device_evidence_list": [good, bad]},
            expected_report_data=NONCE,
            expected_init_data=None,
        )


def test_unknown_verifier_type_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="nvidia_verifier is invalid"):
        build_verifiers({"nvidia_verifier": {"type": "Cloud"}})


def test_local_mode_in_upstreams_spellings_is_accepted() -> None:
    for section in ({"type": "Local"}, {"type": "local"}, {"verifier": {"type": "Local"}}):
        assert Tee.NVIDIA in build_verifiers({"nvidia_verifier": section})


def test_pinned_root_is_the_nvidia_root_upstream_ships() -> None:
    """Provenance: the package's root is byte-for-byte upstream's nvidia_device_root.pem."""
    shipped = resources.files("keybroker.verifiers") / "data" / "nvidia-device-identity-ca.pem"
    assert (
        shipped.read_bytes() == vector("verifier", "roots", "nvidia_device_root.pem").read_bytes()
    )
    assert pinned_root().subject.rfc4514_string() == "O=NVIDIA,CN=NVIDIA Device Identity CA"

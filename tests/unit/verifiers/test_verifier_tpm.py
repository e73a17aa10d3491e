"""The ``tpm`` verifier: quotes by an enrolled AK verify into upstream's claims; upstream's
recorded evidence verifies as far as its data allows; every named attack is refused."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from conftest import vector
from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.tpm.quote import init_data_pcr_value
from keybroker.verifiers.tpm.trusted_aks import TrustedAks, tpm_settings
from keybroker.verifiers.tpm.verifier import TpmVerifier, parse_evidence, verify_quote
from tpm_quotes import (
    AK,
    EV_NO_ACTION,
    EV_POST_CODE,
    EV_SEPARATOR,
    NONCE,
    OTHER_AK,
    PCRS,
    REPORT_DATA,
    SHA256_ALG,
    b64,
    evidence,
    pem,
)


@pytest.fixture
def ak_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "trusted_ak_keys"
    directory.mkdir()
    (directory / "ak.pub").write_bytes(pem(AK))
    return directory


@pytest.fixture
def verifier(ak_dir: Path) -> TpmVerifier:
    return TpmVerifier(TrustedAks(ak_dir))


def _verify(
    verifier: TpmVerifier,
    unverified: JsonValue,
    report_data: bytes | None = REPORT_DATA,
    init_data: bytes | None = None,
) -> dict[str, Any]:
    [result] = verifier.verify(
        unverified, expected_report_data=report_data, expected_init_data=init_data
    )
    assert result.tee is Tee.TPM and result.tee_class == "cpu"
    return dict(result.claims)


# --- what verifies -------------------------------------------------------------------------


def test_quote_by_enrolled_ak_gives_upstream_claims(verifier: TpmVerifier) -> None:
    sent = evidence()
    claims = _verify(verifier, sent)
    assert claims["report_data"] == NONCE.hex()
    assert claims["init_data"] == PCRS[8].hex()
    assert claims["ak_public"] == sent["ak_public"]
    assert [claims[f"pcr{i:02}"] for i in range(24)] == [p.hex() for p in PCRS]
    assert "uefi_event_logs" not in claims


def test_short_report_data_is_zero_padded_as_the_attester_pads_it(verifier: TpmVerifier) -> None:
    claims = _verify(verifier, evidence(b"short" + bytes(27)), report_data=b"short")
    assert claims["report_data"] == (b"short" + bytes(27)).hex()


def test_init_data_in_pcr8_is_accepted(verifier: TpmVerifier) -> None:
    digest = hashlib.sha256(b"init-data toml").digest()
    pcrs = [*PCRS[:8], init_data_pcr_value(digest), *PCRS[9:]]
    claims = _verify(verifier, evidence(pcrs=pcrs), init_data=digest)
    assert claims["init_data"] == init_data_pcr_value(digest).hex()


def test_ak_certificate_in_the_directory_is_trusted(tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AK")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(AK.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2025, 1, 1))
        .not_valid_after(datetime.datetime(2035, 1, 1))
        .sign(OTHER_AK, hashes.SHA256())
    )
    (tmp_path / "ak.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _verify(TpmVerifier(TrustedAks(tmp_path)), evidence())


def test_ak_enrolled_after_start_is_trusted_without_restart(tmp_path: Path) -> None:
    verifier = TpmVerifier(TrustedAks(tmp_path))
    (tmp_path / "other.pub").write_bytes(pem(OTHER_AK))
    with pytest.raises(EvidenceError, match="not one of the trusted AKs"):
        _verify(verifier, evidence())
    (tmp_path / "ak.pub").write_bytes(pem(AK))
    os.utime(tmp_path, ns=(1, 1))  # a fresh directory time, whatever the clock's granularity
    _verify(verifier, evidence())


def test_unparseable_ak_file_is_skipped(ak_dir: Path) -> None:
    (ak_dir / "broken.pub").write_text("not a key")
    (ak_dir / "notes.txt").write_text("ignored: not an AK file name")
    _verify(TpmVerifier(TrustedAks(ak_dir)), evidence())


def test_registry_builds_the_tpm_verifier_from_upstream_keys(ak_dir: Path) -> None:
    config = {"tpm_verifier": {"trusted_ak_keys_dir": str(ak_dir), "max_trusted_ak_keys": 5}}
    verifier = build_verifiers(config)[Tee.TPM]
    assert isinstance(verifier, TpmVerifier)
    _verify(verifier, evidence())


def test_upstream_tpm_verifier_section_is_read() -> None:
    """The ``verifier_config`` of upstream's example AS config with a TPM verifier. (The rest
    of that file, ``attestation_token_broker.type``, is an older upstream key that the AS
    config loader refuses: not this verifier's concern.)"""
    path = vector("attestation-service", "configs", "example_with_tpm_verifier.json")
    verifier_config = json.loads(path.read_text())["verifier_config"]
    settings = tpm_settings(verifier_config)
    assert settings.trusted_ak_keys_dir == Path("/etc/tpm/trusted_ak_keys")
    assert settings.max_trusted_ak_keys == 50
    assert isinstance(build_verifiers(verifier_config)[Tee.TPM], TpmVerifier)


def test_unknown_tpm_verifier_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tpm_verifier"):
        tpm_settings({"tpm_verifier": {"trusted_ak_dir": "/typo"}})


# --- upstream's recorded evidence ------------------------------------------------------------

UPSTREAM = vector("verifier", "tpm_evidence.json")


def _upstream() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(UPSTREAM.read_text())
    return loaded


@pytest.fixture
def upstream_dir(tmp_path: Path) -> Path:
    der = base64.b64decode(_upstream()["ak_public"])
    key = serialization.load_der_public_key(der)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "upstream.pub").write_bytes(pem)
    return tmp_path


def test_upstream_vector_signature_and_pcr_digest_verify(upstream_dir: Path) -> None:
    quote = verify_quote(parse_evidence(_upstream()), TrustedAks(upstream_dir))
    assert sorted(quote.pcrs) == list(range(24))
    assert quote.pcrs[17] == b"\xff" * 32 and quote.pcrs[8] == bytes(32)
    # its nonce: a 48-byte digest zero-padded to 64 bytes, by the attester's first version
    assert len(quote.attest.extra_data) == 64 and quote.attest.extra_data[48:] == bytes(16)


def test_upstream_vector_64_byte_nonce_is_refused_as_upstream_now_does(
    upstream_dir: Path,
) -> None:
    """The recording predates the attester's 32-byte nonce (guest-components 79554cf8); its
    session's runtime data is unknown, so even its own first 32 bytes cannot bind it."""
    recorded = _upstream()
    nonce = base64.b64decode(recorded["tpm_quote"]["message"])[40:72]
    with pytest.raises(EvidenceError, match="nonce"):
        _verify(TpmVerifier(TrustedAks(upstream_dir)), recorded, report_data=nonce)


def test_upstream_vector_ak_not_enrolled_is_refused(ak_dir: Path) -> None:
    with pytest.raises(EvidenceError, match="not one of the trusted AKs"):
        _verify(TpmVerifier(TrustedAks(ak_dir)), _upstream())


# --- named attacks -------------------------------------------------------------------------


def test_flipped_signature_byte_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    raw = bytearray(base64.b64decode(sent["tpm_quote"]["signature"]))
    raw[-1] ^= 0x01
    sent["tpm_quote"]["signature"] = b64(bytes(raw))
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(verifier, sent)


def test_flipped_quote_message_byte_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    raw = bytearray(base64.b64decode(sent["tpm_quote"]["message"]))
    raw[50] ^= 0x01  # inside the nonce
    sent["tpm_quote"]["message"] = b64(bytes(raw))
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(verifier, sent)


def test_wrong_nonce_is_refused(verifier: TpmVerifier) -> None:
    other = hashlib.sha384(b"another session").digest()[:32]
    with pytest.raises(EvidenceError, match="nonce"):
        _verify(verifier, evidence(other))


def test_quote_without_runtime_data_to_bind_is_refused(verifier: TpmVerifier) -> None:
    with pytest.raises(EvidenceError, match="without runtime data"):
        _verify(verifier, evidence(), report_data=None)


def test_unpinned_ak_is_refused(verifier: TpmVerifier) -> None:
    # a genuine-looking quote, correctly signed, by an AK the operator never enrolled
    with pytest.raises(EvidenceError, match="not one of the trusted AKs"):
        _verify(verifier, evidence(signer=OTHER_AK, ak=OTHER_AK))


def test_enrolled_ak_claimed_but_other_key_signed_is_refused(verifier: TpmVerifier) -> None:
    with pytest.raises(EvidenceError, match="not signed by the attestation key"):
        _verify(verifier, evidence(signer=OTHER_AK, ak=AK))


def test_no_trusted_ak_directory_refuses_every_quote(tmp_path: Path) -> None:
    verifier = TpmVerifier(TrustedAks(tmp_path / "absent"))
    with pytest.raises(EvidenceError, match="no trusted TPM attestation keys"):
        _verify(verifier, evidence())


def test_truncated_quote_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    raw = base64.b64decode(sent["tpm_quote"]["message"])
    sent["tpm_quote"]["message"] = b64(raw[:-5])
    with pytest.raises(EvidenceError, match="truncated"):
        _verify(verifier, sent)


def test_truncated_signature_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    raw = base64.b64decode(sent["tpm_quote"]["signature"])
    sent["tpm_quote"]["signature"] = b64(raw[:100])
    with pytest.raises(EvidenceError, match="truncated"):
        _verify(verifier, sent)


def test_pcr_values_not_matching_the_quote_digest_are_refused(verifier: TpmVerifier) -> None:
    forged = [*PCRS[:11], hashlib.sha256(b"the measurement policy wants").digest(), *PCRS[12:]]
    with pytest.raises(EvidenceError, match="do not hash to the TPM quote's PCR digest"):
        _verify(verifier, evidence(pcrs=forged, quoted_pcrs=PCRS))


def test_fewer_pcr_values_than_quoted_are_refused(verifier: TpmVerifier) -> None:
    with pytest.raises(EvidenceError, match="covers 24 PCRs"):
        _verify(verifier, evidence(pcrs=PCRS[:23], quoted_pcrs=PCRS))


def test_wrong_init_data_is_refused(verifier: TpmVerifier) -> None:
    with pytest.raises(EvidenceError, match="PCR 8 does not match the init-data"):
        _verify(verifier, evidence(), init_data=hashlib.sha256(b"other").digest())


def test_sha1_pcr_value_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    sent["tpm_quote"]["pcrs"][0] = "00" * 20
    with pytest.raises(EvidenceError, match="64 hex digits"):
        _verify(verifier, sent)


def test_too_many_pcr_values_are_refused(verifier: TpmVerifier) -> None:
    sent = evidence()
    sent["tpm_quote"]["pcrs"] = sent["tpm_quote"]["pcrs"] * 2
    with pytest.raises(EvidenceError, match="at most 24"):
        _verify(verifier, sent)


def test_malformed_evidence_is_refused(verifier: TpmVerifier) -> None:
    bad_documents: list[JsonValue] = [
        [],
        {"tpm_quote": {}},
        {"ak_public": "%%", "tpm_quote": evidence()["tpm_quote"]},
    ]
    for bad in bad_documents:
        with pytest.raises(EvidenceError):
            _verify(verifier, bad)


# --- event logs ------------------------------------------------------------------------------


def _spec_id() -> bytes:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
    body += struct.pack("<I", 1) + struct.pack("<HH", SHA256_ALG, 32) + b"\x00"
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def _record(index: int, event_type: int, data: bytes, digest: bytes | None = None) -> bytes:
    digest = hashlib.sha256(data).digest() if digest is None else digest
    head = struct.pack("<III", index, event_type, 1) + struct.pack("<H", SHA256_ALG) + digest
    return head + struct.pack("<I", len(data)) + data


def _replayed(digests: list[bytes], start: bytes = bytes(32)) -> bytes:
    pcr = start
    for digest in digests:
        pcr = hashlib.sha256(pcr + digest).digest()
    return pcr


FIRMWARE = [b"firmware volume", b"boot loader"]
LOG = (
    _spec_id()
    + _record(0, EV_NO_ACTION, b"StartupLocality\x00\x03", bytes(32))
    + _record(0, EV_POST_CODE, FIRMWARE[0])
    + _record(4, EV_POST_CODE, FIRMWARE[1])
    + _record(7, EV_SEPARATOR, bytes(4))
)
PCR0 = _replayed([hashlib.sha256(FIRMWARE[0]).digest()], bytes(31) + b"\x03")
PCR4 = _replayed([hashlib.sha256(FIRMWARE[1]).digest()])
PCR7 = _replayed([hashlib.sha256(bytes(4)).digest()])


def _logged_pcrs() -> list[bytes]:
    pcrs = list(PCRS)
    pcrs[0], pcrs[4], pcrs[7] = PCR0, PCR4, PCR7
    return pcrs


def test_event_log_replaying_to_the_pcrs_is_accepted(verifier: TpmVerifier) -> None:
    sent = evidence(pcrs=_logged_pcrs())
    sent["event_log"] = b64(LOG)
    claims = _verify(verifier, sent)
    events = claims["uefi_event_logs"]
    assert [(e["index"], e["type_name"]) for e in events] == [
        (0, "EV_NO_ACTION"),
        (0, "EV_POST_CODE"),
        (4, "EV_POST_CODE"),
        (7, "EV_SEPARATOR"),
    ]


def test_event_log_not_replaying_to_the_pcrs_is_refused(verifier: TpmVerifier) -> None:
    pcrs = _logged_pcrs()
    pcrs[4] = hashlib.sha256(b"another boot loader").digest()
    sent = evidence(pcrs=pcrs)
    sent["event_log"] = b64(LOG)
    with pytest.raises(EvidenceError, match="does not replay to PCR 4"):
        _verify(verifier, sent)


def test_event_log_hiding_the_startup_locality_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence(pcrs=_logged_pcrs())
    sent["event_log"] = b64(
        _spec_id()
        + _record(0, EV_POST_CODE, FIRMWARE[0])
        + _record(4, EV_POST_CODE, FIRMWARE[1])
        + _record(7, EV_SEPARATOR, bytes(4))
    )
    with pytest.raises(EvidenceError, match="does not replay to PCR 0"):
        _verify(verifier, sent)


def test_event_log_of_another_bank_is_refused(verifier: TpmVerifier) -> None:
    sent = evidence(pcrs=_logged_pcrs())
    sent["event_log"] = b64(b"\x00" * 16)
    with pytest.raises(EvidenceError, match="spec-ID"):
        _verify(verifier, sent)

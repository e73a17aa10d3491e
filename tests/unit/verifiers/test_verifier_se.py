"""The ``se`` verifier end to end: challenge, a simulated Ultravisor, the guest's response,
verification, and the named attacks (tests/se_guest.py builds the PKI, host and guest)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from conftest import vector
from keybroker.config import BuiltinAsConfig, load_as_config, parse_config
from keybroker.errors import AttestationError, ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.ibm.se import SeVerifier
from keybroker.verifiers.ibm.se_formats import measurement, parse_arcb, parse_se_header
from keybroker.verifiers.ibm.se_settings import SeSettings, se_settings
from se_guest import SePki, Ultravisor, attest, certify, ibm_name, settings_for, write_material

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp()
DIGEST = hashlib.sha512(b"runtime data of this session").digest()
_RSA = rsa.generate_private_key(65537, 2048)  # one per module: generation is slow
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _header(dump: bool = False) -> bytes:
    data = bytearray(vector("verifier", "se", "secure_guest.hdr").read_bytes())
    if dump:
        struct.pack_into(">Q", data, 0x38, 1 << (63 - 34))
    return bytes(data)


@dataclass
class World:
    root: Path
    pki: SePki
    verifier: SeVerifier
    uv: Ultravisor


def _world(tmp_path: Path, *, header: bytes | None = None, **material: Any) -> World:
    pki = material.pop("pki", None) or SePki()
    header = header or _header()
    root = write_material(tmp_path / "ibmse", pki, header, _RSA, **material)
    verifier = SeVerifier(se_settings({"se": settings_for(root)}), clock=lambda: NOW)
    tags = parse_se_header(header).tags.to_bytes()
    return World(root, pki, verifier, Ultravisor(pki.host.key, tags))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return _world(tmp_path)


def _response(world: World, digest: bytes = DIGEST) -> dict[str, str]:
    challenge = world.verifier.challenge({})
    return attest(challenge, digest, world.uv)


def _verify(world: World, evidence: JsonValue, digest: bytes | None = DIGEST) -> dict[str, Any]:
    [claims] = world.verifier.verify(
        evidence,
        expected_report_data=digest,
        expected_init_data=None,
    )
    assert claims.tee_class == "cpu"
    return claims.claims


def _flip(evidence: dict[str, str], member: str, index: int = 0) -> dict[str, str]:
    raw = bytearray(base64.b64decode(evidence[member]))
    raw[index] ^= 0x01
    return {**evidence, member: base64.b64encode(bytes(raw)).decode()}


def test_challenge_is_upstreams_attestation_request(world: World) -> None:
    request = json.loads(world.verifier.challenge({}))
    assert sorted(request) == [
        "additional_size",
        "encr_measurement_key",
        "encr_request_nonce",
        "image_hdr_tags",
        "measurement_size",
        "request_blob",
    ]
    assert (request["measurement_size"], request["additional_size"]) == (64, 64)
    view = parse_arcb(base64.b64decode(request["request_blob"]))
    assert [slot[:32] for slot in view.keyslots] == [world.uv.phkh()]
    assert base64.b64decode(request["image_hdr_tags"]) == world.uv.image_tags


def test_every_challenge_carries_a_fresh_measurement_key(world: World) -> None:
    first, second = (json.loads(world.verifier.challenge({})) for _ in range(2))
    assert first["encr_measurement_key"] != second["encr_measurement_key"]
    assert first["request_blob"] != second["request_blob"]


def test_genuine_response_verifies_with_upstreams_claims(world: World) -> None:
    claims = _verify(world, _response(world))
    header = parse_se_header(_header())
    assert claims == {
        "cuid": world.uv.cuid.hex(),
        "report_data": DIGEST.hex(),
        "version": 256,
        "image_phkh": world.uv.phkh().hex(),
        "attestation_phkh": world.uv.phkh().hex(),
        "tag": header.tags.tag.hex(),
        "image_dump_allowed": False,
    }


def test_shorter_digest_is_zero_padded_into_the_user_data(world: World) -> None:
    digest = hashlib.sha384(b"x").digest()
    assert _verify(world, _response(world, digest), digest)["report_data"] == digest.hex()


@pytest.mark.parametrize("member", ["measurement", "image_hdr_tags", "cuid", "additional_data"])
def test_flipped_byte_in_the_measured_response_is_refused(world: World, member: str) -> None:
    evidence = _flip(_response(world), member, index=-1 if member == "image_hdr_tags" else 0)
    with pytest.raises(EvidenceError, match="measurement does not verify"):
        _verify(world, evidence)


def test_flipped_user_data_byte_is_refused(world: World) -> None:
    evidence = _flip(_response(world), "user_data", index=63)
    with pytest.raises(EvidenceError, match="user data does not start with the digest"):
        _verify(world, evidence)


def test_wrong_nonce_is_refused(world: World) -> None:
    """A response made for another session: the user data binds another runtime digest."""
    evidence = _response(world, hashlib.sha512(b"another session's runtime data").digest())
    with pytest.raises(EvidenceError, match="runtime data"):
        _verify(world, evidence)


@pytest.mark.parametrize("member", ["measurement", "cuid", "image_hdr_tags"])
def test_truncated_response_is_refused(world: World, member: str) -> None:
    evidence = _response(world)
    raw = base64.b64decode(evidence[member])[:-1]
    truncated = {**evidence, member: base64.b64encode(raw).decode()}
    with pytest.raises(EvidenceError, match="truncated"):
        _verify(world, truncated)


def test_response_missing_a_member_is_refused(world: World) -> None:
    evidence = _response(world)
    del evidence["additional_data"]
    with pytest.raises(EvidenceError, match="additional_data"):
        _verify(world, evidence)


def test_oversized_member_is_refused_before_decoding(world: World) -> None:
    evidence = {**_response(world), "user_data": "A" * 100_000}
    with pytest.raises(EvidenceError, match="longer than 256"):
        _verify(world, evidence)


def test_forged_measurement_key_encrypted_to_the_public_key_is_refused(world: World) -> None:
    """Whoever knows the verifier's public key can encrypt a measurement key of their own and
    HMAC anything with it; the nonce binding shows this pair was not issued here."""
    key, nonce = os.urandom(64), os.urandom(16)
    tags = world.uv.image_tags
    user = DIGEST
    additional = bytes(64)
    forged = measurement(
        key,
        parse_se_header(_header()).tags,
        world.uv.cuid,
        user_data=user,
        nonce=nonce,
        additional_data=additional,
    )
    public = _RSA.public_key()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    evidence = {
        "measurement": b64(forged),
        "additional_data": b64(additional),
        "user_data": b64(user),
        "cuid": b64(world.uv.cuid),
        "encr_measurement_key": b64(public.encrypt(key, _OAEP)),
        "encr_request_nonce": b64(public.encrypt(nonce, _OAEP)),
        "image_hdr_tags": b64(tags),
    }
    with pytest.raises(EvidenceError, match="not issued by this verifier"):
        _verify(world, evidence)


def test_measurement_key_for_another_verifier_is_refused(world: World) -> None:
    evidence = _response(world)
    foreign = rsa.generate_private_key(65537, 2048).public_key()
    evidence["encr_measurement_key"] = base64.b64encode(foreign.encrypt(b"k" * 64, _OAEP)).decode()
    with pytest.raises(EvidenceError, match="does not decrypt"):
        _verify(world, evidence)


def test_dump_allowed_image_is_reported(tmp_path: Path) -> None:
    world = _world(tmp_path, header=_header(dump=True))
    assert _verify(world, _response(world))["image_dump_allowed"] is True


def test_response_from_another_image_carries_no_dump_claim(world: World) -> None:
    """The Ultravisor measures the running image; if that is not the configured header, the
    header's flags say nothing about it."""
    world.uv.image_tags = bytes(208)
    evidence = {**_response(world), "image_hdr_tags": base64.b64encode(bytes(208)).decode()}
    claims = _verify(world, evidence)
    assert "image_dump_allowed" not in claims
    assert claims["tag"] == bytes(16).hex()


# --- host-key documents and IBM's chain ---------------------------------------------------


def test_chain_to_unpinned_root_is_refused(tmp_path: Path) -> None:
    world = _world(tmp_path)
    (world.root / "root_ca.crt").write_bytes(SePki().root.pem())  # pin another root
    with pytest.raises(EvidenceError, match="does not lead to a trusted certificate"):
        world.verifier.challenge({})


def test_bundled_digicert_root_refuses_a_test_chain(tmp_path: Path) -> None:
    world = _world(tmp_path)
    (world.root / "root_ca.crt").unlink()  # falls back to DigiCert Trusted Root G4
    with pytest.raises(EvidenceError, match="does not lead to a trusted certificate"):
        world.verifier.challenge({})


def test_revoked_host_key_document_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    world = _world(tmp_path, pki=pki, crls=pki.crls(revoked=[pki.host.cert]))
    with pytest.raises(EvidenceError, match="is revoked"):
        world.verifier.challenge({})


def test_revoked_signing_key_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    world = _world(tmp_path, pki=pki, crls=pki.crls(revoked=[pki.signing_key.cert]))
    with pytest.raises(EvidenceError, match="is revoked"):
        world.verifier.challenge({})


def test_missing_crl_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    world = _world(tmp_path, pki=pki, crls=pki.crls()[:2])  # no CRL from the signing key
    with pytest.raises(EvidenceError, match="no current CRL"):
        world.verifier.challenge({})


def test_expired_host_key_document_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    expired = pki.host_key_document(not_after=datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC))
    world = _world(tmp_path, pki=pki, documents=[expired])
    with pytest.raises(EvidenceError, match="validity period"):
        world.verifier.challenge({})


def test_host_key_document_not_signed_by_ibm_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    impostor = certify(ibm_name("IBM Z Host Key Signing Service"), None, ca=False)
    forged = certify(ibm_name("IBM Z Host Key", "Armonk"), impostor, ca=False, curve=ec.SECP521R1())
    world = _world(tmp_path, pki=pki, documents=[forged])
    with pytest.raises(EvidenceError, match="not signed by the IBM Z host-key signing key"):
        world.verifier.challenge({})


def test_non_p521_host_key_is_refused(tmp_path: Path) -> None:
    pki = SePki()
    weak = certify(ibm_name("IBM Z Host Key", "Armonk"), pki.signing_key, ca=False)
    world = _world(tmp_path, pki=pki, documents=[weak])
    with pytest.raises(EvidenceError, match="P-521"):
        world.verifier.challenge({})


def test_two_signing_keys_are_refused(tmp_path: Path) -> None:
    world = _world(tmp_path)
    second = certify(ibm_name("IBM Z Host Key Signing Service"), world.pki.intermediate, ca=False)
    (world.root / "certs" / "second.crt").write_bytes(second.pem())
    with pytest.raises(EvidenceError, match="expected exactly one"):
        world.verifier.challenge({})


def test_insecure_skip_uses_unverified_documents(tmp_path: Path) -> None:
    world = _world(tmp_path)
    (world.root / "root_ca.crt").write_bytes(SePki().root.pem())
    settings = {**settings_for(world.root), "insecure_skip_certs_verification": True}
    verifier = SeVerifier(se_settings({"se": settings}), clock=lambda: NOW)
    request = json.loads(verifier.challenge({}))
    assert parse_arcb(base64.b64decode(request["request_blob"])).keyslots


# --- settings -----------------------------------------------------------------------------


def test_missing_material_is_a_clear_error(tmp_path: Path) -> None:
    settings = se_settings({"se": settings_for(tmp_path / "absent")})
    verifier = SeVerifier(settings, clock=lambda: NOW)
    with pytest.raises(AttestationError, match="IBM SE is not set up"):
        verifier.challenge({})


def _loaded_se_settings(document: dict[str, object], environ: dict[str, str]) -> SeSettings:
    """The SE settings of a KBS config document loaded with ``environ`` as its environment."""
    config = parse_config(document, environ=environ)
    assert isinstance(config.attestation_service, BuiltinAsConfig)
    return se_settings(config.attestation_service.verifier_config)


def test_upstream_environment_variables_are_honoured(tmp_path: Path) -> None:
    settings = _loaded_se_settings(
        {},
        {
            "DEFAULT_SE_HOST_KEY_DOCUMENTS_ROOT": str(tmp_path / "h"),
            "SE_CERTIFICATES_ROOT": str(tmp_path / "c"),
            "SE_SKIP_CERTS_VERIFICATION": "true",
        },
    )
    assert settings.host_key_documents_dir == tmp_path / "h"
    assert settings.certificates_dir == tmp_path / "c"
    assert settings.insecure_skip_certs_verification is True
    assert str(settings.image_header) == "/run/confidential-containers/ibmse/hdr/hdr.bin"


def test_config_file_key_wins_over_the_environment(tmp_path: Path) -> None:
    section = {"se": {"crls_dir": str(tmp_path / "mine")}}
    settings = _loaded_se_settings(
        {"attestation_service": {"type": "coco_as_builtin", "verifier_config": section}},
        {"SE_CERTIFICATE_REVOCATION_LISTS_ROOT": "/elsewhere", "SE_SKIP_CERTS_VERIFICATION": "1"},
    )
    assert settings.crls_dir == tmp_path / "mine"
    assert settings.insecure_skip_certs_verification is False  # only "true" skips


def test_the_attestation_service_file_maps_the_same_variables(tmp_path: Path) -> None:
    """grpc-as and restful-as: the variables land in the top-level verifier_config."""
    config = load_as_config(None, environ={"SE_CERTIFICATE_ROOT_CA": str(tmp_path / "root.crt")})
    assert se_settings(config.verifier_config).root_ca == tmp_path / "root.crt"
    assert load_as_config(None, environ={}).verifier_config is None


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"verifier_config\.se"):
        se_settings({"se": {"hkd_dir": "/x"}})


def test_mismatched_public_key_is_refused(world: World) -> None:
    other = rsa.generate_private_key(65537, 2048).public_key()
    (world.root / "rsa" / "encrypt_key.pub").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(AttestationError, match="not the public half"):
        world.verifier.challenge({})


def test_password_protected_measurement_key_is_a_clear_error(world: World) -> None:
    protected = _RSA.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"test1234"),
    )
    (world.root / "rsa" / "encrypt_key.pem").write_bytes(protected)
    with pytest.raises(AttestationError, match="not an unencrypted PEM key"):
        world.verifier.challenge({})

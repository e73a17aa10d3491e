"""The Arm CCA verifier (local mode): upstream's example token verified with upstream's stores,
and one named test per attack. Tokens that upstream does not ship are built from the example
(cca_tokens.py), signed with upstream's published test keys or with keys generated here."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cca_tokens import (
    EXAMPLE_RIM,
    EXAMPLE_TOKEN,
    P_INSTANCE,
    P_LIFECYCLE,
    R_PERSO,
    R_PROFILE,
    RV_STORE,
    TA_STORE,
    evidence,
    example_spec,
    local_config,
    padded64,
)
from conftest import vector
from keybroker.config import BuiltinAsConfig, parse_config
from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.arm.cca import CcaVerifier
from keybroker.verifiers.arm.cca_store import build_cca_endorsements
from keybroker.verifiers.arm.cca_token import REALM_PROFILE, parse_token

EXAMPLE = EXAMPLE_TOKEN.read_bytes()
EXAMPLE_CHALLENGE = parse_token(EXAMPLE).realm.challenge
DIGEST = hashlib.sha384(b"the session's runtime data").digest()


@pytest.fixture(scope="module")
def verifier() -> CcaVerifier:
    return CcaVerifier(build_cca_endorsements(local_config()))


def _verify(
    verifier: CcaVerifier,
    token: bytes,
    report_data: bytes = DIGEST,
    init_data: bytes | None = None,
) -> dict[str, Any]:
    [claims] = verifier.verify(
        evidence(token), expected_report_data=report_data, expected_init_data=init_data
    )
    assert claims.tee is Tee.CCA and claims.tee_class == "cpu"
    return claims.claims


def _bound(report_data: bytes = DIGEST) -> Any:
    """The example, its realm challenge set to ``report_data`` (padded), ready to build."""
    return example_spec().with_realm(k10=padded64(report_data))


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _envelopes(token: bytes) -> dict[int, list[Any]]:
    collection = cbor2.loads(token)
    return {label: list(cbor2.loads(raw).value) for label, raw in collection.value.items()}


def _rebuild(envelopes: dict[int, list[Any]]) -> bytes:
    return cbor2.dumps(
        cbor2.CBORTag(
            399, {label: cbor2.dumps(cbor2.CBORTag(18, e)) for label, e in envelopes.items()}
        )
    )


# --- upstream's vector -------------------------------------------------------------------


def test_upstream_example_token_verifies_against_upstream_stores(verifier: CcaVerifier) -> None:
    claims = _verify(verifier, EXAMPLE, report_data=EXAMPLE_CHALLENGE)
    assert claims["report_data"] == EXAMPLE_CHALLENGE.hex()
    assert claims["init_data"] == "00" * 64
    realm, platform = claims["realm"], claims["platform"]
    assert realm["cca-realm-initial-measurement"] == EXAMPLE_RIM
    assert realm["cca-realm-challenge"] == base64.b64encode(EXAMPLE_CHALLENGE).decode()
    assert realm["cca-realm-hash-algo-id"] == "sha-512"
    assert len(realm["cca-realm-extensible-measurements"]) == 4
    assert (
        platform["cca-platform-implementation-id"]
        == base64.b64encode(
            bytes.fromhex("7f454c4602010100000000000000000003003e00010000005058000000000000")
        ).decode()
    )
    assert platform["cca-platform-lifecycle"] == 0x3003  # secured
    assert len(platform["cca-platform-sw-components"]) == 13
    assert platform["cca-platform-sw-components"][0]["measurement-type"] == "RSE_BL1_2"


def test_claim_names_are_upstreams(verifier: CcaVerifier) -> None:
    """Upstream's verifier emits these names; the rest follow upstream's cca-claims.json."""
    claims = _verify(verifier, EXAMPLE, report_data=EXAMPLE_CHALLENGE)
    assert list(claims) == ["realm", "platform", "report_data", "init_data"]
    assert {
        "cca-realm-personalization-value",
        "cca-realm-initial-measurement",
        "cca-realm-extensible-measurements",
        "cca-realm-hash-algo-id",
        "cca-realm-challenge",
    } <= set(claims["realm"])
    assert {"cca-platform-instance-id", "cca-platform-implementation-id"} <= set(claims["platform"])
    recorded = json.loads(vector("verifier", "cca-claims.json").read_text())
    assert set(claims["realm"]) == set(recorded["realm"])
    assert set(claims["platform"]) == set(recorded["platform"])
    component_keys = set(recorded["platform"]["cca-platform-sw-components"][0])
    assert component_keys - {"version"} <= set(claims["platform"]["cca-platform-sw-components"][0])


def test_token_bound_to_the_session_verifies(verifier: CcaVerifier) -> None:
    claims = _verify(verifier, _bound().build())
    assert claims["report_data"] == padded64(DIGEST).hex()


def test_init_data_digest_is_bound_by_the_personalization_value(verifier: CcaVerifier) -> None:
    init_digest = hashlib.sha256(b"init data").digest()
    token = _bound().with_realm(k44235=padded64(init_digest)).build()
    claims = _verify(verifier, token, init_data=init_digest)
    assert claims["init_data"] == padded64(init_digest).hex()


def test_realm_profile_with_cose_key_rak_verifies(verifier: CcaVerifier) -> None:
    token = _bound().with_realm(**{f"k{R_PROFILE}": REALM_PROFILE}).build()
    assert _verify(verifier, token)["realm"]["cca-realm-profile"] == REALM_PROFILE


# --- attacks -----------------------------------------------------------------------------


def test_flipped_platform_signature_byte_is_refused(verifier: CcaVerifier) -> None:
    envelopes = _envelopes(_bound().build())
    envelopes[44234][3] = _flip(envelopes[44234][3], 17)
    with pytest.raises(EvidenceError, match="platform token signature does not verify"):
        _verify(verifier, _rebuild(envelopes))


def test_flipped_realm_signature_byte_is_refused(verifier: CcaVerifier) -> None:
    envelopes = _envelopes(_bound().build())
    envelopes[44241][3] = _flip(envelopes[44241][3], 60)
    with pytest.raises(EvidenceError, match="realm token signature does not verify"):
        _verify(verifier, _rebuild(envelopes))


def test_flipped_upstream_vector_signature_byte_is_refused(verifier: CcaVerifier) -> None:
    envelopes = _envelopes(EXAMPLE)
    envelopes[44234][3] = _flip(envelopes[44234][3], 0)
    with pytest.raises(EvidenceError, match="platform token signature"):
        _verify(verifier, _rebuild(envelopes), report_data=EXAMPLE_CHALLENGE)


def test_edited_realm_claim_without_resigning_is_refused(verifier: CcaVerifier) -> None:
    """A realm measurement changed after signing (the payload, not the signature)."""
    envelopes = _envelopes(_bound().build())
    realm = dict(cbor2.loads(envelopes[44241][2]))
    realm[44238] = bytes(64)
    envelopes[44241][2] = cbor2.dumps(realm)
    with pytest.raises(EvidenceError, match="realm token signature does not verify"):
        _verify(verifier, _rebuild(envelopes))


def test_wrong_challenge_is_refused(verifier: CcaVerifier) -> None:
    """A token made for another session (its challenge another runtime-data digest)."""
    token = _bound(hashlib.sha384(b"another session").digest()).build()
    with pytest.raises(EvidenceError, match="realm challenge does not match"):
        _verify(verifier, token)


def test_replayed_upstream_token_is_refused_for_a_new_session(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="realm challenge does not match"):
        _verify(verifier, EXAMPLE)


def test_wrong_init_data_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="personalization value does not match"):
        _verify(verifier, _bound().build(), init_data=hashlib.sha256(b"other").digest())


def test_cpak_not_in_the_trust_anchor_store_is_refused(verifier: CcaVerifier) -> None:
    """An attacker's own platform key, for an instance id nobody endorsed."""
    rogue = ec.generate_private_key(ec.SECP384R1())
    spec = _bound().with_platform(**{f"k{P_INSTANCE}": b"\x01" + bytes(range(32))})
    token = type(spec)(spec.platform, spec.realm, rogue, spec.rak).build()
    with pytest.raises(EvidenceError, match="not in the trust anchor store"):
        _verify(verifier, token)


def test_unpinned_cpak_claiming_a_trusted_instance_is_refused(verifier: CcaVerifier) -> None:
    """The trusted instance id, signed by a key that is not its endorsed CPAK."""
    rogue = ec.generate_private_key(ec.SECP384R1())
    spec = _bound()
    token = type(spec)(spec.platform, spec.realm, rogue, spec.rak).build()
    with pytest.raises(EvidenceError, match="platform token signature does not verify"):
        _verify(verifier, token)


def test_rak_binding_mismatch_is_refused(verifier: CcaVerifier) -> None:
    """A realm signed by a key of the attacker's, under a genuine platform token vouching for
    the original RAK (the platform challenge is the genuine RAK's hash)."""
    genuine = _envelopes(_bound().build())
    rogue_rak = ec.generate_private_key(ec.SECP384R1())
    spec = _bound()
    forged = _envelopes(type(spec)(spec.platform, spec.realm, spec.cpak, rogue_rak).build())
    forged[44234] = genuine[44234]
    with pytest.raises(EvidenceError, match="not the hash of the realm's RAK"):
        _verify(verifier, _rebuild(forged))


def test_platform_challenge_not_binding_the_rak_is_refused(verifier: CcaVerifier) -> None:
    spec = _bound().with_platform(k10=bytes(32))
    token = type(spec)(spec.platform, spec.realm, spec.cpak, spec.rak, bind_rak=False).build()
    with pytest.raises(EvidenceError, match="not the hash of the realm's RAK"):
        _verify(verifier, token)


@pytest.mark.parametrize("keep", [0, 1, 16, 700, 1500, len(EXAMPLE) - 1])
def test_truncated_token_is_refused(verifier: CcaVerifier, keep: int) -> None:
    with pytest.raises(EvidenceError):
        _verify(verifier, EXAMPLE[:keep], report_data=EXAMPLE_CHALLENGE)


def test_truncated_realm_token_inside_the_collection_is_refused(verifier: CcaVerifier) -> None:
    tokens = dict(cbor2.loads(_bound().build()).value)
    tokens[44241] = tokens[44241][:-20]
    with pytest.raises(EvidenceError, match="realm token is not valid CBOR"):
        _verify(verifier, cbor2.dumps(cbor2.CBORTag(399, tokens)))


def test_unendorsed_platform_firmware_is_refused(verifier: CcaVerifier) -> None:
    spec = _bound()
    components = list(spec.platform[2399])
    components[8] = {**components[8], 2: bytes(32)}  # the RMM measured as something else
    with pytest.raises(EvidenceError, match="match none of the reference values"):
        _verify(verifier, spec.with_platform(k2399=components).build())


def test_unendorsed_platform_configuration_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="match none of the reference values"):
        _verify(verifier, _bound().with_platform(k2401=b"\x00\x00\x00\x00").build())


def test_cpak_of_another_implementation_is_refused(tmp_path: Path) -> None:
    anchors = json.loads(TA_STORE.read_text())
    anchors[0]["implementation-id"] = "11" * 32
    store = tmp_path / "ta.json"
    store.write_text(json.dumps(anchors))
    verifier = CcaVerifier(build_cca_endorsements(local_config(ta_store=store)))
    with pytest.raises(EvidenceError, match="endorsed for implementation"):
        _verify(verifier, _bound().build())


def test_algorithm_substitution_is_refused(verifier: CcaVerifier) -> None:
    """The platform token names ES256 although the endorsed CPAK is a P-384 key."""
    spec = _bound()
    token = type(spec)(spec.platform, spec.realm, spec.cpak, spec.rak, platform_alg=-7).build()
    with pytest.raises(EvidenceError, match="names COSE algorithm -7"):
        _verify(verifier, token)


def test_duplicated_claim_is_refused(verifier: CcaVerifier) -> None:
    """Two lifecycle claims in one map (a decoder keeping the last could be fooled)."""
    envelopes = _envelopes(_bound().build())
    payload = envelopes[44234][2]
    # append a second lifecycle (0x4000, debug) to the map: bump its item count by one
    assert payload[0] == 0xA9
    envelopes[44234][2] = b"\xaa" + payload[1:] + cbor2.dumps(P_LIFECYCLE) + cbor2.dumps(0x4000)
    with pytest.raises(EvidenceError, match="not valid CBOR"):
        _verify(verifier, _rebuild(envelopes))


def test_deeply_nested_cbor_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="not valid CBOR"):
        _verify(verifier, b"\x81" * 5000 + b"\x00")


def test_oversized_token_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="more than the"):
        _verify(verifier, bytes(40 * 1024))


def test_collection_with_an_extra_token_is_refused(verifier: CcaVerifier) -> None:
    tokens = {**cbor2.loads(_bound().build()).value, 1: b"extra"}
    with pytest.raises(EvidenceError, match="exactly the platform"):
        _verify(verifier, cbor2.dumps(cbor2.CBORTag(399, tokens)))


@pytest.mark.parametrize(
    "unverified",
    [None, {}, {"token": "AAEC"}, {"token": [1, 256]}, {"token": [True]}, {"token": [-1]}],
)
def test_malformed_evidence_is_refused(verifier: CcaVerifier, unverified: JsonValue) -> None:
    with pytest.raises(EvidenceError, match=r"cca evidence|could not be verified"):
        verifier.verify(unverified, expected_report_data=DIGEST, expected_init_data=None)


def test_invalid_lifecycle_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="not a PSA lifecycle"):
        _verify(verifier, _bound().with_platform(**{f"k{P_LIFECYCLE}": 0x7000}).build())


def test_wrong_size_personalization_value_is_refused(verifier: CcaVerifier) -> None:
    token = _bound().with_realm(**{f"k{R_PERSO}": bytes(32)}).build()
    with pytest.raises(EvidenceError, match="personalization-value is 32 bytes"):
        _verify(verifier, token)


def test_missing_runtime_data_is_refused(verifier: CcaVerifier) -> None:
    with pytest.raises(EvidenceError, match="needs the runtime data"):
        verifier.verify(evidence(EXAMPLE), expected_report_data=None, expected_init_data=None)


# --- configuration -----------------------------------------------------------------------


def test_unconfigured_verifier_refuses_every_token() -> None:
    verifier = build_verifiers({})[Tee.CCA]
    with pytest.raises(EvidenceError, match="no CCA platform is trusted"):
        verifier.verify(
            evidence(EXAMPLE), expected_report_data=EXAMPLE_CHALLENGE, expected_init_data=None
        )


def test_upstream_config_file_named_by_the_environment_is_read(tmp_path: Path) -> None:
    config = tmp_path / "cca-config.json"
    section = {"type": "local", "ta-store": str(TA_STORE), "rv-store": str(RV_STORE)}
    config.write_text(json.dumps({"cca-verifier": section}))
    loaded = parse_config({}, environ={"CCA_CONFIG_FILE": str(config)})
    assert isinstance(loaded.attestation_service, BuiltinAsConfig)
    endorsements = build_cca_endorsements(loaded.attestation_service.verifier_config)
    assert endorsements is not None
    _verify(CcaVerifier(endorsements), EXAMPLE, report_data=EXAMPLE_CHALLENGE)


def test_a_cca_section_in_the_file_wins_over_the_environment(tmp_path: Path) -> None:
    section = {"type": "local", "ta-store": str(TA_STORE), "rv-store": str(RV_STORE)}
    document: dict[str, object] = {
        "attestation_service": {"type": "coco_as_builtin", "verifier_config": {"cca": section}}
    }
    # the variable names a file that does not exist: it is not even read
    loaded = parse_config(document, environ={"CCA_CONFIG_FILE": str(tmp_path / "absent.json")})
    assert isinstance(loaded.attestation_service, BuiltinAsConfig)
    assert loaded.attestation_service.verifier_config == {"cca": section}


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"cca-verifier": {"type": "local"}, "other": 1}', b"[]"],
)
def test_a_malformed_upstream_cca_file_is_refused_at_load(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "cca-config.json"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=r"CCA config file .*CCA_CONFIG_FILE"):
        parse_config({}, environ={"CCA_CONFIG_FILE": str(config)})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"type": "local", "ta-store": "/nonexistent/ta.json", "rv-store": str(RV_STORE)}, "read"),
        ({"type": "local", "rv-store": str(RV_STORE)}, "ta-store"),
        ({"type": "random"}, "type"),
    ],
)
def test_bad_cca_configuration_fails_at_start_up(section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_cca_endorsements({"cca": section})


def test_malformed_trust_anchor_is_a_config_error(tmp_path: Path) -> None:
    anchors = json.loads(TA_STORE.read_text())
    anchors[0]["pkey"]["crv"] = "P-192"
    store = tmp_path / "ta.json"
    store.write_text(json.dumps(anchors))
    with pytest.raises(ConfigError, match="P-192"):
        build_cca_endorsements(local_config(ta_store=store))

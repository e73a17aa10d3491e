"""EAR status tiers and the token the builtin AS issues."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from json_shapes import at, obj, string
from keybroker.attestation.ear import status_of
from keybroker.attestation.policy import AttestationPolicies
from keybroker.attestation.service import BuiltinAttestationService, EvidenceToVerify
from keybroker.attestation.signer import TokenSigner
from keybroker.config import BuiltinAsConfig
from keybroker.errors import AttestationError, BadRequestError, ConfigError
from keybroker.policy.workers import PolicyWorkers
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.jws import decode_unverified, verify_jwt
from keybroker.protocol.models import InitData, Tee
from keybroker.rvps.store import ReferenceValueStore
from keybroker.storage.memory import MemoryKeyValueStorage


@pytest.mark.parametrize(
    ("vector", "status"),
    [
        ({"hardware": 97, "executables": 3}, "contraindicated"),
        ({"hardware": 127}, "contraindicated"),
        ({"executables": 33, "configuration": 2}, "warning"),
        ({"executables": 3, "hardware": 2}, "affirming"),
        ({"executables": 0}, "none"),
        ({"executables": 1}, "none"),
    ],
)
def test_ar4si_status_tiers(vector: dict[str, int], status: str) -> None:
    assert status_of(vector) == status


WORKERS = PolicyWorkers()  # one pool for the module: workers start on first use


def _evidence(init_data: InitData | None = None) -> EvidenceToVerify:
    data = runtime_data("nonce", {"kty": "EC"}, "")
    digest = runtime_data_digest(data, HashAlgorithm.SHA384)
    return EvidenceToVerify(
        tee=Tee.SAMPLE,
        unverified_evidence={"svn": "1", "report_data": base64.b64encode(digest).decode()},
        runtime_data=data,
        hash_algorithm=HashAlgorithm.SHA384,
        init_data=init_data,
    )


def _service(
    signer: TokenSigner | None = None, clock: Callable[[], float] = time.time
) -> BuiltinAttestationService:
    reference_values = ReferenceValueStore(MemoryKeyValueStorage(clock), clock=clock)
    policies = AttestationPolicies(MemoryKeyValueStorage(clock), reference_values, WORKERS)
    service = BuiltinAttestationService(
        BuiltinAsConfig(),
        signer or TokenSigner.ephemeral(),
        policies,
        reference_values,
        clock=clock,
    )
    asyncio.run(service.start())
    return service


def test_token_layout_and_signature() -> None:
    signer = TokenSigner.ephemeral()
    service = _service(signer, clock=lambda: 1000.0)
    token = asyncio.run(service.verify([_evidence()]))
    claims = verify_jwt(token, signer.public_key, now=1001.0)
    assert claims["eat_profile"] == "tag:github.com,2024:confidential-containers/Trustee"
    assert claims["iss"] == "CoCo-Attestation-Service" and claims["exp"] == 1300
    cpu0 = obj(at(claims, "submods", "cpu0"))
    assert cpu0["ear.appraisal-policy-id"] == "default"
    assert set(obj(cpu0["ear.trustworthiness-vector"])) == {
        "instance-identity",
        "configuration",
        "executables",
        "file-system",
        "hardware",
        "runtime-opaque",
        "storage-opaque",
        "sourced-data",
    }
    evidence = obj(cpu0["ear.veraison.annotated-evidence"])
    assert set(evidence) == {"report_data", "runtime_data_claims", "sample"}
    assert "report_data" not in obj(evidence["sample"])
    header, _ = decode_unverified(token)
    assert header["jwk"] == signer.jwk


def test_init_data_digest_bound_and_claimed() -> None:
    body = 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "x = 1"\n'
    service = _service()
    token = asyncio.run(service.verify([_evidence(InitData(format="toml", body=body))]))
    _, claims = decode_unverified(token)
    evidence = obj(at(claims, "submods", "cpu0", "ear.veraison.annotated-evidence"))
    assert base64.b64decode(string(evidence["init_data"])) == hashlib.sha256(body.encode()).digest()
    assert evidence["init_data_claims"] == {"aa.toml": {"x": 1}}  # TOML documents become JSON


def test_bad_init_data_rejected() -> None:
    service = _service()
    with pytest.raises(BadRequestError):
        asyncio.run(service.verify([_evidence(InitData(format="toml", body="algorithm='md5'"))]))
    with pytest.raises(BadRequestError, match="toml or json"):
        asyncio.run(service.verify([_evidence(InitData(format="yaml", body="a: 1"))]))
    with pytest.raises(BadRequestError, match="not valid toml"):
        asyncio.run(service.verify([_evidence(InitData(format="toml", body="[data"))]))


def test_json_init_data_digest_over_raw_body() -> None:
    body = '{"version": "0.1.0", "algorithm": "sha384", "data": {"cdh.toml": "a = \\"b\\""}}'
    token = asyncio.run(_service().verify([_evidence(InitData(format="json", body=body))]))
    _, claims = decode_unverified(token)
    evidence = obj(at(claims, "submods", "cpu0", "ear.veraison.annotated-evidence"))
    assert base64.b64decode(string(evidence["init_data"])) == hashlib.sha384(body.encode()).digest()
    assert evidence["init_data_claims"] == {"cdh.toml": {"a": "b"}}


def test_no_evidence_and_unknown_tee_rejected() -> None:
    service = _service()
    with pytest.raises(AttestationError):
        asyncio.run(service.verify([]))
    # a TEE this service has no verifier for (every TEE has one in a full build)
    service._verifiers.pop(Tee.CCA)
    cca = EvidenceToVerify(Tee.CCA, {}, {}, HashAlgorithm.SHA384)
    with pytest.raises(AttestationError, match="no verifier"):
        asyncio.run(service.verify([cca]))


def test_signer_refuses_non_p256_key() -> None:
    with pytest.raises(ConfigError, match="P-256"):
        TokenSigner(ec.generate_private_key(ec.SECP384R1()), [])

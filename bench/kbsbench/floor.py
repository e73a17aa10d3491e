"""The crypto floor: the server-side work one handshake cannot avoid, in a tight loop.

One guest handshake makes the server, at the least:
- hash the runtime data (JCS, then SHA-384) to check the evidence binds it;
- evaluate the compiled default attestation policy on the guest's claims (both entry points,
  the trust vector and the extensions, with the reference values it reads), in rego-cpp: the
  server remembers appraisals, so a guest whose claims the policy has judged before costs it
  less than this; a floor counts the first of its kind;
- sign the EAR token (ES256);
- verify that token's signature when the guest GETs its resource (the first time: the KBS
  remembers tokens it has verified);
- wrap the resource for the guest's key as a JWE (ECDH-ES+A256KW for an EC P-256 key;
  RSA-OAEP-256 for an RSA-2048 key, measured too).
Each is timed on its own here, in this process, on one core. The floor is the rate of their sum
for an EC guest: how many handshakes per second one core could do with no HTTP, no framework
and no storage at all.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker.attestation.policy import HELPERS, builtin_attestation_policy
from keybroker.attestation.signer import TokenSigner
from keybroker.client.keys import TeeKey
from keybroker.policy.engine import CompiledPolicy, JsonValue
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.jwe import seal
from keybroker.protocol.jwk import parse_tee_pubkey, public_jwk
from keybroker.protocol.jws import decode_unverified, verify_jwt

ENTRYPOINTS = ("policy/trust_claims", "policy/extensions")
SAMPLE_REFERENCES: dict[str, Any] = {
    "svn": ["1"],
    "launch_digest": ["abcde"],
    "major_version": 1,
    "minimum_minor_version": 1,
}


def _per_second(work: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``work``, the median of five slices of ``seconds``/5."""
    rates = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        deadline = start + seconds / 5
        while (now := time.perf_counter()) < deadline:
            work()
            count += 1
        rates.append(count / (now - start))
    return statistics.median(rates)


def measure(token: str, seconds: float = 5.0) -> dict[str, Any]:
    """Microseconds per operation and the floor; ``token`` is a real EAR token from the
    server under test, whose claims are re-signed here (so the payload has its real size)."""
    _, claims = decode_unverified(token)
    now = int(time.time())  # the token may be older than its lifetime by now: renew its dates
    claims = {**claims, "iat": now, "exp": now + 3600}
    signer = TokenSigner.ephemeral()
    signed = signer.sign(claims)
    ec_guest = TeeKey.generate()
    ec_recipient = parse_tee_pubkey(ec_guest.public_jwk())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_recipient = parse_tee_pubkey(public_jwk(rsa_key.public_key()))
    nonce = "q0qYbH2l0pNrVt7-1h4Zsw"
    secret = b"keybroker benchmark secret"
    annotated: JsonValue = {
        "sample": {
            "svn": "1",
            "launch_digest": "abcde",
            "debug": False,
            "platform_version": {"major": 1, "minor": 1},
        }
    }

    policy = CompiledPolicy.compile(  # nothing remembered: every call runs rego-cpp
        builtin_attestation_policy("default_cpu"), entrypoints=ENTRYPOINTS, helpers=HELPERS
    )
    references = {"reference_value": SAMPLE_REFERENCES}
    trust_claims, _ = policy.evaluate_many(ENTRYPOINTS, annotated, references)
    assert isinstance(trust_claims, dict) and min(trust_claims.values()) >= 0

    def hash_runtime_data() -> object:
        return runtime_data_digest(
            runtime_data(nonce, ec_guest.public_jwk(), ""), HashAlgorithm.SHA384
        )

    operations: dict[str, Callable[[], object]] = {
        "runtime_data_hash": hash_runtime_data,
        "policy_evaluation": lambda: policy.evaluate_many(ENTRYPOINTS, annotated, references),
        "ear_sign": lambda: signer.sign(claims),
        # the signature itself: the KBS remembers tokens it verified, a floor counts the first
        "ear_verify": lambda: verify_jwt(signed, signer.public_key, now=time.time()),
        "jwe_wrap_ec_p256": lambda: seal(ec_recipient, secret),
        "jwe_wrap_rsa_2048": lambda: seal(rsa_recipient, secret),
    }
    micros = {
        name: 1e6 / _per_second(work, seconds / len(operations))
        for name, work in operations.items()
    }
    per_handshake = sum(v for k, v in micros.items() if k != "jwe_wrap_rsa_2048")
    return {
        "microseconds": {k: round(v, 1) for k, v in micros.items()},
        "handshake_microseconds": round(per_handshake, 1),
        "floor_per_core": round(1e6 / per_handshake, 1),
    }

"""Remembered token verifications: a token verified with a fixed trusted key is not
re-verified, but still expires; nothing else is remembered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import FakeClock
from keybroker.attestation.signer import TokenSigner
from keybroker.client.keys import TeeKey
from keybroker.config import AttestationTokenConfig
from keybroker.errors import TokenVerificationError
from keybroker.kbs import tokens
from keybroker.kbs.tokens import TokenVerifier
from keybroker.protocol.jwk import TeePublicKey, parse_tee_pubkey
from keybroker.protocol.jws import jwk_of, sign_jwt
from keybroker.protocol.models import JsonValue

NOW = 1_800_000_000


def _verifier(clock: FakeClock) -> tuple[TokenSigner, TokenVerifier]:
    signer = TokenSigner.ephemeral()
    return signer, TokenVerifier([signer.public_key], clock=clock)


def test_a_token_verified_once_is_remembered_and_answers_the_same_claims() -> None:
    signer, verifier = _verifier(FakeClock(NOW))
    token = signer.sign({"exp": NOW + 60, "sub": "guest"})
    first = verifier.verify(token)
    assert verifier.remembered() == 1
    assert verifier.verify(token) == first == {"exp": NOW + 60, "sub": "guest"}
    assert verifier.remembered() == 1


def test_a_remembered_token_still_expires() -> None:
    clock = FakeClock(NOW)
    signer, verifier = _verifier(clock)
    token = signer.sign({"exp": NOW + 60})
    verifier.verify(token)
    clock.advance(61)
    with pytest.raises(TokenVerificationError, match="expired"):
        verifier.verify(token)


def test_a_forged_token_next_to_a_remembered_one_is_refused() -> None:
    signer, verifier = _verifier(FakeClock(NOW))
    token = signer.sign({"exp": NOW + 60, "submods": {"cpu0": {"ear.status": "warning"}}})
    verifier.verify(token)
    head, _, signature = token.split(".")
    forged_claims = {"exp": NOW + 60, "submods": {"cpu0": {"ear.status": "affirming"}}}
    body = sign_jwt(forged_claims, ec.generate_private_key(ec.SECP256R1())).split(".")[1]
    with pytest.raises(TokenVerificationError, match="signature"):
        verifier.verify(f"{head}.{body}.{signature}")
    assert verifier.remembered() == 1


def test_a_refused_token_is_not_remembered() -> None:
    clock = FakeClock(NOW)
    signer, verifier = _verifier(clock)
    stranger = TokenSigner.ephemeral().sign({"exp": NOW + 60})
    expired = signer.sign({"exp": NOW - 1})
    for token in (stranger, expired):
        with pytest.raises(TokenVerificationError):
            verifier.verify(token)
    assert verifier.remembered() == 0


def test_tokens_trusted_through_a_jwk_set_are_verified_every_time(tmp_path: Path) -> None:
    """A key set rotates: what it vouched for is not remembered."""
    issuer = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk_of(issuer.public_key()), "kid": "as-1"}]}))
    verifier = TokenVerifier.from_config(
        AttestationTokenConfig(trusted_jwk_sets=[str(jwks)]), [], clock=FakeClock(NOW)
    )
    token = sign_jwt({"exp": NOW + 60}, issuer, header={"kid": "as-1"})
    assert verifier.verify(token)["exp"] == NOW + 60
    assert verifier.remembered() == 0


def test_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 8)
    signer, verifier = _verifier(FakeClock(NOW))
    for index in range(20):
        verifier.verify(signer.sign({"exp": NOW + 60, "n": index}))
    assert verifier.remembered() == 8


def _claims_with_tee_key(jwk: dict[str, str]) -> dict[str, JsonValue]:
    tee_pubkey: dict[str, JsonValue] = {**jwk}
    evidence: dict[str, JsonValue] = {"runtime_data_claims": {"tee-pubkey": tee_pubkey}}
    return {"submods": {"cpu0": {"ear.veraison.annotated-evidence": evidence}}}


def test_a_tee_key_is_parsed_once_per_jwk(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    parse = parse_tee_pubkey

    def counted(value: object) -> TeePublicKey:
        calls.append(value)
        return parse(value)

    monkeypatch.setattr(tokens, "parse_tee_pubkey", counted)
    _, verifier = _verifier(FakeClock(NOW))
    first, second = TeeKey.generate().public_jwk(), TeeKey.generate().public_jwk()
    keys = [verifier.tee_pubkey(_claims_with_tee_key(jwk)) for jwk in (first, first, second)]
    assert len(calls) == 2
    assert keys[0] is keys[1] and keys[0] != keys[2]
    assert keys[0].to_jwk()["x"] == first["x"]


def test_an_unusable_tee_key_is_refused_every_time() -> None:
    _, verifier = _verifier(FakeClock(NOW))
    jwk = {**TeeKey.generate().public_jwk(), "d": "private part"}
    for _ in range(2):
        with pytest.raises(TokenVerificationError, match="private key member"):
            verifier.tee_pubkey(_claims_with_tee_key(jwk))


def test_remembered_tee_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 3)
    _, verifier = _verifier(FakeClock(NOW))
    for _ in range(6):
        verifier.tee_pubkey(_claims_with_tee_key(TeeKey.generate().public_jwk()))
    assert len(verifier._tee_keys) == 3

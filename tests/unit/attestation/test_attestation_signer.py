"""The token signer: configured key and chain give upstream's header JWK byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import vector
from keybroker.attestation.signer import TokenSigner
from keybroker.config import TokenSignerConfig
from keybroker.errors import ConfigError
from keybroker.protocol.jws import decode_unverified, verify_jwt


def _fixture() -> Path:
    return vector("attestation-service", "fixtures", "jwk")


def test_configured_signer_matches_upstream_jwks_fixture() -> None:
    signer = TokenSigner.from_config(
        TokenSignerConfig(
            key_path=_fixture() / "signing-key.pem", cert_path=_fixture() / "cert-chain.pem"
        )
    )
    expected = json.loads((_fixture() / "expected-jwks.json").read_text())
    assert signer.jwks() == expected
    token = signer.sign({"iat": 1, "exp": 4_000_000_000})
    header, _ = decode_unverified(token)
    assert header["alg"] == "ES256" and header["typ"] == "JWT"
    assert header["jwk"] == expected["keys"][0]
    assert verify_jwt(token, signer.public_key, now=2.0)["iat"] == 1


def test_ephemeral_signer_has_no_chain() -> None:
    signer = TokenSigner.ephemeral()
    assert "x5c" not in signer.jwk and signer.jwk["crv"] == "P-256"


def test_unreadable_or_wrong_signer_material_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read token signer key"):
        TokenSigner.from_config(TokenSignerConfig(key_path=tmp_path / "absent.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        TokenSigner.from_config(TokenSignerConfig(key_path=garbage))
    other = TokenSigner.ephemeral()
    with pytest.raises(ConfigError, match="does not match the key"):
        TokenSigner.from_config(
            TokenSignerConfig(
                key_path=_fixture() / "signing-key.pem", cert_path=_fixture() / "cert-chain.pem"
            ).model_copy(update={"key_path": _write_key(tmp_path, other)})
        )


def _write_key(tmp_path: Path, signer: TokenSigner) -> Path:
    path = tmp_path / "other.pem"
    path.write_bytes(
        signer._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path

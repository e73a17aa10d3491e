"""The EAR token signer: an ES256 (P-256) key, ephemeral or configured, with its certificate chain.

With no ``signer`` configured the key is generated at start-up and lives only in this process:
tokens it signs carry the public key in the header (``jwk``) and nothing else vouches for it.
A configured signer adds ``x5c`` (the chain from ``cert_path``) so relying parties can check the
key against a CA they trust.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.config import TokenSignerConfig
from keybroker.errors import ConfigError
from keybroker.protocol.jws import sign_jwt

log = logging.getLogger(__name__)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenSigner:
    def __init__(self, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("the attestation token signing key must be EC P-256 (ES256)")
        if chain and chain[0].public_key() != key.public_key():
            raise ConfigError("the first certificate of the signer chain does not match the key")
        self._key = key
        self._chain = chain
        self._jwk = self._build_jwk()

    @classmethod
    def ephemeral(cls) -> TokenSigner:
        log.info("no token signer configured: signing attestation tokens with an ephemeral key")
        return cls(ec.generate_private_key(ec.SECP256R1()), [])

    @classmethod
    def from_config(cls, config: TokenSignerConfig | None) -> TokenSigner:
        if config is None:
            return cls.ephemeral()
        key = _load_key(config.key_path)
        chain = _load_chain(config.cert_path) if config.cert_path else []
        return cls(key, chain)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def jwk(self) -> Mapping[str, object]:
        return self._jwk

    def jwks(self) -> dict[str, list[Mapping[str, object]]]:
        return {"keys": [self._jwk]}

    def sign(self, claims: Mapping[str, object]) -> str:
        return sign_jwt(claims, self._key, header={"jwk": self._jwk})

    def _build_jwk(self) -> dict[str, object]:
        numbers = self._key.public_key().public_numbers()
        jwk: dict[str, object] = {
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        if self._chain:
            jwk["x5c"] = [
                base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
                for cert in self._chain
            ]
        return jwk


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(f"cannot read token signer key {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"token signer key {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"token signer key {path} must be an EC P-256 key")
    return key


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read token signer certificate {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"token signer certificate {path} is not a PEM chain") from None
    return chain

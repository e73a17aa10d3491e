"""The guest's TEE key pair: its public half goes into the attestation (``tee-pubkey``), its
private half decrypts the JWE-wrapped resources the KBS releases.

Default: a fresh EC P-256 key (``ECDH-ES+A256KW``). From a PEM file: RSA (PKCS#1 or PKCS#8;
``RSA-OAEP-256``) or EC P-256/P-384/P-521 (PKCS#8).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import ClientError
from keybroker.protocol.jwe import open_jwe
from keybroker.protocol.jwk import public_jwk
from keybroker.protocol.models import JsonValue

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class TeeKey:
    def __init__(self, private_key: PrivateKey) -> None:
        if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < 2048:
            raise ClientError("an RSA TEE key must have at least 2048 bits")
        self._key = private_key

    @classmethod
    def generate(cls) -> TeeKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> TeeKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ClientError(
                "the TEE key file is not an unencrypted PEM private key "
                "(RSA PKCS#1/PKCS#8 or EC PKCS#8)"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ClientError("the TEE key must be an RSA or EC private key")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> TeeKey:
        try:
            return cls.from_pem(path.read_bytes())
        except OSError as e:
            raise ClientError(f"cannot read TEE key file {path}: {e.strerror}") from None

    def public_jwk(self) -> dict[str, str]:
        return public_jwk(self._key.public_key())

    def decrypt(self, jwe: JsonValue) -> bytes:
        # Pin the algorithm this key advertised: a response downgraded to RSA1_5 is refused.
        return open_jwe(self._key, jwe, expected_alg=self.public_jwk()["alg"])

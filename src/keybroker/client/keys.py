"""The guest's TEE key pair: its public half goes into the attestation (``tee-pubkey``), its
private half decrypts the JWE-wrapped resources the KBS releases.

Default: a fresh EC P-256 key (``ECDH-ES+A256KW``). ``generate`` also makes the other kinds
upstream's attestation agent offers, by its ``tee_key_algorithm`` names (``TEE_KEY_ALGORITHMS``),
among them the experimental post-quantum ``ML-KEM-768+A192KW`` (needs the ``pqc`` extra). From
a PEM file: RSA (PKCS#1 or PKCS#8; ``RSA-OAEP-256``), EC P-256/P-384/P-521 (PKCS#8) or
ML-KEM-768 (PKCS#8).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import ClientError
from keybroker.protocol import akp
from keybroker.protocol.jwe import open_jwe
from keybroker.protocol.jwk import public_jwk
from keybroker.protocol.models import JsonValue

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

# A string: the ML-KEM class exists only where the optional package does.
PrivateKey: TypeAlias = "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | MLKEM768PrivateKey"

DEFAULT_TEE_KEY_ALGORITHM = "ECDH-ES+A256KW-P256"
# upstream attestation-agent's `tee_key_algorithm` values -> how to make such a key
TEE_KEY_ALGORITHMS: dict[str, Callable[[], PrivateKey]] = {
    DEFAULT_TEE_KEY_ALGORITHM: lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECDH-ES+A256KW-P521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "RSA-OAEP-256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    akp.ALG_ML_KEM_768_A192KW: akp.generate_private_key,
}


class TeeKey:
    def __init__(self, private_key: PrivateKey) -> None:
        if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < 2048:
            raise ClientError("an RSA TEE key must have at least 2048 bits")
        self._key = private_key

    @classmethod
    def generate(cls, algorithm: str = DEFAULT_TEE_KEY_ALGORITHM) -> TeeKey:
        """A fresh key of one of ``TEE_KEY_ALGORITHMS``."""
        make = TEE_KEY_ALGORITHMS.get(algorithm)
        if make is None:
            raise ClientError(
                f"unknown TEE key algorithm {algorithm[:32]!r}: accepted are "
                f"{', '.join(TEE_KEY_ALGORITHMS)}"
            )
        if algorithm == akp.ALG_ML_KEM_768_A192KW:
            reason = akp.unavailable()
            if reason is not None:
                raise ClientError(f"cannot make an ML-KEM-768 TEE key: {reason}")
        return cls(make())

    @classmethod
    def from_pem(cls, pem: bytes) -> TeeKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ClientError(
                "the TEE key file is not an unencrypted PEM private key "
                "(RSA PKCS#1/PKCS#8, EC PKCS#8 or ML-KEM-768 PKCS#8)"
            ) from None
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            return cls(key)
        if akp.is_private_key(key):
            return cls(key)
        raise ClientError("the TEE key must be an RSA, EC or ML-KEM-768 private key")

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

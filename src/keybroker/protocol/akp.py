"""Post-quantum TEE keys: ``kty`` ``"AKP"`` with ``alg`` ``"ML-KEM-768+A192KW"``, the key
management of upstream's experimental ``pqc-experimental`` build (trustee ``kbs/src/jwe/akp.rs``,
guest-components ``kbs_protocol/src/akp.rs``), after draft-ietf-jose-pqc-kem-05.

The sender encapsulates to the guest's 1184-byte ML-KEM-768 encapsulation key (FIPS 203) and
gets a 32-byte shared secret and a 1088-byte KEM ciphertext. The 24-byte AES-192 key-wrapping
key is ``KMAC256(K=shared secret, X=be32(len(alg)) || alg || be32(192), L=192, S="")``, the
fixed info of RFC 7518's Concat KDF without PartyU/PartyV, as upstream encodes it. ``jwe``
wraps the content key with it and carries the KEM ciphertext in the protected header as ``ek``.
The draft is not final: this is byte-compatible with upstream's code, not with a future RFC.

This module is the only one that imports the packages behind it, both optional (the ``pqc``
extra): ``cryptography`` 47 or later on an OpenSSL with ML-KEM, and ``pycryptodomex`` for
KMAC256, which ``cryptography`` does not offer. Where either is missing ``unavailable()`` says
why, and ``jwk``, ``jwe`` and the client refuse AKP keys with that reason. No I/O.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.mlkem import (
        MLKEM768PrivateKey,
        MLKEM768PublicKey,
    )

KTY_AKP = "AKP"
ALG_ML_KEM_768_A192KW = "ML-KEM-768+A192KW"
PUBLIC_KEY_BYTES = 1184  # FIPS 203 ML-KEM-768 encapsulation key
CIPHERTEXT_BYTES = 1088  # FIPS 203 ML-KEM-768 ciphertext
KEK_BYTES = 24  # AES-192 key wrap
INSTALL_HINT = "install Keybroker with the pqc extra: pip install 'keybroker[pqc]'"


@functools.cache
def unavailable() -> str | None:
    """Why ML-KEM-768+A192KW cannot be used in this environment, or None when it can."""
    # Imported here, not at the top: both packages are optional (the pqc extra).
    try:
        from Cryptodome.Hash import KMAC256  # noqa: F401, PLC0415
    except ImportError:
        return f"KMAC256 needs pycryptodomex; {INSTALL_HINT}"
    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem  # noqa: PLC0415
    except ImportError:
        return f"ML-KEM needs cryptography 47 or later; {INSTALL_HINT}"
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415

    try:
        mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(64))
    except UnsupportedAlgorithm:
        return "the OpenSSL that cryptography uses has no ML-KEM-768 (it needs OpenSSL 3.5+)"
    return None


def load_public_key(raw: bytes) -> MLKEM768PublicKey:
    """An encapsulation key from its raw bytes, checked by the library (FIPS 203's modulus
    check). Call only when ``unavailable()`` is None. Raises ``ValueError``."""
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey  # noqa: PLC0415

    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"expected {PUBLIC_KEY_BYTES} bytes, found {len(raw)} bytes")
    try:
        return MLKEM768PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("not a valid ML-KEM-768 encapsulation key") from None


def generate_private_key() -> MLKEM768PrivateKey:
    """A fresh decapsulation key. Call only when ``unavailable()`` is None."""
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey  # noqa: PLC0415

    return MLKEM768PrivateKey.generate()


def is_public_key(key: object) -> TypeGuard[MLKEM768PublicKey]:
    if unavailable() is not None:
        return False
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey  # noqa: PLC0415

    return isinstance(key, MLKEM768PublicKey)


def is_private_key(key: object) -> TypeGuard[MLKEM768PrivateKey]:
    if unavailable() is not None:
        return False
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey  # noqa: PLC0415

    return isinstance(key, MLKEM768PrivateKey)


def encapsulate(recipient: MLKEM768PublicKey) -> tuple[bytes, bytes]:
    """The sender's half: (key-wrapping key, KEM ciphertext)."""
    shared_secret, ciphertext = recipient.encapsulate()
    return kmac256_kdf(shared_secret), ciphertext


def decapsulate(private_key: MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    """The guest's half: the key-wrapping key. A ciphertext of the right length that was
    altered does not fail here (ML-KEM's implicit rejection yields an unrelated secret); the
    key unwrap that follows does. Raises ``ValueError`` for a wrong length."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise ValueError(
            f"expected an ML-KEM-768 ciphertext of {CIPHERTEXT_BYTES} bytes, "
            f"found {len(ciphertext)} bytes"
        )
    return kmac256_kdf(private_key.decapsulate(ciphertext))


def kmac256_kdf(shared_secret: bytes, algorithm: str = ALG_ML_KEM_768_A192KW) -> bytes:
    """The ``KEK_BYTES`` key-wrapping key upstream derives from the shared secret."""
    from Cryptodome.Hash import KMAC256  # noqa: PLC0415

    alg = algorithm.encode("ascii")
    fixed_info = len(alg).to_bytes(4, "big") + alg + (KEK_BYTES * 8).to_bytes(4, "big")
    return KMAC256.new(key=shared_secret, data=fixed_info, mac_len=KEK_BYTES, custom=b"").digest()

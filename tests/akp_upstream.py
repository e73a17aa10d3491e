"""Upstream's ``ML-KEM-768+A192KW`` resource JWE, restated by hand for the tests.

Written from trustee's ``kbs/src/jwe/akp.rs`` (the sender, commit 78962cd) and guest-components'
``kbs_protocol/src/akp.rs`` and ``keypair.rs`` (the guest), with kbs-types' ``ProtectedHeader``
(``alg``, ``enc``, then the other fields; its AAD is the base64url of that JSON re-serialized).
Nothing here comes from ``keybroker.protocol``: only the primitives are shared (ML-KEM, AES key
wrap and AES-GCM from ``cryptography``, KMAC256 from ``pycryptodomex``), so a test that seals
with one side and opens with the other checks Keybroker's layout against upstream's.
"""

from __future__ import annotations

import base64
import json
import os

from Cryptodome.Hash import KMAC256
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

ALG = "ML-KEM-768+A192KW"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def kdf(shared_secret: bytes) -> bytes:
    """akp.rs ``kmac256_kdf(ss, ALG, 24)``: X = be32(len(alg)) || alg || be32(bits)."""
    fixed_info = len(ALG).to_bytes(4, "big") + ALG.encode() + (24 * 8).to_bytes(4, "big")
    return KMAC256.new(key=shared_secret, data=fixed_info, mac_len=24, custom=b"").digest()


def header_json(header: dict[str, str]) -> bytes:
    """serde's ``ProtectedHeader``: ``alg``, ``enc``, then the flattened rest, compact."""
    rest = {name: header[name] for name in sorted(header) if name not in ("alg", "enc")}
    ordered = {"alg": header["alg"], "enc": header["enc"], **rest}
    return json.dumps(ordered, separators=(",", ":")).encode()


def tee_pubkey(private_key: MLKEM768PrivateKey) -> dict[str, str]:
    """The guest's ``TeePubKey::AKP``: ``kty``, ``alg``, ``pub``."""
    return {"kty": "AKP", "alg": ALG, "pub": b64e(private_key.public_key().public_bytes_raw())}


def seal(jwk: dict[str, str], plaintext: bytes) -> dict[str, str]:
    """The KBS side, as ``ml_kem_768_a192kw`` does it."""
    raw = b64d(jwk["pub"])
    assert len(raw) == 1184
    shared_secret, kem_ciphertext = MLKEM768PublicKey.from_public_bytes(raw).encapsulate()
    cek = os.urandom(32)
    encrypted_key = aes_key_wrap(kdf(shared_secret), cek)
    protected = b64e(header_json({"alg": ALG, "enc": "A256GCM", "ek": b64e(kem_ciphertext)}))
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return {
        "protected": protected,
        "encrypted_key": b64e(encrypted_key),
        "iv": b64e(iv),
        "ciphertext": b64e(sealed[:-16]),
        "tag": b64e(sealed[-16:]),
    }


def open_response(private_key: MLKEM768PrivateKey, response: dict[str, str]) -> bytes:
    """The guest side: ``decapsulate_and_unwrap`` on ``ek`` and ``encrypted_key``, then AES-GCM
    with the AAD rebuilt from the parsed header (``generate_aad``)."""
    header = json.loads(b64d(response["protected"]))
    assert header["alg"] == ALG
    shared_secret = private_key.decapsulate(b64d(header["ek"]))
    cek = aes_key_unwrap(kdf(shared_secret), b64d(response["encrypted_key"]))
    aad = b64e(header_json(header)).encode()
    sealed = b64d(response["ciphertext"]) + b64d(response["tag"])
    return AESGCM(cek).decrypt(b64d(response["iv"]), sealed, aad)

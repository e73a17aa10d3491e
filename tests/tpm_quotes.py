"""TPM quotes made in software for tests: what guest-components' tpm attester sends, signed by
test AKs generated here (no private key is stored anywhere)."""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from standins.azure_vtpm import attest_message

SHA256_ALG = 0x000B
TPM_ALG_RSASSA = 0x0014
EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
AK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_AK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
REPORT_DATA = hashlib.sha384(b"the session's runtime data").digest()  # 48 bytes, as the KBS's
NONCE = REPORT_DATA[:32]  # what the attester quotes: the digest cut to 32 bytes
PCRS = [hashlib.sha256(bytes([i])).digest() for i in range(24)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tpmt_rsassa(signature: bytes) -> bytes:
    return struct.pack(">HHH", TPM_ALG_RSASSA, SHA256_ALG, len(signature)) + signature


def evidence(
    nonce: bytes = NONCE,
    pcrs: list[bytes] | None = None,
    *,
    quoted_pcrs: list[bytes] | None = None,
    signer: rsa.RSAPrivateKey = AK,
    ak: rsa.RSAPrivateKey = AK,
) -> dict[str, Any]:
    """What guest-components' tpm attester sends: ``quoted_pcrs`` are the values the TPM
    hashed into the quote; ``pcrs`` the values sent beside it (the same unless forged)."""
    pcrs = PCRS if pcrs is None else pcrs
    quoted = pcrs if quoted_pcrs is None else quoted_pcrs
    message = attest_message(nonce, quoted)
    signature = signer.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return {
        "ak_public": b64(spki(ak)),
        "tpm_quote": {
            "signature": b64(tpmt_rsassa(signature)),
            "message": b64(message),
            "pcrs": [pcr.hex() for pcr in pcrs],
        },
    }

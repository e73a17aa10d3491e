"""Admin credentials for operators: an Ed25519 key pair, and admin JWTs signed with it.

The public key goes into the KBS config (``identity_providers = [{public_key_uri = ...}]``);
the private key stays with the operator and signs short-lived tokens carrying a ``role``.
Files holding private keys and tokens are written 0600 and never overwritten silently.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keybroker.errors import ClientError
from keybroker.protocol.jws import SigningKey, sign_jwt

DEFAULT_DIR = Path.home() / ".trustee"
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class KeyPairFiles:
    private_key: Path
    public_key: Path


def parse_duration(text: str) -> int:
    """Seconds from ``3600``, ``90s``, ``30m``, ``12h`` or ``7d``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ClientError(f"invalid duration {text!r}: use e.g. 3600, 30m, 12h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def write_private(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise ClientError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def generate_key_pair(
    private_path: Path, public_path: Path, *, force: bool = False
) -> KeyPairFiles:
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force=force,
    )
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPairFiles(private_path, public_path)


def load_signing_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ClientError(f"cannot read admin key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise ClientError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise ClientError(f"{path}: admin keys must be Ed25519, EC or RSA")
    return key


def mint_admin_token(
    key: SigningKey,
    *,
    role: str,
    ttl_seconds: int,
    issuer: str | None = None,
    audience: str | None = None,
    subject: str | None = None,
    now: float | None = None,
) -> str:
    if not role:
        raise ClientError("an admin token needs a role")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "role": role,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    for name, value in (("iss", issuer), ("aud", audience), ("sub", subject)):
        if value:
            claims[name] = value
    return sign_jwt(claims, key)

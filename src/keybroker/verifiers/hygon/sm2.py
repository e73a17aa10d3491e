"""SM2 signature verification (GB/T 32918.2) with SM3 digests, as Hygon's firmware signs.

``cryptography`` hashes SM3 (OpenSSL) but has no SM2 curve, so the curve arithmetic comes from
``gmssl`` (pure Python). That library checks nothing about its inputs and rewrites public keys
given as hex starting with ``0``/``4`` characters, so this module does the checks itself: the
public key is a point of the curve, ``r`` and ``s`` lie in ``[1, n-1]``, and the digest
``e = SM3(Z || message)`` with ``Z = SM3(ENTL || user id || a || b || G || P)`` is computed here.
Only the final equation ``r == e + x1 (mod n)`` with ``(x1, y1) = sG + (r+s)P`` is gmssl's.

Verification costs a few milliseconds of pure-Python big-integer work: callers run it off the
event loop (the Hygon verifiers are ``may_block``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from gmssl import sm2 as _gmssl_sm2

from keybroker.errors import EvidenceError

P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
COORDINATE_BYTES = 32
MAX_USER_ID_BYTES = 8191  # ENTL is the id's length in bits, in two bytes


@dataclass(frozen=True)
class Sm2PublicKey:
    x: int
    y: int

    def __post_init__(self) -> None:
        if not (0 <= self.x < P and 0 <= self.y < P):
            raise EvidenceError("an SM2 public key coordinate is not below the field prime")
        if (self.y * self.y - (self.x**3 + A * self.x + B)) % P != 0:
            raise EvidenceError("an SM2 public key is not a point of the SM2 curve")

    def hex(self) -> str:
        return f"{self.x:064x}{self.y:064x}"


def sm3(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def _be(value: int) -> bytes:
    return value.to_bytes(COORDINATE_BYTES, "big")


def signed_digest(key: Sm2PublicKey, user_id: bytes, message: bytes) -> bytes:
    """``e = SM3(Z || message)``: what an SM2 signature over ``message`` by ``key`` signs."""
    if len(user_id) > MAX_USER_ID_BYTES:
        raise EvidenceError(f"an SM2 user id of {len(user_id)} bytes is too long")
    entl = (len(user_id) * 8).to_bytes(2, "big")
    z = sm3(entl + user_id + _be(A) + _be(B) + _be(GX) + _be(GY) + _be(key.x) + _be(key.y))
    return sm3(z + message)


def verify(key: Sm2PublicKey, user_id: bytes, message: bytes, r: int, s: int) -> bool:
    """True if ``(r, s)`` is ``key``'s SM2 signature over ``message`` with ``user_id``."""
    if not (1 <= r < N and 1 <= s < N) or (r + s) % N == 0:
        return False
    engine = _gmssl_sm2.CryptSM2(private_key=None, public_key="00")
    engine.public_key = key.hex()  # set after construction: its constructor mangles the hex
    return bool(engine.verify(f"{r:064x}{s:064x}", signed_digest(key, user_id, message)))

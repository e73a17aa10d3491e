"""Hygon's certificate formats and the chain HRK → HSK → CEK (→ PEK), all SM2 with SM3.

Two formats, both little endian and fixed size (the ``csv-rs`` crate's ``repr(C)`` layouts):

* a **CA certificate** (832 bytes: HRK, HSK): a 576-byte body (version, key id ``kid``, signer
  id ``sid``, usage, SM2 public key, user id), one signature, reserved bytes;
* a **CSV certificate** (2084 bytes: CEK, PEK): a 1044-byte body (version, firmware version,
  key usage and algorithm, SM2 public key, user id), two signature slots, each with the usage
  and algorithm of the key that made it.

A signature covers the subject's body, with the *issuer's* user id (``HYGON-SSD-HRK``, ...) as
the SM2 user id, as Hygon's firmware and upstream's ``csv-rs`` sign and verify. Coordinates and
signature values are little endian, 32 significant bytes in 72-byte fields.

:func:`verify_chain` checks what upstream checks, and also the usage of every certificate on
the path (HRK, HSK, CEK, PEK), so a key certified for one role never signs in another. The HRK
is never taken from the evidence: it is :func:`pinned_hrk`, shipped in this package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from importlib import resources

from keybroker.errors import EvidenceError
from keybroker.verifiers.hygon import sm2
from keybroker.verifiers.hygon.layout import U8, U16, U32, Array, Bytes, Layout, size_of

SM2_256_GROUP = 3
SM2_SA = 4  # SM2 signature algorithm
SM2_DH = 5
USER_ID_FIELD = 254
HRK_RESOURCE = "hygon-hrk.cert"


class Usage(IntEnum):
    HRK = 0x0000
    HSK = 0x0013
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


# --- layouts (for the JSON form; the binary parse below uses the same offsets) -------------

ECC_PUBKEY: Layout = (("g", U32), ("x", Bytes(72)), ("y", Bytes(72)))
ECDSA_SIGNATURE: Layout = (("r", Bytes(72)), ("s", Bytes(72)))
CA_CERT: Layout = (
    (
        "body",
        (
            (
                "preamble",
                (
                    ("ver", U32),
                    (
                        "data",
                        (
                            ("kid", Bytes(16)),
                            ("sid", Bytes(16)),
                            ("usage", U32),
                            ("reserved", Bytes(24)),
                        ),
                    ),
                ),
            ),
            ("pubkey", ECC_PUBKEY),
            ("uid_size", U16),
            ("user_id", Bytes(USER_ID_FIELD)),
            ("reserved", Bytes(108)),
        ),
    ),
    ("signature", ECDSA_SIGNATURE),
    ("_reserved", Bytes(112)),
)
CSV_SIGNATURE: Layout = (
    ("usage", U32),
    ("algo", U32),
    ("signature", ECDSA_SIGNATURE),
    ("_reserved", Bytes(368)),
)
CSV_CERT: Layout = (
    (
        "body",
        (
            ("ver", U32),
            (
                "data",
                (
                    ("firmware", (("major", U8), ("minor", U8))),
                    ("reserved1", U16),
                    ("pubkey", (("usage", U32), ("algo", U32), ("key", ECC_PUBKEY))),
                    ("uid_size", U16),
                    ("user_id", Bytes(USER_ID_FIELD)),
                    ("sid", Bytes(16)),
                    ("reserved2", Bytes(608)),
                ),
            ),
        ),
    ),
    ("sigs", Array(2, CSV_SIGNATURE)),
)
CA_CERT_SIZE = size_of(CA_CERT)  # 832
CA_BODY_SIZE = 576
CSV_CERT_SIZE = size_of(CSV_CERT)  # 2084
CSV_BODY_SIZE = 1044
HSK_CEK_SIZE = CA_CERT_SIZE + CSV_CERT_SIZE


@dataclass(frozen=True)
class Signature:
    """An SM2 signature as the firmware stores it: r and s, 72 bytes each, little endian."""

    r: int
    s: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> Signature:
        return cls(int.from_bytes(raw[:72], "little"), int.from_bytes(raw[72:144], "little"))


def _public_key(raw: bytes, what: str) -> sm2.Sm2PublicKey:
    """An SM2 key from the 148-byte ``{g, x[72], y[72]}`` structure."""
    (group,) = struct.unpack_from("<I", raw)
    if group != SM2_256_GROUP:
        raise EvidenceError(
            f"the {what} key is on curve group {group}, not SM2-256 ({SM2_256_GROUP})"
        )
    x = int.from_bytes(raw[4 : 4 + sm2.COORDINATE_BYTES], "little")
    y = int.from_bytes(raw[76 : 76 + sm2.COORDINATE_BYTES], "little")
    return sm2.Sm2PublicKey(x, y)


def _user_id(size: int, field: bytes, what: str) -> bytes:
    if size > USER_ID_FIELD:
        raise EvidenceError(f"the {what} user id is {size} bytes, more than the {USER_ID_FIELD}")
    return field[:size]


@dataclass(frozen=True)
class CaCertificate:
    """An HRK or HSK certificate."""

    body: bytes
    kid: bytes
    sid: bytes
    usage: int
    key: sm2.Sm2PublicKey
    user_id: bytes
    signature: Signature

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> CaCertificate:
        if len(raw) != CA_CERT_SIZE:
            raise EvidenceError(f"the {what} certificate is {len(raw)} bytes, not {CA_CERT_SIZE}")
        (usage,) = struct.unpack_from("<I", raw, 36)
        (uid_size,) = struct.unpack_from("<H", raw, 212)
        return cls(
            body=raw[:CA_BODY_SIZE],
            kid=raw[4:20],
            sid=raw[20:36],
            usage=usage,
            key=_public_key(raw[64:212], what),
            user_id=_user_id(uid_size, raw[214:468], what),
            signature=Signature.from_bytes(raw[CA_BODY_SIZE : CA_BODY_SIZE + 144]),
        )


@dataclass(frozen=True)
class SignatureSlot:
    usage: int
    algo: int
    signature: Signature

    @property
    def empty(self) -> bool:
        # as csv-rs: a slot is filled when it names a known usage and an SM2 algorithm
        return self.usage not in set(Usage) or self.algo not in (SM2_SA, SM2_DH)


@dataclass(frozen=True)
class CsvCertificate:
    """A CEK or PEK (or OCA, PDH) certificate."""

    body: bytes
    firmware: tuple[int, int]
    usage: int
    algo: int
    key: sm2.Sm2PublicKey
    user_id: bytes
    slots: tuple[SignatureSlot, SignatureSlot]

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> CsvCertificate:
        if len(raw) != CSV_CERT_SIZE:
            raise EvidenceError(f"the {what} certificate is {len(raw)} bytes, not {CSV_CERT_SIZE}")
        usage, algo = struct.unpack_from("<II", raw, 8)
        (uid_size,) = struct.unpack_from("<H", raw, 164)
        slots = []
        for offset in (CSV_BODY_SIZE, CSV_BODY_SIZE + 520):
            slot_usage, slot_algo = struct.unpack_from("<II", raw, offset)
            signature = Signature.from_bytes(raw[offset + 8 : offset + 152])
            slots.append(SignatureSlot(slot_usage, slot_algo, signature))
        return cls(
            body=raw[:CSV_BODY_SIZE],
            firmware=(raw[4], raw[5]),
            usage=usage,
            algo=algo,
            key=_public_key(raw[16:164], what),
            user_id=_user_id(uid_size, raw[166:420], what),
            slots=(slots[0], slots[1]),
        )


def pinned_hrk() -> CaCertificate:
    """Hygon's root key, as upstream Trustee ships it (``deps/verifier/src/csv/hrk.cert``)."""
    raw = (resources.files("keybroker.verifiers") / "data" / HRK_RESOURCE).read_bytes()
    return CaCertificate.from_bytes(raw, "pinned HRK")


def split_hsk_cek(raw: bytes) -> tuple[CaCertificate, CsvCertificate]:
    """HSK and CEK from KDS's ``hsk_cek`` file: the two certificates back to back."""
    if len(raw) != HSK_CEK_SIZE:
        raise EvidenceError(f"an HSK/CEK file is {len(raw)} bytes, not {HSK_CEK_SIZE}")
    return (
        CaCertificate.from_bytes(raw[:CA_CERT_SIZE], "HSK"),
        CsvCertificate.from_bytes(raw[CA_CERT_SIZE:], "CEK"),
    )


def _require_usage(usage: int, expected: Usage, what: str) -> None:
    if usage != expected:
        raise EvidenceError(f"the {what} certificate has usage {usage:#x}, not {expected.name}")


def verify_ca_signed(issuer: CaCertificate, subject: CaCertificate, what: str) -> None:
    """``issuer`` (an HRK) signed the CA certificate ``subject`` (an HSK, or itself)."""
    _require_usage(issuer.usage, Usage.HRK, f"{what}'s issuer")
    if subject.sid != issuer.kid:
        raise EvidenceError(f"the {what} names signer {subject.sid.hex()}, not the HRK's key id")
    sig = subject.signature
    if not sm2.verify(issuer.key, issuer.user_id, subject.body, sig.r, sig.s):
        raise EvidenceError(f"the {what} certificate's signature does not verify with the HRK")


def _verify_slots(
    key: sm2.Sm2PublicKey, user_id: bytes, usage: int, subject: CsvCertificate, what: str
) -> None:
    """One filled slot of ``subject`` is a signature by ``key``, made in its role ``usage``."""
    for slot in subject.slots:
        if slot.empty or slot.usage != usage or slot.algo != SM2_SA:
            continue
        if sm2.verify(key, user_id, subject.body, slot.signature.r, slot.signature.s):
            return
    raise EvidenceError(f"no signature on the {what} certificate verifies with its issuer")


@lru_cache(maxsize=256)
def _verify_hsk_cek(hrk: CaCertificate, hsk: CaCertificate, cek: CsvCertificate) -> None:
    """HRK (self-signed) → HSK → CEK. A chip's pair is the same on every request, so a pair
    that verified is remembered (a failure raises, and is never remembered)."""
    verify_ca_signed(hrk, hrk, "HRK")
    _require_usage(hsk.usage, Usage.HSK, "HSK")
    verify_ca_signed(hrk, hsk, "HSK")
    _require_usage(cek.usage, Usage.CEK, "CEK")
    _verify_slots(hsk.key, hsk.user_id, Usage.HSK, cek, "CEK")


def verify_chain(
    hrk: CaCertificate, hsk: CaCertificate, cek: CsvCertificate, pek: CsvCertificate | None
) -> None:
    """HRK (self-signed, the pinned one) → HSK → CEK → PEK; ``pek`` None stops at the CEK
    (DCU reports are signed by the CEK itself)."""
    _verify_hsk_cek(hrk, hsk, cek)
    if pek is not None:
        _require_usage(pek.usage, Usage.PEK, "PEK")
        if cek.algo != SM2_SA:
            raise EvidenceError(f"the CEK's algorithm is {cek.algo}, not SM2 signing")
        _verify_slots(cek.key, cek.user_id, Usage.CEK, pek, "PEK")


def verify_signed_by(
    cert: CsvCertificate, usage: Usage, message: bytes, signature: Signature, what: str
) -> None:
    """``cert`` (whose usage must be ``usage``) signed ``message``."""
    _require_usage(cert.usage, usage, f"{what}'s signing")
    if cert.algo != SM2_SA:
        raise EvidenceError(f"the {what}'s signing key algorithm is {cert.algo}, not SM2 signing")
    if not sm2.verify(cert.key, cert.user_id, message, signature.r, signature.s):
        raise EvidenceError(f"the {what} signature does not verify with the {usage.name}")

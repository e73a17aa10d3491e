"""A test Hygon PKI: SM2 keys made per test run, HRK → HSK → CEK → PEK certificates in Hygon's
binary formats, CSV (version 1 and 2) and DCU reports they sign, and the serde JSON form
upstream's attesters send. Not Hygon's: its HRK is a test root, never the pinned one."""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from gmssl import sm2 as gmssl_sm2

from keybroker.protocol.models import JsonValue
from keybroker.verifiers.hygon import sm2
from keybroker.verifiers.hygon.certs import CA_CERT, CSV_CERT, CaCertificate, Usage
from keybroker.verifiers.hygon.csv_report import EXT_MAGIC
from keybroker.verifiers.hygon.dcu import REPORT as DCU_REPORT
from keybroker.verifiers.hygon.layout import Array, Bytes, Int, Layout

SM2_SA = 4


def to_json(layout: Layout, raw: bytes) -> JsonValue:
    """The serde JSON form of ``raw`` (the inverse of ``layout.encode``)."""
    value, rest = _to_json(layout, raw)
    assert rest == b""
    return value


def _to_json(layout: Layout, raw: bytes) -> tuple[JsonValue, bytes]:
    if isinstance(layout, Int):
        return int.from_bytes(raw[: layout.size], "little"), raw[layout.size :]
    if isinstance(layout, Bytes):
        return list(raw[: layout.size]), raw[layout.size :]
    if isinstance(layout, Array):
        items = []
        for _ in range(layout.count):
            item, raw = _to_json(layout.item, raw)
            items.append(item)
        return items, raw
    obj: dict[str, JsonValue] = {}
    for name, item_layout in layout:
        obj[name], raw = _to_json(item_layout, raw)
    return obj, raw


@dataclass(frozen=True)
class Sm2Key:
    d: int
    x: int
    y: int

    @classmethod
    def generate(cls) -> Sm2Key:
        d = secrets.randbelow(sm2.N - 2) + 1
        engine = gmssl_sm2.CryptSM2(private_key=f"{d:064x}", public_key="00")
        point = engine._kg(d, engine.ecc_table["g"])
        return cls(d, int(point[:64], 16), int(point[64:128], 16))

    @property
    def public(self) -> sm2.Sm2PublicKey:
        return sm2.Sm2PublicKey(self.x, self.y)

    def sign(self, user_id: bytes, message: bytes) -> bytes:
        """The 144-byte firmware form: r then s, 72 bytes each, little endian."""
        digest = sm2.signed_digest(self.public, user_id, message)
        engine = gmssl_sm2.CryptSM2(private_key=f"{self.d:064x}", public_key="00")
        engine.public_key = self.public.hex()
        signature = None
        while signature is None:
            signature = engine.sign(digest, secrets.token_hex(32))
        r, s = int(signature[:64], 16), int(signature[64:], 16)
        return r.to_bytes(72, "little") + s.to_bytes(72, "little")

    def ecc(self) -> bytes:
        return struct.pack("<I", 3) + self.x.to_bytes(72, "little") + self.y.to_bytes(72, "little")


def _user_id(uid: bytes) -> bytes:
    return struct.pack("<H", len(uid)) + uid.ljust(254, b"\0")


def ca_cert(
    key: Sm2Key,
    usage: Usage,
    uid: bytes,
    *,
    kid: bytes,
    sid: bytes,
    signer: Sm2Key,
    signer_uid: bytes,
) -> bytes:
    body = struct.pack("<I", 1) + kid + sid + struct.pack("<I", usage) + bytes(24)
    body += key.ecc() + _user_id(uid) + bytes(108)
    return body + signer.sign(signer_uid, body) + bytes(112)


def csv_cert(
    key: Sm2Key,
    usage: Usage,
    uid: bytes,
    *,
    signer: Sm2Key,
    signer_uid: bytes,
    signer_usage: Usage,
) -> bytes:
    body = struct.pack("<IBBHII", 1, 1, 1, 0, usage, SM2_SA) + key.ecc() + _user_id(uid)
    body += bytes(16) + bytes(608)
    slot = struct.pack("<II", signer_usage, SM2_SA) + signer.sign(signer_uid, body) + bytes(368)
    return body + slot + bytes(520)


def _mask(data: bytes, anonce: int) -> bytes:
    mask = anonce.to_bytes(4, "little")
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@dataclass
class HygonPki:
    """One chain of fresh keys; ``hrk`` is what a verifier under test pins."""

    hrk_key: Sm2Key = field(default_factory=Sm2Key.generate)
    hsk_key: Sm2Key = field(default_factory=Sm2Key.generate)
    cek_key: Sm2Key = field(default_factory=Sm2Key.generate)
    pek_key: Sm2Key = field(default_factory=Sm2Key.generate)

    def __post_init__(self) -> None:
        hrk_kid, hsk_kid = secrets.token_bytes(16), secrets.token_bytes(16)
        hrk_uid, hsk_uid, cek_uid = b"HYGON-SSD-HRK", b"HYGON-SSD-HSK", b"HYGON-SSD-CEK"
        self.hrk_bytes = ca_cert(
            self.hrk_key, Usage.HRK, hrk_uid, kid=hrk_kid, sid=hrk_kid, signer=self.hrk_key,
            signer_uid=hrk_uid,
        )  # fmt: skip
        self.hsk_bytes = ca_cert(
            self.hsk_key, Usage.HSK, hsk_uid, kid=hsk_kid, sid=hrk_kid, signer=self.hrk_key,
            signer_uid=hrk_uid,
        )  # fmt: skip
        self.cek_bytes = csv_cert(
            self.cek_key, Usage.CEK, cek_uid, signer=self.hsk_key, signer_uid=hsk_uid,
            signer_usage=Usage.HSK,
        )  # fmt: skip
        self.pek_bytes = csv_cert(
            self.pek_key, Usage.PEK, b"HYGON-SSD-PEK", signer=self.cek_key, signer_uid=cek_uid,
            signer_usage=Usage.CEK,
        )  # fmt: skip
        self.hrk = CaCertificate.from_bytes(self.hrk_bytes, "test HRK")

    @property
    def hsk_cek(self) -> bytes:
        return self.hsk_bytes + self.cek_bytes

    def csv_report_v1(
        self, report_data: bytes, *, policy: int = 0x1, anonce: int = 0x5DC7D726, measure: bytes
    ) -> bytes:
        fields = bytes(32) + bytes(16) + bytes(16) + report_data.ljust(64, b"\0")
        fields += secrets.token_bytes(16) + measure + struct.pack("<I", policy)
        signed = _mask(fields[:176], anonce) + struct.pack("<I", policy ^ anonce)
        tail = struct.pack("<III", Usage.PEK ^ anonce, SM2_SA ^ anonce, anonce)
        info = signed + tail + self.pek_key.sign(b"HYGON-SSD-PEK", signed)
        return info.ljust(4096, b"\0")

    def csv_report_v2(
        self, report_data: bytes, *, policy: int = 0x1, measure: bytes, rtmrs: list[bytes]
    ) -> bytes:
        signed = bytes(64) + report_data.ljust(64, b"\0") + secrets.token_bytes(16) + measure
        signed += struct.pack("<IIIIH", policy, Usage.PEK, SM2_SA, 2337, 1) + bytes(14)
        signed += b"".join(rtmrs) + bytes(656)
        return (signed + self.pek_key.sign(b"HYGON-SSD-PEK", signed)).ljust(4096, b"\0")

    def csv_evidence(
        self,
        report: bytes,
        *,
        version: int = 1,
        serial: bytes = b"TESTCHIP0001",
        with_hsk_cek: bool = False,
        cc_eventlog: str | None = None,
    ) -> dict[str, Any]:
        chain: dict[str, JsonValue] = {"pek": to_json(CSV_CERT, self.pek_bytes)}
        if with_hsk_cek:
            chain["hsk_cek"] = {
                "hsk": to_json(CA_CERT, self.hsk_bytes),
                "cek": to_json(CSV_CERT, self.cek_bytes),
            }
        return {
            "attestation_report": {
                "magic": list(EXT_MAGIC if version == 2 else bytes(16)),
                "flags": 1 if version == 2 else 0,
                "data": list(report),
            },
            "cert_chain": chain,
            "serial_number": list(serial.ljust(64, b"\0")),
            "cc_eventlog": cc_eventlog,
        }

    def dcu_report(self, user_data: bytes, *, chip_id: bytes, measure: bytes) -> JsonValue:
        body = struct.pack("<I", 1) + chip_id.ljust(16, b"\0") + user_data.ljust(64, b"\0")
        body += measure + bytes(128) + struct.pack("<II", Usage.CEK, SM2_SA)
        return to_json(DCU_REPORT, body + self.cek_key.sign(b"HYGON-SSD-CEK", body))

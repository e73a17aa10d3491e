"""IBM Secure Execution binary formats, as the Ultravisor and ``s390-tools`` (libpv) define them.

Pure functions over bytes, no I/O, no trust decisions:

- the SE image header (``hdr.bin``, extracted by ``pvextract-hdr``): its magic, version, the
  plaintext control flags (PCF) and the *tags* the Ultravisor measures: page-, address- and
  tweak-list digests (64 bytes each) and the header's AES-GCM tag (16);
- the Attestation Request Control Block (ARCB) the verifier sends in its challenge: a request
  header, the authenticated flags and measurement algorithm, the verifier's ephemeral P-521
  key, one key slot per host-key document, then a measurement key and nonce encrypted with
  AES-256-GCM under a fresh protection key that each key slot wraps for one host;
- the attestation measurement: HMAC-SHA-512, under the measurement key, over the header tags,
  the Configuration Unique ID, the lengths, user data, nonce and additional data;
- additional data: the image and attestation public host-key hashes (SHA-256 of a host key's
  x‖y coordinates), in the order the request's flags ask for them.

All integers are big-endian; flag bit *n* is counted from the most significant bit (MSB 0).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.errors import EvidenceError

# SE image header
HEADER_MAGIC = b"IBMSecEx"
HEADER_VERSION_1 = 0x0100
HEADER_HEAD_SIZE = 0x1A0  # magic .. tweak-list digest, then key slots, encrypted part, tag
DIGEST_SIZE = 64
TAG_SIZE = 16
TAGS_SIZE = 3 * DIGEST_SIZE + TAG_SIZE  # 208: what the measurement covers of the header
MAX_HEADER_SIZE = 1024 * 1024  # pvimg headers are a few KiB; anything larger is not one
PCF_ALLOW_DUMPING = 34  # plaintext control flag: the guest may be dumped (a debug switch)

# Attestation request (ARCB), version 1, measured with HMAC-SHA-512
ARCB_MAGIC = bytes(8)
ARCB_VERSION_1 = 0x0100
MAI_HMAC_SHA512 = 1
MEASUREMENT_SIZE = 64
MEASUREMENT_KEY_SIZE = 64
NONCE_SIZE = 16
REQUEST_HEADER_SIZE = 48
COORDINATE_SIZE = 80  # each P-521 coordinate, zero-padded
KEYSLOT_SIZE = 80  # public host-key hash (32), wrapped protection key (32), GCM tag (16)
MAX_HOST_KEYS = 255  # the request header counts key slots in one byte
FLAG_NONCE = 1
FLAG_IMAGE_PHKH = 2
FLAG_ATTESTATION_PHKH = 3
PHKH_SIZE = 32
ADDITIONAL_SIZE = 2 * PHKH_SIZE  # what upstream's request asks for: both host-key hashes
MAX_USER_DATA = 256  # architectural limit of the Ultravisor


@dataclass(frozen=True)
class BootHdrTags:
    """The parts of an SE header the attestation measurement covers."""

    pld: bytes
    ald: bytes
    tld: bytes
    tag: bytes

    def to_bytes(self) -> bytes:
        return self.pld + self.ald + self.tld + self.tag

    @classmethod
    def from_bytes(cls, data: bytes) -> BootHdrTags:
        if len(data) != TAGS_SIZE:
            raise EvidenceError(f"SE image_hdr_tags are {len(data)} bytes, expected {TAGS_SIZE}")
        d = DIGEST_SIZE
        return cls(pld=data[:d], ald=data[d : 2 * d], tld=data[2 * d : 3 * d], tag=data[3 * d :])


@dataclass(frozen=True)
class SeHeader:
    tags: BootHdrTags
    pcf: int  # plaintext control flags, MSB 0

    @property
    def dump_allowed(self) -> bool:
        return flag_set(self.pcf, PCF_ALLOW_DUMPING)


def flag_set(flags: int, bit: int) -> bool:
    return bool(flags >> (63 - bit) & 1)


def parse_se_header(data: bytes) -> SeHeader:
    """An SE header as ``pvextract-hdr`` writes it (the header starts at offset 0)."""
    if len(data) < HEADER_HEAD_SIZE:
        raise EvidenceError(f"the SE header is {len(data)} bytes, shorter than its fixed part")
    if data[:8] != HEADER_MAGIC:
        raise EvidenceError("the SE header does not start with the magic IBMSecEx")
    version, size = struct.unpack_from(">II", data, 8)
    if version != HEADER_VERSION_1:
        raise EvidenceError(f"the SE header version is {version:#x}, expected 0x100")
    if not HEADER_HEAD_SIZE + TAG_SIZE <= size <= min(len(data), MAX_HEADER_SIZE):
        raise EvidenceError(f"the SE header claims {size} bytes, but {len(data)} are present")
    (pcf,) = struct.unpack_from(">Q", data, 0x38)
    digests = data[0xE0 : 0xE0 + 3 * DIGEST_SIZE]  # after 64 bytes of fields and a P-521 key
    tags = BootHdrTags.from_bytes(digests + data[size - TAG_SIZE : size])
    return SeHeader(tags=tags, pcf=pcf)


def ec_coordinates(key: ec.EllipticCurvePublicKey) -> bytes:
    """x‖y of a P-521 key, each zero-padded to 80 bytes: how SE encodes and hashes host keys."""
    if not isinstance(key.curve, ec.SECP521R1):
        raise EvidenceError(f"an SE host key must be on P-521, found {key.curve.name}")
    numbers = key.public_numbers()
    return numbers.x.to_bytes(COORDINATE_SIZE, "big") + numbers.y.to_bytes(COORDINATE_SIZE, "big")


def public_host_key_hash(key: ec.EllipticCurvePublicKey) -> bytes:
    return hashlib.sha256(ec_coordinates(key)).digest()


def _keyslot_key(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    # libpv: SHA-256(ECDH shared secret ‖ 00 00 00 01), a one-block ANSI X9.63 KDF
    return hashlib.sha256(private.exchange(ec.ECDH(), peer) + b"\x00\x00\x00\x01").digest()


@dataclass(frozen=True)
class AttestationSecrets:
    """What only the verifier and the Ultravisor may know about one request."""

    measurement_key: bytes
    nonce: bytes


def request_flags() -> int:
    """Upstream's request: a nonce, and both public host-key hashes as additional data."""
    return sum(1 << (63 - bit) for bit in (FLAG_NONCE, FLAG_IMAGE_PHKH, FLAG_ATTESTATION_PHKH))


def build_arcb(
    host_keys: list[ec.EllipticCurvePublicKey],
    secrets: AttestationSecrets,
    *,
    customer_key: ec.EllipticCurvePrivateKey | None = None,
    protection_key: bytes | None = None,
    iv: bytes | None = None,
) -> bytes:
    """An attestation request any of ``host_keys`` can open (the optional values are for
    tests; production draws them fresh)."""
    if not 1 <= len(host_keys) <= MAX_HOST_KEYS:
        raise EvidenceError(f"an SE request needs 1 to {MAX_HOST_KEYS} host keys")
    if len(secrets.measurement_key) != MEASUREMENT_KEY_SIZE or len(secrets.nonce) != NONCE_SIZE:
        raise EvidenceError("an SE request needs a 64-byte measurement key and 16-byte nonce")
    customer_key = customer_key or ec.generate_private_key(ec.SECP521R1())
    protection_key = protection_key or os.urandom(32)
    iv = iv or os.urandom(12)
    auth = struct.pack(">QII", request_flags(), MAI_HMAC_SHA512, 0)
    slots = b""
    for host_key in host_keys:
        wrapped = AESGCM(_keyslot_key(customer_key, host_key)).encrypt(
            bytes(12), protection_key, None
        )
        slots += public_host_key_hash(host_key) + wrapped
    confidential = secrets.measurement_key + secrets.nonce
    body = auth + ec_coordinates(customer_key.public_key()) + slots
    total = REQUEST_HEADER_SIZE + len(body) + len(confidential) + TAG_SIZE
    header = (
        ARCB_MAGIC
        + struct.pack(">II", ARCB_VERSION_1, total)
        + iv
        + bytes(4 + 7)
        + bytes([len(host_keys)])
        + struct.pack(">II", 0, len(confidential))
    )
    aad = header + body
    return aad + AESGCM(protection_key).encrypt(iv, confidential, aad)


@dataclass(frozen=True)
class ArcbView:
    """A parsed attestation request (tests and diagnostics read requests back with it)."""

    flags: int
    mai: int
    customer_key: bytes  # x‖y
    keyslots: list[bytes]
    iv: bytes
    aad: bytes
    encrypted: bytes  # confidential part and its GCM tag


def parse_arcb(data: bytes) -> ArcbView:
    if len(data) < REQUEST_HEADER_SIZE + 16 + 2 * COORDINATE_SIZE:
        raise EvidenceError("the SE attestation request is truncated")
    if data[:8] != ARCB_MAGIC:
        raise EvidenceError("the SE attestation request has the wrong magic")
    version, total = struct.unpack_from(">II", data, 8)
    nks = data[39]
    (sea,) = struct.unpack_from(">I", data, 44)
    if version != ARCB_VERSION_1 or total != len(data):
        raise EvidenceError("the SE attestation request has a wrong version or length")
    aad_end = REQUEST_HEADER_SIZE + 16 + 2 * COORDINATE_SIZE + nks * KEYSLOT_SIZE
    if aad_end + sea + TAG_SIZE != len(data):
        raise EvidenceError("the SE attestation request sizes do not add up")
    flags, mai, _ = struct.unpack_from(">QII", data, REQUEST_HEADER_SIZE)
    start = REQUEST_HEADER_SIZE + 16
    slots_at = start + 2 * COORDINATE_SIZE
    return ArcbView(
        flags=flags,
        mai=mai,
        customer_key=data[start:slots_at],
        keyslots=[
            data[slots_at + i * KEYSLOT_SIZE : slots_at + (i + 1) * KEYSLOT_SIZE]
            for i in range(nks)
        ],
        iv=data[16:28],
        aad=data[:aad_end],
        encrypted=data[aad_end:],
    )


def open_arcb(view: ArcbView, protection_key: bytes) -> AttestationSecrets:
    """Decrypt the request's confidential part (what the Ultravisor does after unwrapping a key
    slot); raises ``cryptography.exceptions.InvalidTag`` on any tampering."""
    plain = AESGCM(protection_key).decrypt(view.iv, view.encrypted, view.aad)
    return AttestationSecrets(
        measurement_key=plain[:MEASUREMENT_KEY_SIZE], nonce=plain[MEASUREMENT_KEY_SIZE:]
    )


def unwrap_keyslot(
    slot: bytes, host_private: ec.EllipticCurvePrivateKey, customer_key: bytes
) -> bytes:
    """The protection key a host recovers from its key slot (the Ultravisor's half)."""
    x = int.from_bytes(customer_key[:COORDINATE_SIZE], "big")
    y = int.from_bytes(customer_key[COORDINATE_SIZE:], "big")
    peer = ec.EllipticCurvePublicNumbers(x, y, ec.SECP521R1()).public_key()
    return AESGCM(_keyslot_key(host_private, peer)).decrypt(bytes(12), slot[PHKH_SIZE:], None)


def measurement(
    measurement_key: bytes,
    tags: BootHdrTags,
    cuid: bytes,
    *,
    user_data: bytes,
    nonce: bytes | None,
    additional_data: bytes,
) -> bytes:
    """The attestation measurement the Ultravisor computes (HMAC-SHA-512)."""
    items = (
        tags.to_bytes()
        + cuid
        + struct.pack(">HHI", len(user_data), 0, len(additional_data))
        + user_data
        + (nonce or b"")
        + additional_data
    )
    return hmac.new(measurement_key, items, hashlib.sha512).digest()


@dataclass(frozen=True)
class AdditionalData:
    image_phkh: bytes
    attestation_phkh: bytes


def parse_additional_data(data: bytes) -> AdditionalData:
    """The additional data of upstream's request flags (image PHKH, then attestation PHKH)."""
    if len(data) != ADDITIONAL_SIZE:
        raise EvidenceError(
            f"SE additional data is {len(data)} bytes, expected {ADDITIONAL_SIZE} "
            "(image and attestation public host-key hashes)"
        )
    return AdditionalData(image_phkh=data[:PHKH_SIZE], attestation_phkh=data[PHKH_SIZE:])

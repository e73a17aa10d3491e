"""TPM 2.0 quotes: parse a TPMS_ATTEST of type quote, check its signature and its PCR digest.

Pure: bytes in, frozen structures out; no TPM, no I/O. Encodings follow TPM 2.0 Library Part 2
(Structures): every integer is big-endian and every ``TPM2B_*`` is a 16-bit size followed by
that many bytes. What this module proves about an ``unverified`` quote (each step fails closed
with :class:`EvidenceError`):

1. the message is a well-formed ``TPMS_ATTEST``: magic ``TPM_GENERATED_VALUE``, type
   ``TPM_ST_ATTEST_QUOTE``, a PCR selection and its digest, nothing after it;
2. the signature was made over exactly those bytes by the attestation key it is checked with
   (RSASSA-PKCS1-v1_5 or ECDSA, with SHA-256, SHA-384 or SHA-512);
3. the PCR values that came beside the quote are the ones it covers: hashed in selection order
   with the signing hash, they give the quote's ``pcrDigest``.

What it does not do: decide whether the attestation key is trustworthy (the caller supplies a key
it already trusts: for Azure's vTPM the one vouched for by the hardware report) or compare the
quote's ``extraData`` to a nonce (the caller knows what the quote must be bound to).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.errors import EvidenceError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSASSA = 0x0014
TPM_ALG_ECDSA = 0x0018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
# SHA-1 is left out on purpose: a SHA-1 quote signature or PCR digest can be forged
HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    TPM_ALG_SHA256: hashes.SHA256,
    TPM_ALG_SHA384: hashes.SHA384,
    TPM_ALG_SHA512: hashes.SHA512,
}
MAX_ATTEST_SIZE = 1024  # TPMU_ATTEST and its TPM2B fields are bounded by the TPM's buffers
MAX_PCR_BANKS = 8
MAX_PCR_SELECT_BYTES = 4  # 32 PCRs; a PC client TPM has 24


@dataclass(frozen=True)
class ClockInfo:
    clock: int  # milliseconds the TPM has been powered
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class PcrSelection:
    """The PCRs of one bank a quote covers, in ascending order (as the TPM hashes them)."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class TpmsAttest:
    """A parsed, *unverified* quote: ``raw`` is the exact byte string the key signs."""

    qualified_signer: bytes  # TPM2B_NAME of the signing key: name algorithm || digest
    extra_data: bytes  # the caller's qualifying data (nonce)
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes


@dataclass(frozen=True)
class TpmSignature:
    """A ``TPMT_SIGNATURE``: RSASSA carries ``signature``; ECDSA carries ``r`` and ``s``."""

    scheme: int
    hash_alg: int
    signature: bytes = b""
    r: bytes = b""
    s: bytes = b""

    @classmethod
    def rsassa(cls, signature: bytes, hash_alg: int = TPM_ALG_SHA256) -> TpmSignature:
        """The signature of a key whose scheme is known out of band (Azure's vTPM sends the
        bare RSASSA-SHA256 signature bytes, not a ``TPMT_SIGNATURE``)."""
        return cls(TPM_ALG_RSASSA, hash_alg, signature=signature)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self._data, self._what, self.offset = data, what, 0

    def take(self, size: int, field: str) -> bytes:
        if self.offset + size > len(self._data):
            raise EvidenceError(f"the {self._what} is truncated at its {field}")
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(field), field)

    def done(self) -> None:
        if self.offset != len(self._data):
            raise EvidenceError(
                f"the {self._what} has {len(self._data) - self.offset} unexpected trailing bytes"
            )


def parse_attest(unverified: bytes) -> TpmsAttest:
    """Parse a marshalled ``TPMS_ATTEST`` that must be a quote (step 1)."""
    if len(unverified) > MAX_ATTEST_SIZE:
        raise EvidenceError(f"the TPM quote message is larger than {MAX_ATTEST_SIZE} bytes")
    reader = _Reader(unverified, "TPM quote message")
    magic = reader.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise EvidenceError(
            f"the TPM quote message starts with {magic:#010x}, not TPM_GENERATED_VALUE "
            f"({TPM_GENERATED_VALUE:#010x}): it was not made by a TPM"
        )
    kind = reader.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise EvidenceError(
            f"the TPM attestation is of type {kind:#06x}, not a quote ({TPM_ST_ATTEST_QUOTE:#06x})"
        )
    qualified_signer = reader.tpm2b("qualifiedSigner")
    extra_data = reader.tpm2b("extraData")
    clock_info = ClockInfo(
        clock=reader.u64("clock"),
        reset_count=reader.u32("resetCount"),
        restart_count=reader.u32("restartCount"),
        safe=bool(reader.u8("safe")),
    )
    firmware_version = reader.u64("firmwareVersion")
    selection = _pcr_selection(reader)
    pcr_digest = reader.tpm2b("pcrDigest")
    reader.done()
    return TpmsAttest(
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock_info=clock_info,
        firmware_version=firmware_version,
        pcr_select=selection,
        pcr_digest=pcr_digest,
        raw=bytes(unverified),
    )


def parse_tpm2b_attest(unverified: bytes) -> TpmsAttest:
    """Parse a ``TPM2B_ATTEST`` (the size-prefixed form ``TPM2_Quote`` returns)."""
    reader = _Reader(unverified, "TPM2B_ATTEST")
    attest = reader.tpm2b("attestationData")
    reader.done()
    return parse_attest(attest)


def _pcr_selection(reader: _Reader) -> tuple[PcrSelection, ...]:
    count = reader.u32("TPML_PCR_SELECTION count")
    if count > MAX_PCR_BANKS:
        raise EvidenceError(f"the TPM quote selects {count} PCR banks, at most {MAX_PCR_BANKS}")
    banks = []
    for _ in range(count):
        hash_alg = reader.u16("PCR bank hash")
        size = reader.u8("sizeofSelect")
        if size > MAX_PCR_SELECT_BYTES:
            raise EvidenceError(f"the TPM quote's PCR bitmap of {size} bytes is too large")
        bitmap = reader.take(size, "pcrSelect")
        pcrs = tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)
        banks.append(PcrSelection(hash_alg, pcrs))
    return tuple(banks)


def parse_tpmt_signature(unverified: bytes) -> TpmSignature:
    """Parse a marshalled ``TPMT_SIGNATURE`` of scheme RSASSA or ECDSA; others are refused
    (RSAPSS salt lengths differ between TPMs, and a wrong guess would be an unclear refusal)."""
    reader = _Reader(unverified, "TPM signature")
    scheme = reader.u16("sigAlg")
    hash_alg = reader.u16("hash")
    if scheme == TPM_ALG_RSASSA:
        signature = TpmSignature(scheme, hash_alg, signature=reader.tpm2b("sig"))
    elif scheme == TPM_ALG_ECDSA:
        r = reader.tpm2b("signatureR")
        signature = TpmSignature(scheme, hash_alg, r=r, s=reader.tpm2b("signatureS"))
    else:
        raise EvidenceError(
            f"TPM signature scheme {scheme:#06x} is not supported (RSASSA {TPM_ALG_RSASSA:#06x}, "
            f"ECDSA {TPM_ALG_ECDSA:#06x})"
        )
    reader.done()
    return signature


def _hash(hash_alg: int) -> hashes.HashAlgorithm:
    algorithm = HASHES.get(hash_alg)
    if algorithm is None:
        raise EvidenceError(
            f"TPM hash algorithm {hash_alg:#06x} is not accepted (SHA-256, SHA-384 or SHA-512)"
        )
    return algorithm()


def verify_signature(
    attest: TpmsAttest,
    signature: TpmSignature,
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
) -> None:
    """Step 2: ``key`` signed ``attest.raw``; the scheme must fit the key's type."""
    algorithm = _hash(signature.hash_alg)
    try:
        if signature.scheme == TPM_ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature.signature, attest.raw, padding.PKCS1v15(), algorithm)
        elif signature.scheme == TPM_ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(
                int.from_bytes(signature.r, "big"), int.from_bytes(signature.s, "big")
            )
            key.verify(der, attest.raw, ec.ECDSA(algorithm))
        else:
            raise EvidenceError(
                f"a TPM signature of scheme {signature.scheme:#06x} cannot be made by a "
                f"{type(key).__name__.removeprefix('_')} attestation key"
            )
    except InvalidSignature:
        raise EvidenceError("the TPM quote is not signed by the attestation key") from None


def pcr_values(
    attest: TpmsAttest, values: Sequence[bytes], hash_alg: int
) -> dict[tuple[int, int], bytes]:
    """Step 3: the PCR ``values`` (given in selection order) checked against the quote's
    ``pcrDigest``, hashed with ``hash_alg`` (the signing scheme's hash); returned keyed by
    (bank hash algorithm, PCR index)."""
    slots = [(bank.hash_alg, index) for bank in attest.pcr_select for index in bank.pcrs]
    if len(values) != len(slots):
        raise EvidenceError(
            f"the TPM quote covers {len(slots)} PCRs, the evidence gives {len(values)} values"
        )
    digest = hashlib.new(_hash(hash_alg).name)
    for (bank, index), value in zip(slots, values, strict=True):
        size = _hash(bank).digest_size
        if len(value) != size:
            raise EvidenceError(
                f"PCR {index} of bank {bank:#06x} is {len(value)} bytes, not {size}"
            )
        digest.update(value)
    if digest.digest() != attest.pcr_digest:
        raise EvidenceError("the PCR values do not hash to the TPM quote's PCR digest")
    return dict(zip(slots, values, strict=True))


def init_data_pcr_value(digest: bytes) -> bytes:
    """A SHA-256 PCR after one extension with ``digest`` from its reset value (zeros): where
    guest-components' TPM attesters put the init-data digest (PCR 8)."""
    return hashlib.sha256(bytes(32) + digest).digest()

"""The Arm CCA attestation token: decoding and signature checks, no trust decisions.

A CCA token is a CBOR tag 399 map (an EAT collection) holding two COSE_Sign1 messages:

- ``44234``: the **platform token**, signed by the CCA Platform Attestation Key (CPAK); its
  ``challenge`` is the hash of the realm's public key (the RAK binding);
- ``44241``: the **realm token**, signed by the Realm Attestation Key (RAK) whose public key
  it carries; its ``challenge`` is the 64 bytes the realm asked the RMM to sign (for a KBS
  guest: the runtime-data digest, zero-padded).

Claim keys and value rules follow the RMM specification (A.7.2.3) as Veraison's ``ccatoken``
reads them: mandatory claims, fixed sizes for identifiers, 32/48/64-byte measurements,
``sha-256``/``sha-512`` hash names, the PSA lifecycle ranges, no duplicated key.

What this module does: parse untrusted bytes into frozen claim sets, bounded (size, depth,
counts), and check a COSE_Sign1 signature with a given key (:func:`verify_sign1`). What it does
not do: decide which CPAK is trusted, match reference values or bindings to a session; that is
:mod:`keybroker.verifiers.arm.cca`.

COSE is done here with ``cryptography`` rather than ``pycose``: a CCA verifier needs only
COSE_Sign1 verification with ECDSA, and doing it directly lets the algorithm be pinned to the
key's curve (the message's own ``alg`` header only has to agree), the CBOR be decoded once with
depth and duplicate-key limits, and avoids a dependency for ~40 lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.errors import EvidenceError

# a real token is ~2 KiB; the platform token grows with its firmware component list
MAX_TOKEN_BYTES = 32 * 1024
MAX_SW_COMPONENTS = 64
MAX_TEXT_CLAIM = 1024
_MAX_CBOR_DEPTH = 8

COLLECTION_TAG = 399
COSE_SIGN1_TAG = 18
PLATFORM_LABEL = 44234
REALM_LABEL = 44241

PLATFORM_PROFILE_LEGACY = "http://arm.com/CCA-SSD/1.0.0"
PLATFORM_PROFILE = "tag:arm.com,2023:cca_platform#1.0.0"
REALM_PROFILE = "tag:arm.com,2023:realm#1.0.0"

# COSE algorithm ids (RFC 9053) for ECDSA, by the curve that must carry them
_ALG_BY_CURVE: dict[str, tuple[int, hashes.HashAlgorithm]] = {
    "secp256r1": (-7, hashes.SHA256()),
    "secp384r1": (-35, hashes.SHA384()),
    "secp521r1": (-36, hashes.SHA512()),
}
_HASHES = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_MEASUREMENT_SIZES = (32, 48, 64)
# PSA lifecycle ranges (major state in the top byte): unknown, assembly and test, RoT
# provisioning, secured, non-RoT debug, recoverable RoT debug, decommissioned
_LIFECYCLE_MAJORS = range(0x00, 0x07)


@dataclass(frozen=True)
class CoseSign1:
    protected: bytes  # the serialized protected header, as signed
    alg: int
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class SwComponent:
    measurement_value: bytes
    signer_id: bytes
    measurement_type: str | None = None
    version: str | None = None
    hash_algo_id: str | None = None


@dataclass(frozen=True)
class PlatformClaims:
    profile: str
    challenge: bytes
    implementation_id: bytes
    instance_id: bytes
    config: bytes
    lifecycle: int
    sw_components: tuple[SwComponent, ...]
    hash_algo_id: str
    service_indicator: str | None


@dataclass(frozen=True)
class RealmClaims:
    challenge: bytes
    personalization_value: bytes
    initial_measurement: bytes
    extensible_measurements: tuple[bytes, bytes, bytes, bytes]
    hash_algo_id: str
    public_key: bytes  # as carried: a raw SEC1 point, or a COSE_Key (realm profile)
    public_key_hash_algo_id: str
    profile: str | None


@dataclass(frozen=True)
class CcaToken:
    platform_envelope: CoseSign1
    realm_envelope: CoseSign1
    platform: PlatformClaims
    realm: RealmClaims


def _cbor(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(
            data,
            max_depth=_MAX_CBOR_DEPTH,
            allow_duplicate_keys=False,
            allow_indefinite=False,
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as e:
        raise EvidenceError(f"the CCA {what} is not valid CBOR: {e}") from None


def _is_array(value: object) -> bool:
    # cbor2 yields tuples (and frozendicts) for containers under a tag
    return isinstance(value, list | tuple)


def _bytes(value: object, what: str, sizes: tuple[int, ...] | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise EvidenceError(f"the CCA {what} must be a byte string")
    if sizes is not None and len(value) not in sizes:
        allowed = " or ".join(str(s) for s in sizes)
        raise EvidenceError(f"the CCA {what} is {len(value)} bytes, expected {allowed}")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT_CLAIM:
        raise EvidenceError(f"the CCA {what} must be a text string of at most {MAX_TEXT_CLAIM}")
    return value


def _hash_name(value: object, what: str) -> str:
    name = _text(value, what)
    if name not in _HASHES:
        raise EvidenceError(f"the CCA {what} is {name!r}, expected sha-256 or sha-512")
    return name


def _claims_map(payload: bytes, what: str) -> dict[int, Any]:
    claims = _cbor(payload, what)
    if not isinstance(claims, Mapping):
        raise EvidenceError(f"the CCA {what} is not a CBOR map")
    # CCA defines integer keys only; others are ignored, as Veraison's ccatoken does
    return {k: v for k, v in claims.items() if isinstance(k, int) and not isinstance(k, bool)}


def _required(claims: Mapping[Any, Any], key: int, what: str) -> Any:
    if key not in claims:
        raise EvidenceError(f"the CCA {what} claim (key {key}) is missing")
    return claims[key]


def parse_sign1(data: object, what: str) -> CoseSign1:
    """A COSE_Sign1 message (tagged 18 or untagged), its algorithm from the protected header."""
    message = _cbor(_bytes(data, what), what)
    if isinstance(message, cbor2.CBORTag):
        if message.tag != COSE_SIGN1_TAG:
            raise EvidenceError(f"the CCA {what} has CBOR tag {message.tag}, not COSE_Sign1 (18)")
        message = message.value
    if not _is_array(message) or len(message) != 4:
        raise EvidenceError(f"the CCA {what} is not a COSE_Sign1 array of 4 items")
    protected, unprotected, payload, signature = message
    protected = _bytes(protected, f"{what} protected header")
    header = _cbor(protected, f"{what} protected header") if protected else {}
    if not isinstance(header, Mapping) or not isinstance(unprotected, Mapping):
        raise EvidenceError(f"the CCA {what} headers are not CBOR maps")
    if 2 in header or 2 in unprotected:
        # critical headers we would have to understand: none is defined for CCA
        raise EvidenceError(f"the CCA {what} names critical COSE headers; none is supported")
    alg = header.get(1)
    if not isinstance(alg, int) or isinstance(alg, bool):
        raise EvidenceError(f"the CCA {what} has no integer `alg` in its protected header")
    return CoseSign1(
        protected=protected,
        alg=alg,
        payload=_bytes(payload, f"{what} payload"),  # nil (detached) is refused here
        signature=_bytes(signature, f"{what} signature"),
    )


def verify_sign1(message: CoseSign1, key: ec.EllipticCurvePublicKey, what: str) -> None:
    """Raise unless ``key`` signed ``message``. The algorithm is the one of the key's curve;
    a message naming another one is refused (no algorithm substitution)."""
    pinned = _ALG_BY_CURVE.get(key.curve.name)
    if pinned is None:
        raise EvidenceError(f"the CCA {what} key is on {key.curve.name}, which is not supported")
    alg, digest = pinned
    if message.alg != alg:
        raise EvidenceError(
            f"the CCA {what} names COSE algorithm {message.alg}, but its key requires {alg}"
        )
    width = (key.curve.key_size + 7) // 8
    if len(message.signature) != 2 * width:
        raise EvidenceError(
            f"the CCA {what} signature is {len(message.signature)} bytes, expected {2 * width}"
        )
    r = int.from_bytes(message.signature[:width], "big")
    s = int.from_bytes(message.signature[width:], "big")
    to_be_signed = cbor2.dumps(["Signature1", message.protected, b"", message.payload])
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(digest))
    except InvalidSignature:
        raise EvidenceError(f"the CCA {what} signature does not verify") from None


def _sw_component(value: object, index: int) -> SwComponent:
    what = f"platform sw-component {index}"
    if not isinstance(value, Mapping):
        raise EvidenceError(f"the CCA {what} is not a map")
    unknown = set(value) - {1, 2, 4, 5, 6}
    if unknown:
        raise EvidenceError(f"the CCA {what} has unknown keys {sorted(map(str, unknown))}")
    return SwComponent(
        measurement_value=_bytes(
            _required(value, 2, f"{what} measurement-value"),
            f"{what} measurement-value",
            _MEASUREMENT_SIZES,
        ),
        signer_id=_bytes(
            _required(value, 5, f"{what} signer-id"), f"{what} signer-id", _MEASUREMENT_SIZES
        ),
        measurement_type=_text(value[1], f"{what} measurement-type") if 1 in value else None,
        version=_text(value[4], f"{what} version") if 4 in value else None,
        hash_algo_id=_hash_name(value[6], f"{what} hash-algo-id") if 6 in value else None,
    )


def _lifecycle(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EvidenceError("the CCA platform lifecycle must be an integer")
    if not 0 <= value <= 0xFFFF or value & 0x0F00 or (value >> 12) not in _LIFECYCLE_MAJORS:
        raise EvidenceError(f"the CCA platform lifecycle {value:#x} is not a PSA lifecycle state")
    return value


def parse_platform(payload: bytes) -> PlatformClaims:
    claims = _claims_map(payload, "platform claims")
    profile = _text(_required(claims, 265, "platform profile"), "platform profile")
    if profile not in (PLATFORM_PROFILE, PLATFORM_PROFILE_LEGACY):
        raise EvidenceError(f"the CCA platform profile {profile!r} is not supported")
    components = _required(claims, 2399, "platform sw-components")
    if not _is_array(components) or not 1 <= len(components) <= MAX_SW_COMPONENTS:
        raise EvidenceError(
            f"the CCA platform sw-components must be a list of 1 to {MAX_SW_COMPONENTS} maps"
        )
    indicator = claims.get(2400)
    return PlatformClaims(
        profile=profile,
        challenge=_bytes(
            _required(claims, 10, "platform challenge"), "platform challenge", _MEASUREMENT_SIZES
        ),
        implementation_id=_bytes(
            _required(claims, 2396, "platform implementation-id"),
            "platform implementation-id",
            (32,),
        ),
        instance_id=_bytes(
            _required(claims, 256, "platform instance-id"), "platform instance-id", (33,)
        ),
        config=_bytes(_required(claims, 2401, "platform config"), "platform config"),
        lifecycle=_lifecycle(_required(claims, 2395, "platform lifecycle")),
        sw_components=tuple(_sw_component(c, i) for i, c in enumerate(components)),
        hash_algo_id=_hash_name(
            _required(claims, 2402, "platform hash-algo-id"), "platform hash-algo-id"
        ),
        service_indicator=None
        if indicator is None
        else _text(indicator, "platform verification-service"),
    )


def parse_realm(payload: bytes) -> RealmClaims:
    claims = _claims_map(payload, "realm claims")
    profile = None
    if 265 in claims:
        profile = _text(claims[265], "realm profile")
        if profile != REALM_PROFILE:
            raise EvidenceError(f"the CCA realm profile {profile!r} is not supported")
    rems = _required(claims, 44239, "realm extensible-measurements")
    if not _is_array(rems) or len(rems) != 4:
        raise EvidenceError("the CCA realm extensible-measurements must be a list of 4")
    rem = tuple(
        _bytes(m, f"realm extensible-measurement {i}", _MEASUREMENT_SIZES)
        for i, m in enumerate(rems)
    )
    public_key = _bytes(_required(claims, 44237, "realm public-key"), "realm public-key")
    if profile is None and len(public_key) != 97:
        raise EvidenceError(
            f"the CCA realm public-key is {len(public_key)} bytes, expected a 97-byte P-384 point"
        )
    return RealmClaims(
        challenge=_bytes(_required(claims, 10, "realm challenge"), "realm challenge", (64,)),
        personalization_value=_bytes(
            _required(claims, 44235, "realm personalization-value"),
            "realm personalization-value",
            (64,),
        ),
        initial_measurement=_bytes(
            _required(claims, 44238, "realm initial-measurement"),
            "realm initial-measurement",
            _MEASUREMENT_SIZES,
        ),
        extensible_measurements=(rem[0], rem[1], rem[2], rem[3]),
        hash_algo_id=_hash_name(
            _required(claims, 44236, "realm hash-algo-id"), "realm hash-algo-id"
        ),
        public_key=public_key,
        public_key_hash_algo_id=_hash_name(
            _required(claims, 44240, "realm public-key-hash-algo-id"),
            "realm public-key-hash-algo-id",
        ),
        profile=profile,
    )


def parse_token(unverified: bytes) -> CcaToken:
    """Both tokens of a CCA attestation token, decoded but not yet verified."""
    if len(unverified) > MAX_TOKEN_BYTES:
        raise EvidenceError(
            f"the CCA token is {len(unverified)} bytes, more than the {MAX_TOKEN_BYTES} allowed"
        )
    collection = _cbor(unverified, "token")
    if not isinstance(collection, cbor2.CBORTag) or collection.tag != COLLECTION_TAG:
        raise EvidenceError(f"the CCA token is not a CBOR tag {COLLECTION_TAG} collection")
    if not isinstance(collection.value, Mapping) or set(collection.value) != {
        PLATFORM_LABEL,
        REALM_LABEL,
    }:
        raise EvidenceError(
            f"the CCA token collection must hold exactly the platform ({PLATFORM_LABEL}) and "
            f"realm ({REALM_LABEL}) tokens"
        )
    platform = parse_sign1(collection.value[PLATFORM_LABEL], "platform token")
    realm = parse_sign1(collection.value[REALM_LABEL], "realm token")
    return CcaToken(platform, realm, parse_platform(platform.payload), parse_realm(realm.payload))


def realm_public_key(realm: RealmClaims) -> ec.EllipticCurvePublicKey:
    """The RAK: a raw SEC1 P-384 point (legacy profile) or an EC2 COSE_Key (realm profile)."""
    if realm.profile is None:
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), realm.public_key)
        except ValueError:
            raise EvidenceError("the CCA realm public-key is not a P-384 point") from None
    cose_key = _cbor(realm.public_key, "realm public-key COSE_Key")
    curves: dict[int, ec.EllipticCurve] = {
        1: ec.SECP256R1(),
        2: ec.SECP384R1(),
        3: ec.SECP521R1(),
    }
    if not isinstance(cose_key, Mapping) or cose_key.get(1) != 2 or cose_key.get(-1) not in curves:
        raise EvidenceError("the CCA realm public-key is not an EC2 COSE_Key on P-256/384/521")
    curve = curves[cose_key[-1]]
    width = (curve.key_size + 7) // 8
    x, y = cose_key.get(-2), cose_key.get(-3)
    if not isinstance(x, bytes) or not isinstance(y, bytes) or len(x) != width or len(y) != width:
        raise EvidenceError("the CCA realm public-key COSE_Key has no valid x and y")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError:
        raise EvidenceError("the CCA realm public-key is not a point on its curve") from None


def rak_digest(realm: RealmClaims) -> bytes:
    """The hash of the RAK claim as carried, which the platform token's challenge must be."""
    return _HASHES[realm.public_key_hash_algo_id](realm.public_key).digest()

"""The guest's ``tee-pubkey`` JWK: parsing it from untrusted JSON, normalizing it for the
runtime-data digest, and building it on the client side.

Accepted keys are exactly the ones the KBS can encrypt a resource to:

- RSA, ``alg`` ``RSA-OAEP-256`` or ``RSA1_5`` (deprecated), modulus 2048 to 8192 bits;
- EC on P-256, P-384 or P-521, ``alg`` ``ECDH-ES+A256KW``, the point on the curve;
- AKP (upstream's experimental post-quantum key), ``alg`` ``ML-KEM-768+A192KW``, ``pub`` the
  1184-byte ML-KEM-768 encapsulation key, checked by the library. It needs the ``pqc`` extra
  (see ``akp``); without it such a key is refused with that reason.

``alg`` is required: upstream clients always send it, and guessing it would let two parties
hash two different JWKs for the same key. Anything else is a ``BadRequestError`` that names the
member and what was expected; key material never appears in a message.

The module also holds the small encoding helpers (base64url, strict JSON) that ``jwe`` and
``jws`` share. It does no I/O and does not decide whether a key is trusted: that is what the
attestation evidence binding (``canonical.runtime_data_digest``) is for.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.errors import BadRequestError, ClientError
from keybroker.protocol import akp
from keybroker.protocol.akp import ALG_ML_KEM_768_A192KW, KTY_AKP
from keybroker.protocol.models import JsonValue

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey

ALG_ECDH_ES_A256KW = "ECDH-ES+A256KW"
ALG_RSA_OAEP_256 = "RSA-OAEP-256"
ALG_RSA1_5 = "RSA1_5"
RSA_ALGORITHMS = frozenset({ALG_RSA_OAEP_256, ALG_RSA1_5})

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
# A huge public exponent turns every encryption into the cost of a private-key operation: an
# unauthenticated guest could make the KBS burn CPU. Real keys use 65537.
MAX_RSA_EXPONENT_BITS = 64

# JWK curve name -> cryptography curve class; coordinates are (key_size + 7) // 8 bytes.
CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

# Private members of RSA and EC JWKs (RFC 7518 §6.2.2, §6.3.2), the symmetric "k" and the AKP
# "priv". A guest sending one leaks its own secret; refusing loudly beats silently dropping it.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k", "priv"})
# Public metadata some JWK libraries add. Not part of the normalized JWK, so ignored.
_IGNORED_MEMBERS = frozenset({"kid", "use", "key_ops", "ext"})
_RSA_MEMBERS = frozenset({"kty", "alg", "n", "e"})
_EC_MEMBERS = frozenset({"kty", "crv", "alg", "x", "y"})
_AKP_MEMBERS = frozenset({"kty", "alg", "pub"})

# Longest base64url string any accepted member can need (an 8192-bit modulus is 1366
# characters, an ML-KEM-768 key 1579); checked before decoding so a huge string costs nothing.
_MAX_MEMBER_LENGTH = 2048
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@dataclass(frozen=True)
class TeePublicKey:
    """A parsed, validated ``tee-pubkey``. ``crv`` is None for RSA and AKP keys."""

    alg: str
    kty: str
    crv: str | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | MLKEM768PublicKey

    def to_jwk(self) -> dict[str, str]:
        """The normalized JWK that goes into the runtime-data digest: only the members upstream
        re-serializes, base64url without padding, minimal ``n``/``e``, fixed-length ``x``/``y``,
        the raw encapsulation key as ``pub``."""
        if isinstance(self.key, rsa.RSAPublicKey):
            numbers = self.key.public_numbers()
            return {
                "kty": "RSA",
                "alg": self.alg,
                "n": b64url_encode(minimal_bytes(numbers.n)),
                "e": b64url_encode(minimal_bytes(numbers.e)),
            }
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            x, y = ec_coordinates(self.key)
            return {"kty": "EC", "crv": self.crv or "", "alg": self.alg, "x": x, "y": y}
        return {"kty": KTY_AKP, "alg": self.alg, "pub": b64url_encode(self.key.public_bytes_raw())}


def parse_tee_pubkey(unverified_jwk: object) -> TeePublicKey:
    """Parse the guest's ``tee-pubkey`` (untrusted). Raises ``BadRequestError``."""
    if not isinstance(unverified_jwk, Mapping):
        raise BadRequestError(
            f"tee-pubkey: expected a JWK object, found {_type_name(unverified_jwk)}"
        )
    members = set(unverified_jwk)
    private = sorted(members & _PRIVATE_MEMBERS)
    if private:
        raise BadRequestError(
            f"tee-pubkey: private key member {private[0]!r} must not be sent; "
            "send the public key only"
        )
    kty = _string_member(unverified_jwk, "kty")
    if kty == "RSA":
        return _parse_rsa(unverified_jwk, members)
    if kty == "EC":
        return _parse_ec(unverified_jwk, members)
    if kty == KTY_AKP:
        return _parse_akp(unverified_jwk, members)
    raise BadRequestError(f'tee-pubkey: expected kty "RSA", "EC" or "AKP", found {shown(kty)}')


def _parse_rsa(jwk: Mapping[str, object], members: set[str]) -> TeePublicKey:
    _check_members(members, _RSA_MEMBERS)
    alg = _string_member(jwk, "alg")
    if alg not in RSA_ALGORITHMS:
        raise BadRequestError(
            f'tee-pubkey: expected alg "RSA-OAEP-256" or "RSA1_5" for an RSA key, '
            f"found {shown(alg)}"
        )
    n = int.from_bytes(_b64_member(jwk, "n"), "big")
    e = int.from_bytes(_b64_member(jwk, "e"), "big")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise BadRequestError(
            f"tee-pubkey: expected an RSA modulus of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, "
            f"found {n.bit_length()} bits"
        )
    if n % 2 == 0:
        raise BadRequestError("tee-pubkey: member 'n' is not a valid RSA modulus (it is even)")
    if e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise BadRequestError(
            f"tee-pubkey: expected a public exponent 'e' of at most {MAX_RSA_EXPONENT_BITS} "
            f"bits, found {e.bit_length()} bits"
        )
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise BadRequestError(
            "tee-pubkey: members 'n' and 'e' do not form a valid RSA public key "
            "(e must be odd and at least 3)"
        ) from None
    return TeePublicKey(alg=alg, kty="RSA", crv=None, key=key)


def _parse_ec(jwk: Mapping[str, object], members: set[str]) -> TeePublicKey:
    _check_members(members, _EC_MEMBERS)
    crv = _string_member(jwk, "crv")
    alg = _string_member(jwk, "alg")
    if alg != ALG_ECDH_ES_A256KW:
        raise BadRequestError(
            f'tee-pubkey: expected alg "ECDH-ES+A256KW" for an EC key, found {shown(alg)}'
        )
    key = ec_public_key(crv, jwk.get("x"), jwk.get("y"), what="tee-pubkey")
    return TeePublicKey(alg=alg, kty="EC", crv=crv, key=key)


def _parse_akp(jwk: Mapping[str, object], members: set[str]) -> TeePublicKey:
    _check_members(members, _AKP_MEMBERS)
    alg = _string_member(jwk, "alg")
    if alg != ALG_ML_KEM_768_A192KW:
        raise BadRequestError(
            f'tee-pubkey: expected alg "ML-KEM-768+A192KW" for an AKP key, found {shown(alg)}'
        )
    # Fail closed where the KEM cannot run: better a clear 400 at /attest than a token bound
    # to a key no resource can ever be sealed to.
    reason = akp.unavailable()
    if reason is not None:
        raise BadRequestError(f"tee-pubkey: this KBS cannot use AKP (ML-KEM-768) keys: {reason}")
    raw = _b64_member(jwk, "pub")
    if len(raw) != akp.PUBLIC_KEY_BYTES:
        raise BadRequestError(
            f"tee-pubkey: expected member 'pub' of {akp.PUBLIC_KEY_BYTES} bytes for "
            f"ML-KEM-768, found {len(raw)} bytes"
        )
    try:
        key = akp.load_public_key(raw)
    except ValueError:
        raise BadRequestError(
            "tee-pubkey: member 'pub' is not a valid ML-KEM-768 encapsulation key"
        ) from None
    return TeePublicKey(alg=alg, kty=KTY_AKP, crv=None, key=key)


def ec_public_key(crv: object, x: object, y: object, *, what: str) -> ec.EllipticCurvePublicKey:
    """An EC public key from JWK ``crv``/``x``/``y``, with exact coordinate lengths and the point
    checked to be on the curve (an off-curve point enables invalid-curve attacks that recover
    the ECDH private key). Raises ``BadRequestError`` naming ``what``."""
    if not isinstance(crv, str) or crv not in CURVES:
        raise BadRequestError(
            f'{what}: expected crv "P-256", "P-384" or "P-521", found {shown(crv)}'
        )
    curve = CURVES[crv]()
    size = (curve.key_size + 7) // 8
    coordinates = []
    for name, value in (("x", x), ("y", y)):
        raw = _b64_value(value, f"{what}: member {name!r}")
        if len(raw) != size:
            raise BadRequestError(
                f"{what}: expected member {name!r} of {size} bytes for {crv}, "
                f"found {len(raw)} bytes"
            )
        coordinates.append(raw)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(
            curve, b"\x04" + coordinates[0] + coordinates[1]
        )
    except ValueError:
        raise BadRequestError(f"{what}: the point (x, y) is not on curve {crv}") from None


def ec_coordinates(key: ec.EllipticCurvePublicKey) -> tuple[str, str]:
    """Fixed-length base64url ``x`` and ``y`` of an EC public key."""
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    return (
        b64url_encode(numbers.x.to_bytes(size, "big")),
        b64url_encode(numbers.y.to_bytes(size, "big")),
    )


def curve_name(curve: ec.EllipticCurve) -> str | None:
    """The JWK ``crv`` of a supported curve, None for any other."""
    return _CURVE_NAMES.get(curve.name)


def public_jwk(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | MLKEM768PublicKey,
    *,
    rsa_alg: str = ALG_RSA_OAEP_256,
) -> dict[str, str]:
    """The ``tee-pubkey`` a client sends for its key. ``rsa_alg="RSA1_5"`` exists only for
    talking to old servers. Raises ``ClientError`` for keys the KBS would refuse."""
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        if not akp.is_public_key(key):
            raise ClientError(
                "a TEE key must be RSA, EC or ML-KEM-768"
                + (f" ({akp.unavailable()})" if akp.unavailable() else "")
            )
        return TeePublicKey(alg=ALG_ML_KEM_768_A192KW, kty=KTY_AKP, crv=None, key=key).to_jwk()
    if isinstance(key, rsa.RSAPublicKey):
        if rsa_alg not in RSA_ALGORITHMS:
            raise ClientError(
                f'RSA TEE key algorithm must be "RSA-OAEP-256" or "RSA1_5", not {rsa_alg!r}'
            )
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise ClientError(
                f"an RSA TEE key must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, "
                f"not {key.key_size}"
            )
        return TeePublicKey(alg=rsa_alg, kty="RSA", crv=None, key=key).to_jwk()
    crv = curve_name(key.curve)
    if crv is None:
        raise ClientError(f"an EC TEE key must be on P-256, P-384 or P-521, not {key.curve.name}")
    return TeePublicKey(alg=ALG_ECDH_ES_A256KW, kty="EC", crv=crv, key=key).to_jwk()


# --- encoding helpers shared by jwe and jws --------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url: the URL-safe alphabet only, padding optional, canonical trailing bits.
    ``base64.urlsafe_b64decode`` alone silently skips foreign characters, so one encoded value
    could have many spellings. Raises ``ValueError``."""
    if not _B64URL.fullmatch(text):
        raise ValueError("characters outside the base64url alphabet")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1 or (text != stripped and len(text) % 4 != 0):
        raise ValueError("bad length or padding")
    try:
        data = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error:
        raise ValueError("bad length or padding") from None
    if b64url_encode(data) != stripped:
        raise ValueError("non-canonical trailing bits")
    return data


def strict_json_object(data: bytes) -> dict[str, JsonValue]:
    """A JSON object from untrusted bytes. Duplicate member names are refused (two parsers
    reading ``{"alg":"ES256","alg":"none"}`` differently is a classic confusion attack), as are
    NaN/Infinity. Raises ``ValueError``."""
    try:
        value: JsonValue = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except _DuplicateMemberError:
        raise
    except UnicodeDecodeError:
        raise ValueError("invalid UTF-8") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {_type_name(value)}")
    return value


def compact_json(value: Mapping[str, object]) -> bytes:
    """JSON with no whitespace and keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _DuplicateMemberError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateMemberError(f"duplicate member {name[:32]!r}")
        result[name] = value
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


# --- private helpers ------------------------------------------------------------------------


def _check_members(members: set[str], expected: frozenset[str]) -> None:
    missing = sorted(expected - members)
    if missing:
        raise BadRequestError(
            f"tee-pubkey: missing member {missing[0]!r} (expected {', '.join(sorted(expected))}"
            + ("; alg is required" if missing[0] == "alg" else "")
            + ")"
        )
    unknown = sorted(members - expected - _IGNORED_MEMBERS)
    if unknown:
        raise BadRequestError(
            f"tee-pubkey: unexpected member {unknown[0][:32]!r} "
            f"(expected only {', '.join(sorted(expected))})"
        )


def _string_member(jwk: Mapping[str, object], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise BadRequestError(
            f"tee-pubkey: expected member {name!r} to be a string, found {_type_name(value)}"
            + ("; alg is required" if name == "alg" and value is None else "")
        )
    return value


def _b64_member(jwk: Mapping[str, object], name: str) -> bytes:
    return _b64_value(jwk.get(name), f"tee-pubkey: member {name!r}")


def _b64_value(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequestError(f"{what}: expected a base64url string, found {_type_name(value)}")
    if len(value) > _MAX_MEMBER_LENGTH:
        raise BadRequestError(
            f"{what}: expected at most {_MAX_MEMBER_LENGTH} characters, found {len(value)}"
        )
    try:
        raw = b64url_decode(value)
    except ValueError as e:
        raise BadRequestError(f"{what}: expected base64url ({e})") from None
    if not raw:
        raise BadRequestError(f"{what}: expected a non-empty value")
    return raw


def minimal_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def shown(value: object) -> str:
    """A short, safe rendering of an identifier the client sent (never key material)."""
    if isinstance(value, str):
        return repr(value[:32])
    return _type_name(value)


def _type_name(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)

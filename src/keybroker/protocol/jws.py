"""Compact JWS/JWT (RFC 7515, RFC 7519): signing and strict verification.

Signing: ES256 (P-256), ES384 (P-384), RS256 (RSA; PS384 on request, as Intel Trust Authority
signs), header ``{"typ":"JWT","alg":…}`` then the caller's extra members (``jwk``, ``x5c``,
``kid``).

Verification takes the key from the caller, never from the token, and accepts only the
algorithms ES256, ES384, RS256, PS256, PS384 and EdDSA, each only with the key type that
produces it.
That one rule defeats ``alg: none`` and algorithm confusion (an HS256 MAC keyed with the bytes
of the public key). ``exp`` and ``nbf`` are checked against the caller's clock (time is
injected, never read here). Every failure is a ``TokenVerificationError``.

What this module does not do: choose which keys are trusted, fetch JWKS, or check ``iss``,
``aud`` or any claim beyond the time window; callers do that with the verified claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from keybroker.errors import BadRequestError, ConfigError, TokenVerificationError
from keybroker.protocol.jwk import (
    MIN_RSA_BITS,
    b64url_decode,
    b64url_encode,
    compact_json,
    ec_coordinates,
    ec_public_key,
    minimal_bytes,
    shown,
    strict_json_object,
)
from keybroker.protocol.models import JsonValue

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Checked before any decoding, so an oversized token costs nothing to refuse.
MAX_TOKEN_LENGTH = 256 * 1024
ALLOWED_ALGORITHMS = frozenset({"ES256", "ES384", "RS256", "PS256", "PS384", "EdDSA"})
# RSASSA-PSS (RFC 7518 §3.5): the salt is as long as the hash output.
_PSS_HASHES: dict[str, hashes.HashAlgorithm] = {"PS256": hashes.SHA256(), "PS384": hashes.SHA384()}
_EC_ALGORITHMS: dict[str, tuple[str, hashes.HashAlgorithm, int]] = {
    "secp256r1": ("ES256", hashes.SHA256(), 32),
    "secp384r1": ("ES384", hashes.SHA384(), 48),
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def sign_jwt(
    claims: Mapping[str, object],
    private_key: SigningKey,
    *,
    header: Mapping[str, object] | None = None,
    rsa_algorithm: str = "RS256",
) -> str:
    """A compact JWT. Raises ``ConfigError`` for a key that cannot sign tokens.
    ``rsa_algorithm``: ``RS256`` or a ``PS*`` algorithm, for RSA keys only."""
    alg = _signing_algorithm(private_key)
    if alg == "RS256" and rsa_algorithm != "RS256":
        if rsa_algorithm not in _PSS_HASHES:
            raise ConfigError(f"an RSA key signs RS256, PS256 or PS384, not {rsa_algorithm}")
        alg = rsa_algorithm
    extra = dict(header or {})
    if "alg" in extra or "typ" in extra:
        raise ValueError("the extra JWT header must not set 'alg' or 'typ'")
    full_header: dict[str, object] = {"typ": "JWT", "alg": alg, **extra}
    signing_input = (
        f"{b64url_encode(compact_json(full_header))}.{b64url_encode(compact_json(claims))}"
    )
    data = signing_input.encode("ascii")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        _, hash_algorithm, size = _EC_ALGORITHMS[private_key.curve.name]
        r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hash_algorithm)))
        # JWS wants the fixed-length r || s, not the DER that cryptography produces.
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(data)
    elif alg in _PSS_HASHES:
        pss_hash = _PSS_HASHES[alg]
        pss = padding.PSS(mgf=padding.MGF1(pss_hash), salt_length=pss_hash.digest_size)
        signature = private_key.sign(data, pss, pss_hash)
    else:
        signature = private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url_encode(signature)}"


def _signing_algorithm(private_key: SigningKey) -> str:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        entry = _EC_ALGORITHMS.get(private_key.curve.name)
        if entry is None:
            raise ConfigError(
                f"a token signing key must be EC P-256, P-384 or RSA, not {private_key.curve.name}"
            )
        return entry[0]
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"an RSA token signing key must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ConfigError("a token signing key must be EC P-256, P-384, RSA or Ed25519")


def jwk_of(public_key: PublicKey) -> dict[str, object]:
    """The public JWK of a token key, with its ``alg`` (for a token header or a JWKS)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        entry = _EC_ALGORITHMS.get(public_key.curve.name)
        if entry is None:
            raise ConfigError(f"no JWS algorithm for EC curve {public_key.curve.name}")
        x, y = ec_coordinates(public_key)
        crv = "P-256" if entry[0] == "ES256" else "P-384"
        return {"kty": "EC", "crv": crv, "x": x, "y": y, "alg": entry[0]}
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url_encode(minimal_bytes(numbers.n)),
            "e": b64url_encode(minimal_bytes(numbers.e)),
            "alg": "RS256",
        }
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes_raw()
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw), "alg": "EdDSA"}
    raise ConfigError("a token key must be EC, RSA or Ed25519")


def decode_unverified(token: str) -> tuple[dict[str, JsonValue], dict[str, JsonValue]]:
    """Header and claims of a compact JWS, structurally checked but NOT verified: use the
    result only to choose a key or to inspect a token already verified."""
    header, claims, _, _ = _split(token)
    return header, claims


def _split(token: str) -> tuple[dict[str, JsonValue], dict[str, JsonValue], bytes, bytes]:
    if not isinstance(token, str):
        raise TokenVerificationError(f"expected a token string, found {type(token).__name__}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenVerificationError(
            f"token is {len(token)} characters long, more than the {MAX_TOKEN_LENGTH} accepted"
        )
    if not token.isascii():
        raise TokenVerificationError("token contains non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenVerificationError(
            f"expected a compact JWS of 3 dot-separated parts, found {len(parts)} parts"
        )
    decoded: list[dict[str, JsonValue]] = []
    for name, part in (("header", parts[0]), ("claims", parts[1])):
        try:
            decoded.append(strict_json_object(b64url_decode(part)))
        except ValueError as e:
            raise TokenVerificationError(f"token {name} is not base64url JSON: {e}") from None
    try:
        signature = b64url_decode(parts[2])
    except ValueError as e:
        raise TokenVerificationError(f"token signature is not base64url: {e}") from None
    header, claims = decoded
    if not isinstance(header.get("alg"), str):
        raise TokenVerificationError("token header has no 'alg' string")
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return header, claims, signing_input, signature


def verify_jwt(
    token: str, public_key: PublicKey, *, now: float, leeway: float = 0.0
) -> dict[str, JsonValue]:
    """The claims of ``token`` once its signature verifies with ``public_key`` and ``now`` is
    inside its ``nbf``/``exp`` window (widened by ``leeway`` seconds)."""
    if leeway < 0:
        raise ValueError("leeway must not be negative")
    header, claims, signing_input, signature = _split(token)
    alg = str(header["alg"])
    if alg.lower() == "none":
        raise TokenVerificationError("algorithm none is not accepted: tokens must be signed")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenVerificationError(
            f"token algorithm {alg[:32]!r} is not accepted "
            f"(accepted: {', '.join(sorted(ALLOWED_ALGORITHMS))})"
        )
    expected, key_kind = _algorithms_for(public_key)
    if alg not in expected:
        # Algorithm confusion: never let the token choose how its key is used.
        raise TokenVerificationError(
            f"token algorithm {alg} does not match the {key_kind} verification key "
            f"(expected {' or '.join(sorted(expected))})"
        )
    if "crit" in header:
        # RFC 7515 §4.1.11: an extension we do not understand must make the token invalid.
        raise TokenVerificationError("token header 'crit' lists extensions that are not supported")
    try:
        _verify_signature(alg, public_key, signing_input, signature)
    except InvalidSignature:
        raise TokenVerificationError("token signature does not verify") from None
    check_time_window(claims, now, leeway)
    return claims


def _algorithms_for(public_key: PublicKey) -> tuple[frozenset[str], str]:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        entry = _EC_ALGORITHMS.get(public_key.curve.name)
        if entry is None:
            raise TokenVerificationError(
                f"EC verification keys on {public_key.curve.name} are not accepted"
            )
        return frozenset({entry[0]}), f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise TokenVerificationError(
                f"RSA verification keys must have at least {MIN_RSA_BITS} bits, "
                f"found {public_key.key_size}"
            )
        return frozenset({"RS256", *_PSS_HASHES}), "RSA"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"}), "Ed25519"
    raise TokenVerificationError(f"unsupported verification key type {type(public_key).__name__}")


def _verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    """Raises ``InvalidSignature``. ``alg`` already matches the key type."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        _, hash_algorithm, size = _EC_ALGORITHMS[key.curve.name]
        if len(signature) != 2 * size:
            raise InvalidSignature
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hash_algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        pss_hash = _PSS_HASHES.get(alg)
        if pss_hash is not None:
            pss = padding.PSS(mgf=padding.MGF1(pss_hash), salt_length=pss_hash.digest_size)
            key.verify(signature, signing_input, pss, pss_hash)
        else:
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        key.verify(signature, signing_input)


def check_time_window(claims: Mapping[str, object], now: float, leeway: float = 0.0) -> None:
    """Raise TokenVerificationError unless ``now`` is inside the claims' ``nbf``/``exp``."""
    exp = _numeric_date(claims, "exp")
    if exp is not None and exp <= now - leeway:
        raise TokenVerificationError(f"token expired at {_when(exp)} (now {_when(now)})")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenVerificationError(f"token not valid before {_when(nbf)} (now {_when(now)})")


def _numeric_date(claims: Mapping[str, object], name: str) -> int | float | None:
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int in Python; JSON true is not a date. 1e999 parses as infinity, which
    # would make a token that never expires.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenVerificationError(
            f"token claim {name!r} must be a number of seconds, found {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenVerificationError(f"token claim {name!r} must be a finite number")
    return value


def _when(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return str(timestamp)[:40]


def public_key_from_jwk(jwk: Mapping[str, object]) -> PublicKey:
    """A verification key from a JWK (EC P-256/P-384/P-521, RSA, OKP Ed25519). The JWK's
    ``alg``, if any, is not trusted: ``verify_jwt`` derives the algorithm from the key type."""
    if not isinstance(jwk, Mapping):
        raise TokenVerificationError(f"expected a JWK object, found {type(jwk).__name__}")
    private = sorted(set(jwk) & _PRIVATE_MEMBERS)
    if private:
        raise TokenVerificationError(
            f"JWK contains private key member {private[0]!r}; a public key is expected"
        )
    kty = jwk.get("kty")
    if kty == "EC":
        try:
            return ec_public_key(jwk.get("crv"), jwk.get("x"), jwk.get("y"), what="JWK")
        except BadRequestError as e:
            raise TokenVerificationError(e.detail) from None
    if kty == "RSA":
        n = int.from_bytes(_jwk_bytes(jwk, "n"), "big")
        exponent = int.from_bytes(_jwk_bytes(jwk, "e"), "big")
        if n.bit_length() < MIN_RSA_BITS:
            raise TokenVerificationError(
                f"RSA JWK must have at least {MIN_RSA_BITS} bits, found {n.bit_length()}"
            )
        try:
            return rsa.RSAPublicNumbers(exponent, n).public_key()
        except ValueError:
            raise TokenVerificationError("JWK 'n' and 'e' are not a valid RSA key") from None
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise TokenVerificationError(
                f"expected OKP JWK crv 'Ed25519', found {shown(jwk.get('crv'))}"
            )
        raw = _jwk_bytes(jwk, "x")
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, UnsupportedAlgorithm):
            raise TokenVerificationError("JWK 'x' is not an Ed25519 public key") from None
    raise TokenVerificationError(f"expected JWK kty 'EC', 'RSA' or 'OKP', found {shown(kty)}")


def _jwk_bytes(jwk: Mapping[str, object], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or len(value) > 4096:
        raise TokenVerificationError(f"expected JWK member {name!r} to be a base64url string")
    try:
        raw = b64url_decode(value)
    except ValueError as e:
        raise TokenVerificationError(f"JWK member {name!r} is not base64url: {e}") from None
    if not raw:
        raise TokenVerificationError(f"JWK member {name!r} is empty")
    return raw

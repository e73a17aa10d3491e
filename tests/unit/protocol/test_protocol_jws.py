"""Compact JWT signing and strict verification: interoperability with jwcrypto both ways, and
one test per forged-token attack."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws
from jwcrypto import jwt as jw_jwt

from keybroker.errors import ConfigError, TokenVerificationError
from keybroker.protocol.jwk import b64url_decode, b64url_encode
from keybroker.protocol.jws import (
    MAX_TOKEN_LENGTH,
    PublicKey,
    decode_unverified,
    jwk_of,
    public_key_from_jwk,
    sign_jwt,
    verify_jwt,
)

NOW = 1_800_000_000.0
CLAIMS: dict[str, object] = {"iss": "test", "iat": int(NOW), "exp": int(NOW) + 300}
ES256_HEADER = b64url_encode(b'{"alg":"ES256"}')


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _forge(header: dict[str, object], claims: dict[str, object], signature: bytes = b"") -> str:
    """A token with any header, claims and signature, for the attack tests."""
    parts = [b64url_encode(json.dumps(part).encode()) for part in (header, claims)]
    return f"{parts[0]}.{parts[1]}.{b64url_encode(signature)}"


def _jwcrypto_token(key: jw_jwk.JWK, alg: str, claims: dict[str, object] = CLAIMS) -> str:
    token = jw_jwt.JWT(header={"alg": alg, "typ": "JWT"}, claims=claims)
    token.make_signed_token(key)
    serialized: str = token.serialize()
    return serialized


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_ec_roundtrip(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    token = sign_jwt(CLAIMS, key)
    header, _ = decode_unverified(token)
    assert header == {"typ": "JWT", "alg": "ES256" if curve.key_size == 256 else "ES384"}
    assert len(b64url_decode(token.split(".")[2])) == 2 * ((curve.key_size + 7) // 8)
    assert verify_jwt(token, key.public_key(), now=NOW) == CLAIMS


def test_rsa_roundtrip(rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign_jwt(CLAIMS, rsa_key)
    assert decode_unverified(token)[0]["alg"] == "RS256"
    assert verify_jwt(token, rsa_key.public_key(), now=NOW) == CLAIMS


def test_rsa_signs_only_rs256_or_pss(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="RS256, PS256 or PS384"):
        sign_jwt(CLAIMS, rsa_key, rsa_algorithm="RS512")


def test_header_is_compact_and_ordered(p256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(p256.public_key())
    token = sign_jwt({"a": 1}, p256, header={"jwk": jwk, "x5c": ["MIIB"]})
    raw_header = b64url_decode(token.split(".")[0])
    assert raw_header == (
        b'{"typ":"JWT","alg":"ES256","jwk":'
        + json.dumps(jwk, separators=(",", ":")).encode()
        + b',"x5c":["MIIB"]}'
    )
    assert b64url_decode(token.split(".")[1]) == b'{"a":1}'
    with pytest.raises(ValueError, match="must not set 'alg'"):
        sign_jwt({}, p256, header={"alg": "none"})


@pytest.mark.parametrize("kind", ["ES256", "RS256", "PS384"])
def test_jwcrypto_verifies_our_tokens(
    rsa_key: rsa.RSAPrivateKey, p256: ec.EllipticCurvePrivateKey, kind: str
) -> None:
    private_key = p256 if kind == "ES256" else rsa_key
    token = sign_jwt(CLAIMS, private_key, rsa_algorithm="PS384" if kind == "PS384" else "RS256")
    assert decode_unverified(token)[0]["alg"] == kind
    verifier = jw_jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jw_jwk.JWK.from_pyca(private_key.public_key()), alg=kind)
    assert json.loads(verifier.payload) == CLAIMS
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    other = jw_jws.JWS()
    other.deserialize(tampered)
    with pytest.raises(jw_jws.InvalidJWSSignature):
        other.verify(jw_jwk.JWK.from_pyca(private_key.public_key()), alg=kind)


@pytest.mark.parametrize(
    ("alg", "params"),
    [
        ("ES256", {"kty": "EC", "crv": "P-256"}),
        ("ES384", {"kty": "EC", "crv": "P-384"}),
        ("RS256", {"kty": "RSA", "size": 2048}),
        ("PS256", {"kty": "RSA", "size": 2048}),
        ("PS384", {"kty": "RSA", "size": 2048}),
        ("EdDSA", {"kty": "OKP", "crv": "Ed25519"}),
    ],
)
def test_we_verify_jwcrypto_tokens(alg: str, params: dict[str, object]) -> None:
    key = jw_jwk.JWK.generate(**params)
    token = _jwcrypto_token(key, alg)
    public = public_key_from_jwk(key.export_public(as_dict=True))
    assert verify_jwt(token, public, now=NOW) == CLAIMS


def test_jwk_of_roundtrips_and_matches_jwcrypto(rsa_key: rsa.RSAPrivateKey) -> None:
    keys: list[PublicKey] = [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa_key.public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ]
    for key in keys:
        jwk = jwk_of(key)
        assert public_key_from_jwk(jwk) == key
        theirs = jw_jwk.JWK.from_pyca(key).export_public(as_dict=True)
        assert {name: theirs[name] for name in jwk if name != "alg"} == {
            name: value for name, value in jwk.items() if name != "alg"
        }
    assert jwk_of(keys[0])["alg"] == "ES256" and jwk_of(keys[2])["alg"] == "RS256"


def test_p521_jwk_parses() -> None:
    key = ec.generate_private_key(ec.SECP521R1()).public_key()
    assert public_key_from_jwk(jw_jwk.JWK.from_pyca(key).export_public(as_dict=True)) == key


# --- attacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(p256: ec.EllipticCurvePrivateKey, alg: str) -> None:
    token = _forge({"alg": alg, "typ": "JWT"}, CLAIMS)
    with pytest.raises(TokenVerificationError, match="algorithm none is not accepted"):
        verify_jwt(token, p256.public_key(), now=NOW)


@pytest.mark.parametrize("kind", ["EC", "RSA"])
def test_hs256_signed_with_public_key_rejected(
    rsa_key: rsa.RSAPrivateKey, p256: ec.EllipticCurvePrivateKey, kind: str
) -> None:
    # Algorithm confusion: the attacker MACs the token with the (public) verification key's
    # bytes, hoping the verifier uses those same bytes as an HMAC secret.
    public = p256.public_key() if kind == "EC" else rsa_key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = _forge({"alg": "HS256", "typ": "JWT"}, CLAIMS).rsplit(".", 1)[0]
    mac = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenVerificationError, match="algorithm 'HS256' is not accepted"):
        verify_jwt(f"{unsigned}.{b64url_encode(mac)}", public, now=NOW)


def test_expired_token_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign_jwt({"exp": int(NOW)}, p256)
    with pytest.raises(TokenVerificationError, match=r"token expired at 2027-01-15T08:00:00Z"):
        verify_jwt(token, p256.public_key(), now=NOW)
    assert verify_jwt(token, p256.public_key(), now=NOW - 1) == {"exp": int(NOW)}
    assert verify_jwt(token, p256.public_key(), now=NOW + 5, leeway=10) == {"exp": int(NOW)}


def test_token_signed_by_other_key_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    trusted = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenVerificationError, match="token signature does not verify"):
        verify_jwt(sign_jwt(CLAIMS, impostor), trusted.public_key(), now=NOW)
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenVerificationError, match="token signature does not verify"):
        verify_jwt(sign_jwt(CLAIMS, other_rsa), rsa_key.public_key(), now=NOW)


def test_alg_header_mismatching_key_type_rejected(
    rsa_key: rsa.RSAPrivateKey, p256: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(TokenVerificationError, match="does not match the RSA verification key"):
        verify_jwt(sign_jwt(CLAIMS, p256), rsa_key.public_key(), now=NOW)
    with pytest.raises(TokenVerificationError, match="RS256 does not match the EC secp256r1"):
        verify_jwt(sign_jwt(CLAIMS, rsa_key), p256.public_key(), now=NOW)
    p384_token = sign_jwt(CLAIMS, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(TokenVerificationError, match=r"ES384 does not match .*\(expected ES256\)"):
        verify_jwt(p384_token, p256.public_key(), now=NOW)
    ed_key = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(TokenVerificationError, match="expected EdDSA"):
        verify_jwt(sign_jwt(CLAIMS, p256), ed_key, now=NOW)


def test_nbf_in_future_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign_jwt({"nbf": int(NOW) + 60}, p256)
    with pytest.raises(TokenVerificationError, match="token not valid before"):
        verify_jwt(token, p256.public_key(), now=NOW)
    assert verify_jwt(token, p256.public_key(), now=NOW + 60)["nbf"] == int(NOW) + 60
    assert verify_jwt(token, p256.public_key(), now=NOW, leeway=60)["nbf"] == int(NOW) + 60


@pytest.mark.parametrize("exp", [b'"1900000000"', b"true", b"null", b"[1]", b"1e999"])
def test_non_numeric_or_infinite_exp_rejected(p256: ec.EllipticCurvePrivateKey, exp: bytes) -> None:
    # 1e999 parses as infinity, which would make a token that never expires.
    token = _sign_raw(p256, b'{"alg":"ES256"}', b'{"exp":' + exp + b"}")
    with pytest.raises(TokenVerificationError, match="claim 'exp' must be a"):
        verify_jwt(token, p256.public_key(), now=NOW)


def _sign_raw(key: ec.EllipticCurvePrivateKey, header: bytes, claims: bytes) -> str:
    """A correctly signed ES256 token over exactly these header and claims bytes."""
    unsigned = f"{b64url_encode(header)}.{b64url_encode(claims)}"
    r, s = decode_dss_signature(key.sign(unsigned.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{unsigned}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_duplicate_alg_header_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    # Two parsers disagreeing on which "alg" wins is how a forged token slips through.
    header = b64url_encode(b'{"alg":"ES256","alg":"none"}')
    token = f"{header}.{b64url_encode(b'{}')}."
    with pytest.raises(TokenVerificationError, match="duplicate member 'alg'"):
        verify_jwt(token, p256.public_key(), now=NOW)


def test_crit_header_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign_jwt(CLAIMS, p256, header={"crit": ["b64"], "b64": False})
    with pytest.raises(TokenVerificationError, match="'crit'"):
        verify_jwt(token, p256.public_key(), now=NOW)


def test_oversized_token_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign_jwt({"pad": "x" * MAX_TOKEN_LENGTH}, p256)
    with pytest.raises(TokenVerificationError, match="more than the 262144 accepted"):
        decode_unverified(token)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("a.b", "3 dot-separated parts, found 2"),
        ("a.b.c.d", "found 4"),
        ("é.b.c", "non-ASCII"),
        ("!!.e30.", "header is not base64url"),
        (f"{b64url_encode(b'[]')}.e30.", "expected a JSON object, found an array"),
        (f"{b64url_encode(b'{}')}.e30.", "no 'alg'"),
        (f"{ES256_HEADER}.bnVsbA.", "claims is not"),
        (f"{ES256_HEADER}.e30.a+b", "signature is not base64url"),
        (f"{ES256_HEADER}.{b64url_encode(b'[' * 5000)}.", "claims is not base64url JSON"),
    ],
)
def test_malformed_token_rejected(token: str, message: str) -> None:
    with pytest.raises(TokenVerificationError, match=message):
        decode_unverified(token)


def test_truncated_or_empty_signature_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    token = sign_jwt(CLAIMS, p256)
    unsigned = token.rsplit(".", 1)[0]
    shortened = b64url_encode(b64url_decode(token.rsplit(".", 1)[1])[:-1])
    for signature in ("", shortened):
        with pytest.raises(TokenVerificationError, match="does not verify"):
            verify_jwt(f"{unsigned}.{signature}", p256.public_key(), now=NOW)


def test_unlisted_algorithms_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    for alg in ("HS512", "ES512", "RS512", "ES256K"):
        with pytest.raises(TokenVerificationError, match="is not accepted"):
            verify_jwt(_forge({"alg": alg}, CLAIMS, b"x"), p256.public_key(), now=NOW)


def test_short_rsa_verification_key_rejected() -> None:
    short = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the weak key under test)
    token = _jwcrypto_token(jw_jwk.JWK.from_pyca(short), "RS256")
    with pytest.raises(TokenVerificationError, match="at least 2048 bits"):
        verify_jwt(token, short.public_key(), now=NOW)


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"kty": "oct", "k": "c2VjcmV0"}, "private key member 'k'"),
        ({"kty": "oct"}, "expected JWK kty 'EC', 'RSA' or 'OKP', found 'oct'"),
        ({"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA"}, "expected crv"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "of 32 bytes"),
        ({"kty": "OKP", "crv": "X25519", "x": "AA"}, "expected OKP JWK crv 'Ed25519'"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AA"}, "not an Ed25519 public key"),
        ({"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "at least 2048 bits"),
        ({"kty": "RSA", "n": 5, "e": "AQAB"}, "'n' to be a base64url string"),
    ],
)
def test_bad_jwk_rejected(jwk: dict[str, object], message: str) -> None:
    with pytest.raises(TokenVerificationError, match=message):
        public_key_from_jwk(jwk)


def test_private_jwk_rejected() -> None:
    private = jw_jwk.JWK.generate(kty="EC", crv="P-256").export_private(as_dict=True)
    with pytest.raises(TokenVerificationError, match="private key member 'd'") as error:
        public_key_from_jwk(private)
    assert private["d"] not in error.value.detail

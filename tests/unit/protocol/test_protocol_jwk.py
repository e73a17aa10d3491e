"""The guest's tee-pubkey: what is accepted, how it is normalized for hashing, what is refused."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk as jw_jwk

from keybroker.errors import BadRequestError, ClientError
from keybroker.protocol.jwk import b64url_decode, b64url_encode, parse_tee_pubkey, public_jwk

CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ec_jwk(crv: str = "P-256") -> dict[str, str]:
    key = ec.generate_private_key(CURVES[crv])
    exported = jw_jwk.JWK.from_pyca(key.public_key()).export_public(as_dict=True)
    exported.pop("kid", None)
    return {**exported, "alg": "ECDH-ES+A256KW"}


def _rsa_jwk(key: rsa.RSAPrivateKey, alg: str = "RSA-OAEP-256") -> dict[str, str]:
    exported = jw_jwk.JWK.from_pyca(key.public_key()).export_public(as_dict=True)
    return {**exported, "alg": alg}


def _b64(value: int, length: int) -> str:
    return b64url_encode(value.to_bytes(length, "big"))


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_ec_keys_parse_and_normalize(crv: str) -> None:
    jwk = _ec_jwk(crv)
    parsed = parse_tee_pubkey(jwk)
    assert (parsed.kty, parsed.crv, parsed.alg) == ("EC", crv, "ECDH-ES+A256KW")
    assert isinstance(parsed.key, ec.EllipticCurvePublicKey)
    assert parsed.to_jwk() == jwk
    assert list(parsed.to_jwk()) == ["kty", "crv", "alg", "x", "y"]


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA1_5"])
def test_rsa_keys_parse_and_normalize(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    jwk = _rsa_jwk(rsa_key, alg)
    parsed = parse_tee_pubkey(jwk)
    assert (parsed.kty, parsed.crv, parsed.alg) == ("RSA", None, alg)
    assert parsed.key == rsa_key.public_key()
    assert parsed.to_jwk() == {"kty": "RSA", "alg": alg, "n": jwk["n"], "e": jwk["e"]}


def test_padding_and_leading_zeros_are_normalized_away(rsa_key: rsa.RSAPrivateKey) -> None:
    numbers = rsa_key.public_key().public_numbers()
    padded_n = base64.urlsafe_b64encode(b"\x00" + numbers.n.to_bytes(256, "big")).decode()
    jwk = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": padded_n, "e": "AAEAAQ=="}
    normalized = parse_tee_pubkey(jwk).to_jwk()
    assert normalized["e"] == "AQAB"
    assert b64url_decode(normalized["n"]) == numbers.n.to_bytes(256, "big")
    assert "=" not in normalized["n"]


def test_public_metadata_members_are_dropped() -> None:
    jwk = _ec_jwk()
    parsed = parse_tee_pubkey({**jwk, "kid": "k1", "use": "enc"})
    assert parsed.to_jwk() == jwk


def test_missing_alg_rejected_and_says_it_is_required() -> None:
    jwk = _ec_jwk()
    del jwk["alg"]
    with pytest.raises(BadRequestError, match="alg is required"):
        parse_tee_pubkey(jwk)


@pytest.mark.parametrize("kty", ["oct", "OKP", "rsa", ""])
def test_unknown_kty_rejected(kty: str) -> None:
    with pytest.raises(BadRequestError, match='expected kty "RSA", "EC" or "AKP"'):
        parse_tee_pubkey({**_ec_jwk(), "kty": kty})


@pytest.mark.parametrize("crv", ["P-192", "secp256k1"])
def test_unsupported_curve_rejected(crv: str) -> None:
    curve = ec.SECP192R1() if crv == "P-192" else ec.SECP256K1()
    numbers = ec.generate_private_key(curve).public_key().public_numbers()
    size = (curve.key_size + 7) // 8
    jwk = {
        "kty": "EC",
        "crv": crv,
        "alg": "ECDH-ES+A256KW",
        "x": _b64(numbers.x, size),
        "y": _b64(numbers.y, size),
    }
    with pytest.raises(BadRequestError, match="expected crv"):
        parse_tee_pubkey(jwk)


def test_point_not_on_curve_rejected() -> None:
    # Invalid-curve attack: an off-curve point would leak bits of the ECDH private key.
    jwk = _ec_jwk()
    y = int.from_bytes(b64url_decode(jwk["y"]), "big")
    jwk["y"] = _b64((y + 1) % 2**256, 32)
    with pytest.raises(BadRequestError, match="not on curve P-256") as error:
        parse_tee_pubkey(jwk)
    assert jwk["x"] not in error.value.detail and jwk["y"] not in error.value.detail


def test_coordinate_with_wrong_length_rejected() -> None:
    jwk = _ec_jwk()
    jwk["x"] = b64url_encode(b64url_decode(jwk["x"])[1:])
    with pytest.raises(BadRequestError, match="expected member 'x' of 32 bytes for P-256"):
        parse_tee_pubkey(jwk)


def test_short_rsa_key_rejected() -> None:
    short = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the weak key under test)
    with pytest.raises(BadRequestError, match="2048 to 8192 bits, found 1024"):
        parse_tee_pubkey(_rsa_jwk(short))


def test_oversized_rsa_modulus_rejected() -> None:
    jwk = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": _b64(2**8200 + 1, 1026), "e": "AQAB"}
    with pytest.raises(BadRequestError, match="found 8201 bits"):
        parse_tee_pubkey(jwk)


def test_even_modulus_and_huge_exponent_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = _rsa_jwk(rsa_key)
    n = int.from_bytes(b64url_decode(jwk["n"]), "big")
    with pytest.raises(BadRequestError, match="even"):
        parse_tee_pubkey({**jwk, "n": _b64(n + 1, 256)})
    with pytest.raises(BadRequestError, match="at most 64 bits"):
        parse_tee_pubkey({**jwk, "e": _b64(2**80 + 1, 11)})
    with pytest.raises(BadRequestError, match="valid RSA public key"):
        parse_tee_pubkey({**jwk, "e": "Ag"})  # e = 2


def test_private_member_d_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_private = jw_jwk.JWK.generate(kty="EC", crv="P-256").export_private(as_dict=True)
    with pytest.raises(BadRequestError, match="private key member 'd'") as error:
        parse_tee_pubkey({**ec_private, "alg": "ECDH-ES+A256KW"})
    assert ec_private["d"] not in error.value.detail
    rsa_private = jw_jwk.JWK.from_pyca(rsa_key).export_private(as_dict=True)
    with pytest.raises(BadRequestError, match="private key member 'd'"):
        parse_tee_pubkey({**rsa_private, "alg": "RSA-OAEP-256"})


@pytest.mark.parametrize("bad", ["not+base64/url", "ab!c", "A", "AB=C", "AQ=", 123, None])
def test_bad_base64_rejected(bad: object) -> None:
    jwk: dict[str, object] = {**_ec_jwk(), "x": bad}
    with pytest.raises(BadRequestError, match="member 'x'"):
        parse_tee_pubkey(jwk)


def test_non_canonical_base64_rejected() -> None:
    # "AR" decodes to the same byte as "AQ": one key must have one spelling to be hashed.
    with pytest.raises(ValueError, match="non-canonical"):
        b64url_decode("AR")
    assert b64url_decode("AQ") == b"\x01" == b64url_decode("AQ==")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alg": "ECDH-ES"}, 'expected alg "ECDH-ES\\+A256KW"'),
        ({"alg": "RSA-OAEP-256"}, 'expected alg "ECDH-ES\\+A256KW"'),
        ({"alg": 5}, "'alg' to be a string, found a number"),
        ({"crv": ["P-256"]}, "'crv' to be a string, found an array"),
        ({"crv": "P-256K"}, 'expected crv "P-256", "P-384" or "P-521", found \'P-256K\''),
        ({"kty": None}, "'kty' to be a string"),
        ({"x5c": ["MII"]}, "unexpected member 'x5c'"),
    ],
)
def test_wrong_ec_members_rejected(change: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse_tee_pubkey({**_ec_jwk(), **change})


def test_wrong_rsa_alg_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(BadRequestError, match='expected alg "RSA-OAEP-256" or "RSA1_5"'):
        parse_tee_pubkey(_rsa_jwk(rsa_key, "RSA-OAEP"))


@pytest.mark.parametrize("value", [[], "jwk", 1, None])
def test_non_object_rejected(value: object) -> None:
    with pytest.raises(BadRequestError, match="expected a JWK object"):
        parse_tee_pubkey(value)


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_public_jwk_for_ec_keys_roundtrips(crv: str) -> None:
    key = ec.generate_private_key(CURVES[crv]).public_key()
    jwk = public_jwk(key)
    assert jwk["alg"] == "ECDH-ES+A256KW" and jwk["crv"] == crv
    assert parse_tee_pubkey(jwk).key == key
    assert parse_tee_pubkey(jwk).to_jwk() == jwk


def test_public_jwk_for_rsa_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    key = rsa_key.public_key()
    assert public_jwk(key)["alg"] == "RSA-OAEP-256"
    legacy = public_jwk(key, rsa_alg="RSA1_5")
    assert legacy["alg"] == "RSA1_5"
    assert parse_tee_pubkey(legacy).to_jwk() == legacy
    with pytest.raises(ClientError, match="RSA-OAEP-256"):
        public_jwk(key, rsa_alg="RSA-OAEP")


def test_public_jwk_refuses_keys_the_kbs_would_refuse() -> None:
    with pytest.raises(ClientError, match="secp256k1"):
        public_jwk(ec.generate_private_key(ec.SECP256K1()).public_key())
    short = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the weak key under test)
    with pytest.raises(ClientError, match="2048"):
        public_jwk(short.public_key())

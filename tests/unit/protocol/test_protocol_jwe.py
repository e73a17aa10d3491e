"""JWE for released resources: interoperability with an independent JOSE library (jwcrypto), the
exact header bytes the upstream guest depends on, and refusal of every altered or misaddressed
response."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk

from keybroker.errors import JweError
from keybroker.protocol.jwe import open_jwe, seal
from keybroker.protocol.jwk import b64url_decode, b64url_encode, parse_tee_pubkey, public_jwk

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
SECRET = b"the disk encryption key \x00\xff"
CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
RECIPIENTS = ["P-256", "P-384", "P-521", "RSA-OAEP-256", "RSA1_5"]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def make_recipient(rsa_key: rsa.RSAPrivateKey) -> Callable[[str], tuple[PrivateKey, str]]:
    """A private key and the alg its tee-pubkey names, for each supported recipient kind."""

    def make(kind: str) -> tuple[PrivateKey, str]:
        if kind in CURVES:
            return ec.generate_private_key(CURVES[kind]), "ECDH-ES+A256KW"
        return rsa_key, kind

    return make


def _seal_to(private_key: PrivateKey, alg: str, plaintext: bytes = SECRET) -> dict[str, str]:
    rsa_alg = alg if alg != "ECDH-ES+A256KW" else "RSA-OAEP-256"
    return seal(parse_tee_pubkey(public_jwk(private_key.public_key(), rsa_alg=rsa_alg)), plaintext)


def _header(jwe: dict[str, str]) -> bytes:
    return b64url_decode(jwe["protected"])


def _jwcrypto_open(private_key: PrivateKey, jwe: dict[str, str]) -> bytes:
    token = jw_jwe.JWE()
    token.allowed_algs = ["ECDH-ES+A256KW", "RSA-OAEP-256", "RSA1_5", "A256GCM"]
    token.deserialize(json.dumps(jwe), key=jw_jwk.JWK.from_pyca(private_key))
    payload: bytes = token.payload
    return payload


@pytest.mark.parametrize("kind", RECIPIENTS)
def test_sealed_response_decrypts_with_jwcrypto(
    make_recipient: Callable[[str], tuple[PrivateKey, str]], kind: str
) -> None:
    private_key, alg = make_recipient(kind)
    jwe = _seal_to(private_key, alg)
    assert list(jwe) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    assert all("=" not in value for value in jwe.values())
    assert len(b64url_decode(jwe["iv"])) == 12 and len(b64url_decode(jwe["tag"])) == 16
    assert _jwcrypto_open(private_key, jwe) == SECRET
    assert open_jwe(private_key, jwe) == SECRET


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_ecdh_protected_header_bytes_are_exact(crv: str) -> None:
    private_key = ec.generate_private_key(CURVES[crv])
    raw = _header(_seal_to(private_key, "ECDH-ES+A256KW"))
    epk = json.loads(raw)["epk"]
    size = (CURVES[crv].key_size + 7) // 8
    assert len(b64url_decode(epk["x"])) == size == len(b64url_decode(epk["y"]))
    expected = (
        '{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":'
        f'{{"crv":"{crv}","kty":"EC","x":"{epk["x"]}","y":"{epk["y"]}"}}}}'
    )
    assert raw == expected.encode()


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA1_5"])
def test_rsa_protected_header_bytes_are_exact(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    raw = _header(_seal_to(rsa_key, alg))
    assert raw == f'{{"alg":"{alg}","enc":"A256GCM"}}'.encode()


@pytest.mark.parametrize("kind", RECIPIENTS)
def test_upstream_guest_rebuilds_the_same_aad(
    make_recipient: Callable[[str], tuple[PrivateKey, str]], kind: str
) -> None:
    """The upstream guest parses the header into {alg, enc, other fields in a sorted map} and
    re-serializes it with serde_json to get the AAD; that must give back our exact string."""
    private_key, alg = make_recipient(kind)
    jwe = _seal_to(private_key, alg)
    parsed = json.loads(_header(jwe))
    others = {name: parsed[name] for name in sorted(parsed) if name not in ("alg", "enc")}
    rebuilt = {"alg": parsed["alg"], "enc": parsed["enc"], **_sorted_deep(others)}
    assert b64url_encode(json.dumps(rebuilt, separators=(",", ":")).encode()) == jwe["protected"]


def _sorted_deep(value: dict[str, object]) -> dict[str, object]:
    return {
        name: _sorted_deep(item) if isinstance(item, dict) else item
        for name, item in sorted(value.items())
    }


@pytest.mark.parametrize(
    ("alg", "kind"),
    [
        ("ECDH-ES+A256KW", "P-256"),
        ("ECDH-ES+A256KW", "P-384"),
        ("ECDH-ES+A256KW", "P-521"),
        ("RSA-OAEP-256", "RSA-OAEP-256"),
    ],
)
def test_jwcrypto_produced_jwe_opens(
    make_recipient: Callable[[str], tuple[PrivateKey, str]], alg: str, kind: str
) -> None:
    # jwcrypto writes the header with spaces and puts epk in the unprotected "header" member.
    private_key, _ = make_recipient(kind)
    token = jw_jwe.JWE(SECRET, protected=json.dumps({"alg": alg, "enc": "A256GCM"}))
    token.add_recipient(jw_jwk.JWK.from_pyca(private_key.public_key()))
    document = json.loads(token.serialize())
    assert b" " in b64url_decode(document["protected"])
    assert open_jwe(private_key, document) == SECRET


def test_jwcrypto_jwe_with_epk_and_party_info_in_protected_header_opens() -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    protected = {
        "enc": "A256GCM",
        "apu": b64url_encode(b"Alice"),
        "apv": b64url_encode(b"Bob"),
        "alg": "ECDH-ES+A256KW",
    }
    token = jw_jwe.JWE(SECRET, protected=json.dumps(protected))
    token.add_recipient(jw_jwk.JWK.from_pyca(private_key.public_key()))
    document = json.loads(token.serialize())
    assert open_jwe(private_key, document) == SECRET


def test_rsa1_5_logs_a_warning_on_every_use(
    rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="keybroker.protocol.jwe"):
        jwe = _seal_to(rsa_key, "RSA1_5")
        _seal_to(rsa_key, "RSA1_5")
        assert open_jwe(rsa_key, jwe) == SECRET
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("RSA1_5" in r.getMessage() for r in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keybroker.protocol.jwe"):
        open_jwe(rsa_key, _seal_to(rsa_key, "RSA-OAEP-256"))
    assert not caplog.records


def _flip(value: str, index: int = 0) -> str:
    raw = bytearray(b64url_decode(value))
    raw[index] ^= 0x01
    return b64url_encode(bytes(raw))


@pytest.mark.parametrize("kind", RECIPIENTS)
@pytest.mark.parametrize("member", ["ciphertext", "tag", "encrypted_key", "iv"])
def test_tampered_member_rejected(
    make_recipient: Callable[[str], tuple[PrivateKey, str]], kind: str, member: str
) -> None:
    private_key, alg = make_recipient(kind)
    jwe = _seal_to(private_key, alg)
    jwe[member] = _flip(jwe[member])
    with pytest.raises(JweError) as error:
        open_jwe(private_key, jwe)
    assert SECRET.decode("latin-1") not in error.value.detail  # never echo the plaintext


@pytest.mark.parametrize("kind", RECIPIENTS)
def test_tampered_protected_header_rejected(
    make_recipient: Callable[[str], tuple[PrivateKey, str]], kind: str
) -> None:
    # Same JSON meaning, different bytes: the AAD is the string as sent, so this must fail.
    private_key, alg = make_recipient(kind)
    jwe = _seal_to(private_key, alg)
    spaced = json.dumps(json.loads(_header(jwe)), separators=(", ", ": ")).encode()
    jwe["protected"] = b64url_encode(spaced)
    with pytest.raises(JweError, match="authentication failed"):
        open_jwe(private_key, jwe)


def test_jwe_for_another_key_rejected() -> None:
    jwe = _seal_to(ec.generate_private_key(ec.SECP256R1()), "ECDH-ES+A256KW")
    with pytest.raises(JweError, match="could not unwrap"):
        open_jwe(ec.generate_private_key(ec.SECP256R1()), jwe)


def test_wrong_curve_rejected() -> None:
    jwe = _seal_to(ec.generate_private_key(ec.SECP256R1()), "ECDH-ES+A256KW")
    with pytest.raises(JweError, match="epk curve 'P-256' does not match the P-384 key"):
        open_jwe(ec.generate_private_key(ec.SECP384R1()), jwe)


def test_wrong_key_type_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(JweError, match="does not match an RSA key"):
        open_jwe(rsa_key, _seal_to(ec_key, "ECDH-ES+A256KW"))
    with pytest.raises(JweError, match="does not match an EC key"):
        open_jwe(ec_key, _seal_to(rsa_key, "RSA-OAEP-256"))


def test_rsa1_5_downgrade_rejected_when_alg_pinned(rsa_key: rsa.RSAPrivateKey) -> None:
    jwe = _seal_to(rsa_key, "RSA1_5")
    with pytest.raises(JweError, match="expected JWE alg 'RSA-OAEP-256', found 'RSA1_5'"):
        open_jwe(rsa_key, jwe, expected_alg="RSA-OAEP-256")


def test_invalid_curve_epk_rejected() -> None:
    # Invalid-curve attack on the guest: an off-curve epk would leak its ECDH private key.
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwe = _seal_to(private_key, "ECDH-ES+A256KW")
    header = json.loads(_header(jwe))
    header["epk"]["y"] = _flip(header["epk"]["y"], 31)
    jwe["protected"] = b64url_encode(json.dumps(header).encode())
    with pytest.raises(JweError, match="not on curve P-256"):
        open_jwe(private_key, jwe)


def _rewrite_header(jwe: dict[str, str], **changes: object) -> dict[str, str]:
    header = json.loads(_header(jwe))
    header.update(changes)
    return {**jwe, "protected": b64url_encode(json.dumps(header).encode())}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"enc": "A128GCM"}, "expected JWE enc 'A256GCM', found 'A128GCM'"),
        ({"enc": None}, "expected JWE enc 'A256GCM', found nothing"),
        ({"alg": "dir"}, "expected JWE alg .* found 'dir'"),
        ({"alg": "RSA-OAEP"}, "found 'RSA-OAEP'"),
        ({"crit": ["exp"]}, "'crit'"),
        ({"zip": "DEF"}, "compressed"),
    ],
)
def test_unsupported_header_rejected(
    rsa_key: rsa.RSAPrivateKey, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(JweError, match=message):
        open_jwe(rsa_key, _rewrite_header(_seal_to(rsa_key, "RSA-OAEP-256"), **changes))


def test_unprotected_alg_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    jwe: dict[str, object] = {**_seal_to(rsa_key, "RSA-OAEP-256"), "header": {"alg": "RSA1_5"}}
    with pytest.raises(JweError, match="'alg' must be in the protected header"):
        open_jwe(rsa_key, jwe)


def test_header_parameter_in_both_headers_rejected() -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwe = _seal_to(private_key, "ECDH-ES+A256KW")
    document = {**jwe, "header": {"epk": json.loads(_header(jwe))["epk"]}}
    with pytest.raises(JweError, match="'epk' appears twice"):
        open_jwe(private_key, document)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not a jwe", "expected a JWE object"),
        ([], "expected a JWE object"),
        ({}, "member 'protected' to be a string, found NoneType"),
        ({"protected": 1}, "member 'protected' to be a string, found int"),
    ],
)
def test_malformed_structure_rejected(
    rsa_key: rsa.RSAPrivateKey, document: object, message: str
) -> None:
    with pytest.raises(JweError, match=message):
        open_jwe(rsa_key, document)


@pytest.mark.parametrize("member", ["protected", "encrypted_key", "iv", "ciphertext", "tag"])
def test_missing_or_bad_base64_member_rejected(rsa_key: rsa.RSAPrivateKey, member: str) -> None:
    jwe = _seal_to(rsa_key, "RSA-OAEP-256")
    with pytest.raises(JweError, match=member):
        open_jwe(rsa_key, {name: value for name, value in jwe.items() if name != member})
    with pytest.raises(JweError, match="base64url"):
        open_jwe(rsa_key, {**jwe, member: jwe[member][:-1] + "!"})


def test_general_serialization_and_foreign_aad_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    jwe = _seal_to(rsa_key, "RSA-OAEP-256")
    with pytest.raises(JweError, match="unexpected JWE member 'recipients'"):
        open_jwe(rsa_key, {**jwe, "recipients": []})
    with pytest.raises(JweError, match="'aad' is not supported"):
        open_jwe(rsa_key, {**jwe, "aad": "ZXh0cmE"})
    # Old upstream servers echoed the protected header as "aad"; that adds nothing.
    assert open_jwe(rsa_key, {**jwe, "aad": jwe["protected"]}) == SECRET


def test_protected_header_with_duplicate_alg_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    jwe = _seal_to(rsa_key, "RSA-OAEP-256")
    raw = b'{"alg":"RSA-OAEP-256","enc":"A256GCM","alg":"RSA1_5"}'
    with pytest.raises(JweError, match="duplicate member 'alg'"):
        open_jwe(rsa_key, {**jwe, "protected": b64url_encode(raw)})


def test_empty_and_large_plaintexts_roundtrip() -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    empty = _seal_to(private_key, "ECDH-ES+A256KW", b"")
    assert empty["ciphertext"] == "" and open_jwe(private_key, empty) == b""
    # (jwcrypto cannot open an empty payload even from itself, so it checks the large one only)
    large = bytes(range(256)) * 4096
    jwe = _seal_to(private_key, "ECDH-ES+A256KW", large)
    assert open_jwe(private_key, jwe) == large == _jwcrypto_open(private_key, jwe)


def test_each_seal_uses_fresh_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    first, second = (_seal_to(ec_key, "ECDH-ES+A256KW") for _ in range(2))
    assert first["protected"] != second["protected"]  # a new ephemeral key each time
    assert first["iv"] != second["iv"] and first["encrypted_key"] != second["encrypted_key"]

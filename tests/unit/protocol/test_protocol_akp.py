"""AKP (ML-KEM-768+A192KW) tee keys: KMAC256 against NIST's samples, the JWE against a hand-made
restatement of upstream's sender and guest (tests/akp_upstream.py) in both directions, and the
refusal of every malformed key and altered response."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from Cryptodome.Hash import KMAC256
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

import akp_upstream
from keybroker.client.keys import TEE_KEY_ALGORITHMS, TeeKey
from keybroker.errors import BadRequestError, ClientError, JweError
from keybroker.protocol import akp
from keybroker.protocol.canonical import runtime_data
from keybroker.protocol.jwe import open_jwe, seal
from keybroker.protocol.jwk import b64url_decode, b64url_encode, parse_tee_pubkey, public_jwk

SECRET = b"a post-quantum disk key \x00\xff"

# NIST SP 800-185 KMAC samples (csrc.nist.gov, "KMAC_samples.pdf"), KMAC256 samples #4 to #6:
# key 0x40..0x5F, L = 512 bits.
_NIST_KEY = bytes(range(0x40, 0x60))
NIST_KMAC256 = [
    (
        bytes(range(4)),
        b"My Tagged Application",
        "20c570c31346f703c9ac36c61c03cb64c3970d0cfc787e9b79599d273a68d2f7"
        "f69d4cc3de9d104a351689f27cf6f5951f0103f33f4f24871024d9c27773a8dd",
    ),
    (
        bytes(range(0xC8)),
        b"",
        "75358cf39e41494e949707927cee0af20a3ff553904c86b08f21cc414bcfd691"
        "589d27cf5e15369cbbff8b9a4c2eb17800855d0235ff635da82533ec6b759b69",
    ),
    (
        bytes(range(0xC8)),
        b"My Tagged Application",
        "b58618f71f92e1d56c1b8c55ddd7cd188b97b4ca4d99831eb2699a837da2e4d9"
        "70fbacfde50033aea585f1a2708510c32d07880801bd182898fe476876fc8965",
    ),
]


@pytest.fixture(scope="module")
def private_key() -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.generate()


def _jwk(private_key: MLKEM768PrivateKey) -> dict[str, str]:
    return akp_upstream.tee_pubkey(private_key)


def _sealed(private_key: MLKEM768PrivateKey) -> dict[str, str]:
    return seal(parse_tee_pubkey(_jwk(private_key)), SECRET)


def _flip(text: str) -> str:
    raw = bytearray(b64url_decode(text))
    raw[len(raw) // 2] ^= 0x01
    return b64url_encode(bytes(raw))


def _with_header(jwe: dict[str, str], **changes: object) -> dict[str, str]:
    header = json.loads(b64url_decode(jwe["protected"]))
    header.update(changes)
    header = {name: value for name, value in header.items() if value is not None}
    return {**jwe, "protected": b64url_encode(json.dumps(header).encode())}


# --- the KDF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "custom", "expected"), NIST_KMAC256)
def test_kmac256_matches_the_nist_sp800_185_samples(
    data: bytes, custom: bytes, expected: str
) -> None:
    mac = KMAC256.new(key=_NIST_KEY, data=data, mac_len=64, custom=custom)
    assert mac.hexdigest() == expected


def test_kdf_input_is_upstreams_fixed_info_and_output_is_an_aes192_key() -> None:
    shared_secret = bytes(range(32))
    # be32(17) || "ML-KEM-768+A192KW" || be32(192), spelled out byte by byte
    fixed_info = b"\x00\x00\x00\x11ML-KEM-768+A192KW\x00\x00\x00\xc0"
    expected = KMAC256.new(key=shared_secret, data=fixed_info, mac_len=24, custom=b"").digest()
    assert akp.kmac256_kdf(shared_secret) == expected == akp_upstream.kdf(shared_secret)
    assert len(expected) == 24
    # KMAC binds the output length: the 24-byte key is not a prefix of a 32-byte output
    longer = KMAC256.new(key=shared_secret, data=fixed_info, mac_len=32, custom=b"").digest()
    assert longer[:24] != expected


# --- wire compatibility ----------------------------------------------------------------------


def test_jwe_built_as_upstreams_kbs_builds_it_opens(private_key: MLKEM768PrivateKey) -> None:
    response = akp_upstream.seal(_jwk(private_key), SECRET)
    assert open_jwe(private_key, response, expected_alg="ML-KEM-768+A192KW") == SECRET
    assert TeeKey(private_key).decrypt(dict(response)) == SECRET


def test_sealed_jwe_opens_as_upstreams_guest_opens_it(private_key: MLKEM768PrivateKey) -> None:
    jwe = _sealed(private_key)
    assert list(jwe) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    header = b64url_decode(jwe["protected"])
    ek = json.loads(header)["ek"]
    # exact bytes: the guest re-serializes the header (alg, enc, ek) to rebuild the AAD
    assert header == b'{"alg":"ML-KEM-768+A192KW","enc":"A256GCM","ek":"' + ek.encode() + b'"}'
    assert len(b64url_decode(ek)) == 1088
    assert len(b64url_decode(jwe["encrypted_key"])) == 40  # 32-byte CEK + AES-KW check block
    assert akp_upstream.open_response(private_key, jwe) == SECRET


def test_akp_key_parses_normalizes_and_round_trips(private_key: MLKEM768PrivateKey) -> None:
    jwk = _jwk(private_key)
    parsed = parse_tee_pubkey({**jwk, "kid": "ignored"})
    assert (parsed.kty, parsed.alg, parsed.crv) == ("AKP", "ML-KEM-768+A192KW", None)
    assert parsed.to_jwk() == jwk
    assert list(parsed.to_jwk()) == ["kty", "alg", "pub"]
    assert public_jwk(private_key.public_key()) == jwk
    # the runtime data the evidence binds carries exactly these members (JCS sorts them)
    bound = runtime_data("nonce", parsed.to_jwk(), "")["tee-pubkey"]
    assert bound == jwk


def test_client_makes_ml_kem_keys_by_upstreams_algorithm_name() -> None:
    assert "ML-KEM-768+A192KW" in TEE_KEY_ALGORITHMS
    key = TeeKey.generate("ML-KEM-768+A192KW")
    jwk = key.public_jwk()
    assert jwk["kty"] == "AKP" and len(b64url_decode(jwk["pub"])) == 1184
    assert key.decrypt(dict(seal(parse_tee_pubkey(jwk), SECRET))) == SECRET
    with pytest.raises(ClientError, match="unknown TEE key algorithm 'ML-KEM-1024'"):
        TeeKey.generate("ML-KEM-1024")


def test_ml_kem_tee_key_loads_from_a_pkcs8_pem(private_key: MLKEM768PrivateKey) -> None:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    loaded = TeeKey.from_pem(pem)
    assert loaded.public_jwk() == _jwk(private_key)
    assert loaded.decrypt(dict(_sealed(private_key))) == SECRET


# --- refused keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, "expected a non-empty value"),
        (100, "expected member 'pub' of 1184 bytes for ML-KEM-768, found 100 bytes"),
        (1183, "expected member 'pub' of 1184 bytes for ML-KEM-768, found 1183 bytes"),
        (1185, "expected member 'pub' of 1184 bytes for ML-KEM-768, found 1185 bytes"),
        (1568, "expected at most 2048 characters, found 2091"),  # an ML-KEM-1024 key's size
    ],
)
def test_akp_key_of_wrong_length_refused(
    private_key: MLKEM768PrivateKey, size: int, message: str
) -> None:
    raw = (private_key.public_key().public_bytes_raw() * 2)[:size]
    with pytest.raises(BadRequestError) as error:
        parse_tee_pubkey({**_jwk(private_key), "pub": b64url_encode(raw)})
    assert message in error.value.detail and error.value.status == 400


def test_oversized_akp_key_refused_before_decoding(private_key: MLKEM768PrivateKey) -> None:
    with pytest.raises(BadRequestError, match="at most 2048 characters, found 1000000"):
        parse_tee_pubkey({**_jwk(private_key), "pub": "A" * 1_000_000})


@pytest.mark.parametrize("alg", ["ML-KEM-1024+A256KW", "ML-KEM-512+A128KW", "ML-DSA-65", ""])
def test_unknown_akp_alg_refused(private_key: MLKEM768PrivateKey, alg: str) -> None:
    with pytest.raises(BadRequestError) as error:
        parse_tee_pubkey({**_jwk(private_key), "alg": alg})
    assert 'expected alg "ML-KEM-768+A192KW" for an AKP key' in error.value.detail
    assert repr(alg) in error.value.detail


def test_akp_key_failing_the_fips203_modulus_check_refused() -> None:
    # every coefficient 0xFFF is >= q = 3329: not an encapsulation key
    jwk = {"kty": "AKP", "alg": "ML-KEM-768+A192KW", "pub": b64url_encode(b"\xff" * 1184)}
    with pytest.raises(BadRequestError, match="not a valid ML-KEM-768 encapsulation key"):
        parse_tee_pubkey(jwk)


def test_akp_private_member_refused(private_key: MLKEM768PrivateKey) -> None:
    seed = b64url_encode(private_key.private_bytes_raw())
    with pytest.raises(BadRequestError, match="private key member 'priv' must not be sent"):
        parse_tee_pubkey({**_jwk(private_key), "priv": seed})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pub": None}, "missing member 'pub'"),
        ({"alg": None}, "missing member 'alg'"),
        ({"x": "AAAA"}, "unexpected member 'x'"),
        ({"pub": 1184}, "expected a base64url string, found a number"),
        ({"pub": "not base64!"}, "expected base64url"),
    ],
)
def test_malformed_akp_members_refused(
    private_key: MLKEM768PrivateKey, change: dict[str, object], message: str
) -> None:
    jwk: dict[str, object] = {**_jwk(private_key), **change}
    jwk = {name: value for name, value in jwk.items() if value is not None}
    with pytest.raises(BadRequestError, match=message):
        parse_tee_pubkey(jwk)


# --- refused responses -----------------------------------------------------------------------


def test_tampered_ek_fails_to_open(private_key: MLKEM768PrivateKey) -> None:
    # ML-KEM's implicit rejection turns an altered ciphertext into an unrelated secret, so the
    # key unwrap fails (the AAD changed too, but the unwrap comes first)
    jwe = _sealed(private_key)
    ek = json.loads(b64url_decode(jwe["protected"]))["ek"]
    with pytest.raises(JweError, match="could not unwrap the content key"):
        open_jwe(private_key, _with_header(jwe, ek=_flip(ek)))


def test_tampered_protected_header_fails_to_open(private_key: MLKEM768PrivateKey) -> None:
    jwe = _sealed(private_key)
    header = json.loads(b64url_decode(jwe["protected"]))
    spaced = json.dumps(header, separators=(", ", ": ")).encode()  # same meaning, other bytes
    with pytest.raises(JweError, match="authentication failed"):
        open_jwe(private_key, {**jwe, "protected": b64url_encode(spaced)})
    with pytest.raises(JweError, match="authentication failed"):
        open_jwe(private_key, _with_header(jwe, kid="smuggled"))


def test_tampered_wrapped_key_fails_to_open(private_key: MLKEM768PrivateKey) -> None:
    jwe = _sealed(private_key)
    with pytest.raises(JweError, match="could not unwrap the content key"):
        open_jwe(private_key, {**jwe, "encrypted_key": _flip(jwe["encrypted_key"])})
    short = b64url_encode(b64url_decode(jwe["encrypted_key"])[:32])
    with pytest.raises(JweError, match="expected a wrapped key of 40 bytes, found 32"):
        open_jwe(private_key, {**jwe, "encrypted_key": short})


@pytest.mark.parametrize("member", ["ciphertext", "tag"])
def test_tampered_ciphertext_or_tag_fails_to_open(
    private_key: MLKEM768PrivateKey, member: str
) -> None:
    jwe = _sealed(private_key)
    with pytest.raises(JweError, match="authentication failed"):
        open_jwe(private_key, {**jwe, member: _flip(jwe[member])})


@pytest.mark.parametrize(
    ("ek", "message"),
    [
        (None, "no 'ek' string"),
        (5, "no 'ek' string"),
        ("AAAA", "ciphertext of 1088 bytes, found 3 bytes"),
        ("not base64!", "'ek' is not base64url"),
    ],
)
def test_missing_or_malformed_ek_refused(
    private_key: MLKEM768PrivateKey, ek: object, message: str
) -> None:
    jwe = _sealed(private_key)
    header = json.loads(b64url_decode(jwe["protected"]))
    header.pop("ek")
    if ek is not None:
        header["ek"] = ek
    with pytest.raises(JweError, match=message):
        open_jwe(private_key, {**jwe, "protected": b64url_encode(json.dumps(header).encode())})


def test_ek_outside_the_protected_header_refused(private_key: MLKEM768PrivateKey) -> None:
    jwe = _sealed(private_key)
    header = json.loads(b64url_decode(jwe["protected"]))
    ek = header.pop("ek")
    moved = {**jwe, "protected": b64url_encode(json.dumps(header).encode()), "header": {"ek": ek}}
    with pytest.raises(JweError, match="'ek' must be in the protected header"):
        open_jwe(private_key, moved)


def test_akp_jwe_for_another_key_fails_to_open(private_key: MLKEM768PrivateKey) -> None:
    with pytest.raises(JweError, match="could not unwrap the content key"):
        open_jwe(MLKEM768PrivateKey.generate(), _sealed(private_key))


def test_key_kind_and_alg_mismatches_refused(private_key: MLKEM768PrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(JweError, match="does not match an EC key"):
        open_jwe(ec_key, _sealed(private_key))
    ec_jwe = seal(parse_tee_pubkey(public_jwk(ec_key.public_key())), SECRET)
    with pytest.raises(JweError, match="does not match an ML-KEM-768 key"):
        open_jwe(private_key, ec_jwe)
    # the client pins the alg its tee-pubkey named
    with pytest.raises(JweError, match="expected JWE alg 'ML-KEM-768\\+A192KW'"):
        TeeKey(private_key).decrypt(dict(ec_jwe))


# --- without the pqc extra -------------------------------------------------------------------


def test_akp_refused_with_the_install_hint_when_the_pqc_extra_is_missing(
    private_key: MLKEM768PrivateKey,
) -> None:
    """A fresh interpreter where pycryptodomex cannot be imported (``sys.modules`` entry None
    makes Python raise ImportError, as for an absent package): AKP keys are refused with the
    reason, and EC keys work as before."""
    program = textwrap.dedent(
        """
        import json, sys
        sys.modules["Cryptodome"] = None
        from cryptography.hazmat.primitives.asymmetric import ec
        from keybroker.client.keys import TeeKey
        from keybroker.errors import KeybrokerError
        from keybroker.protocol.jwk import parse_tee_pubkey, public_jwk
        out = {}
        try:
            parse_tee_pubkey(json.loads(sys.argv[1]))
        except KeybrokerError as e:
            out["parse"] = [e.status, e.detail]
        try:
            TeeKey.generate("ML-KEM-768+A192KW")
        except KeybrokerError as e:
            out["generate"] = e.detail
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        out["ec"] = parse_tee_pubkey(public_jwk(key)).kty
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program, json.dumps(_jwk(private_key))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(done.stdout)
    status, detail = out["parse"]
    assert status == 400
    assert detail.startswith("tee-pubkey: this KBS cannot use AKP (ML-KEM-768) keys:")
    assert "pip install 'keybroker[pqc]'" in detail
    assert "cannot make an ML-KEM-768 TEE key" in out["generate"]
    assert "keybroker[pqc]" in out["generate"]
    assert out["ec"] == "EC"

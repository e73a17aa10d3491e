"""JWE (RFC 7516, flattened JSON serialization) for released resources: ``seal`` on the KBS,
``open_jwe`` on the guest.

Content encryption is always A256GCM (random 32-byte CEK, 12-byte IV) with the ASCII of the
``protected`` member as AAD. Key management: ``ECDH-ES+A256KW`` (P-256, P-384, P-521; Concat KDF
with SHA-256 and empty PartyU/PartyV info), ``RSA-OAEP-256``, ``RSA1_5`` (deprecated: it
works, and logs a warning on every use), and upstream's experimental ``ML-KEM-768+A192KW`` for
AKP keys (KEM ciphertext in the protected header as ``ek``, the content key wrapped with
AES-192 under a KMAC256-derived key; the primitives are in ``akp``).

Built on ``cryptography`` primitives rather than a JOSE library because the upstream guest
rebuilds the AAD by re-serializing the header it parsed (serde, fields ``alg``, ``enc``, then the
rest sorted). ``seal`` must therefore emit compact JSON with keys in exactly the order ``alg``,
``enc``, ``epk`` (``crv``, ``kty``, ``x``, ``y``) or ``ek``, which JOSE libraries do not promise.
``open_jwe`` follows the RFC instead and uses the ``protected`` string as received, so JWEs from
other libraries (any key order, whitespace, ``epk`` in the unprotected header) open too.

Nothing here does I/O or decides who may receive a resource.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from keybroker.errors import BadRequestError, JweError
from keybroker.protocol import akp
from keybroker.protocol.akp import ALG_ML_KEM_768_A192KW
from keybroker.protocol.jwk import (
    ALG_ECDH_ES_A256KW,
    ALG_RSA1_5,
    ALG_RSA_OAEP_256,
    RSA_ALGORITHMS,
    TeePublicKey,
    b64url_decode,
    b64url_encode,
    compact_json,
    curve_name,
    ec_coordinates,
    ec_public_key,
    shown,
    strict_json_object,
)
from keybroker.protocol.models import JsonValue

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

log = logging.getLogger(__name__)

ENC_A256GCM = "A256GCM"
_CEK_BYTES = 32
_IV_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_CEK_BYTES = _CEK_BYTES + 8  # RFC 3394 adds one 64-bit integrity block
_ALGORITHMS = (ALG_ECDH_ES_A256KW, ALG_RSA_OAEP_256, ALG_RSA1_5, ALG_ML_KEM_768_A192KW)
_MEMBERS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")
_MAX_PROTECTED_LENGTH = 16 * 1024
# Header parameters that may sit outside the integrity-protected header (jwcrypto puts ``epk``
# in the per-recipient header). ``alg`` and ``enc`` must be protected: an unprotected ``alg``
# would let a man in the middle switch RSA-OAEP-256 to RSA1_5 and use us as a padding oracle.
_UNPROTECTED_ALLOWED = frozenset({"epk", "apu", "apv", "kid"})
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_RSA1_5_WARNING = (
    "JWE with deprecated RSA1_5 key encryption (PKCS#1 v1.5, open to padding-oracle attacks); "
    "use an RSA-OAEP-256 or EC TEE key"
)


def seal(recipient: TeePublicKey, plaintext: bytes) -> dict[str, str]:
    """Encrypt ``plaintext`` to the guest's key; returns the flattened JWE members."""
    cek = os.urandom(_CEK_BYTES)
    iv = os.urandom(_IV_BYTES)
    try:
        header, encrypted_key = _wrap_cek(recipient, cek)
        protected = b64url_encode(compact_json(header))
        sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    except (ValueError, TypeError) as e:
        raise JweError(f"could not encrypt the response to the TEE key: {e}") from None
    return {
        "protected": protected,
        "encrypted_key": b64url_encode(encrypted_key),
        "iv": b64url_encode(iv),
        "ciphertext": b64url_encode(sealed[:-_TAG_BYTES]),
        "tag": b64url_encode(sealed[-_TAG_BYTES:]),
    }


def _wrap_cek(recipient: TeePublicKey, cek: bytes) -> tuple[dict[str, object], bytes]:
    """The protected header (in wire order) and the encrypted CEK."""
    key = recipient.key
    if recipient.alg == ALG_ECDH_ES_A256KW and isinstance(key, ec.EllipticCurvePublicKey):
        crv = curve_name(key.curve)
        if crv is None or crv != recipient.crv:
            raise ValueError(f"unsupported curve {key.curve.name}")
        ephemeral = ec.generate_private_key(key.curve)
        kek = concat_kdf(ephemeral.exchange(ec.ECDH(), key), ALG_ECDH_ES_A256KW)
        x, y = ec_coordinates(ephemeral.public_key())
        # Order matters: the upstream guest re-serializes this header to rebuild the AAD.
        epk = {"crv": crv, "kty": "EC", "x": x, "y": y}
        header: dict[str, object] = {"alg": ALG_ECDH_ES_A256KW, "enc": ENC_A256GCM, "epk": epk}
        return header, aes_key_wrap(kek, cek)
    if isinstance(key, rsa.RSAPublicKey) and recipient.alg in RSA_ALGORITHMS:
        if recipient.alg == ALG_RSA1_5:
            log.warning(_RSA1_5_WARNING)
            encrypted_key = key.encrypt(cek, padding.PKCS1v15())
        else:
            encrypted_key = key.encrypt(cek, _OAEP)
        return {"alg": recipient.alg, "enc": ENC_A256GCM}, encrypted_key
    if recipient.alg == ALG_ML_KEM_768_A192KW and recipient.kty == akp.KTY_AKP:
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"an AKP key cannot be a {type(key).__name__}")
        kek, ciphertext = akp.encapsulate(key)
        # Order matters, as for ECDH: upstream's guest rebuilds the AAD as alg, enc, ek.
        header = {"alg": ALG_ML_KEM_768_A192KW, "enc": ENC_A256GCM, "ek": b64url_encode(ciphertext)}
        return header, aes_key_wrap(kek, cek)
    raise ValueError(f"unsupported key algorithm {recipient.alg!r} for a {recipient.kty} key")


def concat_kdf(
    shared_secret: bytes, algorithm_id: str, *, party_u: bytes = b"", party_v: bytes = b""
) -> bytes:
    """The 256-bit key-encryption key of RFC 7518 §4.6.2 (NIST SP 800-56A Concat KDF, SHA-256).
    Each OtherInfo field is length-prefixed with a 32-bit big-endian count."""
    other_info = (
        _length_prefixed(algorithm_id.encode("ascii"))
        + _length_prefixed(party_u)
        + _length_prefixed(party_v)
        + (256).to_bytes(4, "big")  # SuppPubInfo: keydatalen in bits
    )
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=32, otherinfo=other_info).derive(
        shared_secret
    )


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# --- the guest side ---------------------------------------------------------------------------


def open_jwe(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | MLKEM768PrivateKey,
    unverified_jwe: object,
    *,
    expected_alg: str | None = None,
) -> bytes:
    """Decrypt a flattened JWE addressed to ``private_key``. ``expected_alg`` pins the key
    management algorithm (pass the ``alg`` of the ``tee-pubkey`` that was sent, so a response
    cannot be downgraded from RSA-OAEP-256 to RSA1_5). Raises ``JweError``."""
    document, members = _members(unverified_jwe)
    protected = members["protected"]
    header = _header(document, protected)
    alg = header["alg"]
    if expected_alg is not None and alg != expected_alg:
        raise JweError(f"expected JWE alg {expected_alg!r}, found {alg!r}")
    encrypted_key = _decode(members, "encrypted_key")
    iv = _decode(members, "iv")
    ciphertext = _decode(members, "ciphertext")
    tag = _decode(members, "tag")
    if len(iv) != _IV_BYTES:
        raise JweError(f"expected a JWE iv of {_IV_BYTES} bytes, found {len(iv)}")
    if len(tag) != _TAG_BYTES:
        raise JweError(f"expected a JWE tag of {_TAG_BYTES} bytes, found {len(tag)}")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if alg != ALG_ECDH_ES_A256KW:
            raise JweError(f"JWE alg {alg!r} does not match an EC key (expected ECDH-ES+A256KW)")
        cek = _unwrap_ecdh(private_key, header, encrypted_key)
    elif isinstance(private_key, rsa.RSAPrivateKey):
        if alg not in RSA_ALGORITHMS:
            raise JweError(
                f"JWE alg {alg!r} does not match an RSA key (expected RSA-OAEP-256 or RSA1_5)"
            )
        cek = _unwrap_rsa(private_key, alg, encrypted_key)
    elif akp.is_private_key(private_key):
        if alg != ALG_ML_KEM_768_A192KW:
            raise JweError(
                f"JWE alg {alg!r} does not match an ML-KEM-768 key (expected ML-KEM-768+A192KW)"
            )
        cek = _unwrap_akp(private_key, header, encrypted_key)
    else:
        reason = akp.unavailable()
        raise JweError(
            "the TEE key must be an RSA, EC or ML-KEM-768 private key"
            + (f" (ML-KEM-768 here: {reason})" if reason else "")
        )
    try:
        # AAD is the protected member exactly as received (RFC 7516 §5.2 step 14).
        return AESGCM(cek).decrypt(iv, ciphertext + tag, protected.encode("ascii"))
    except InvalidTag:
        raise JweError(
            "JWE authentication failed: the ciphertext, tag or protected header was altered, "
            "or the response was not encrypted to this key"
        ) from None


def _members(unverified_jwe: object) -> tuple[Mapping[str, JsonValue], dict[str, str]]:
    if not isinstance(unverified_jwe, Mapping):
        raise JweError(
            f"expected a JWE object (flattened JSON serialization), "
            f"found {type(unverified_jwe).__name__}"
        )
    members: dict[str, str] = {}
    for name in _MEMBERS:
        value = unverified_jwe.get(name)
        if not isinstance(value, str):
            raise JweError(
                f"expected JWE member {name!r} to be a string, found {type(value).__name__}"
            )
        members[name] = value
    unknown = sorted(set(unverified_jwe) - set(_MEMBERS) - {"header", "unprotected", "aad"})
    if unknown:
        raise JweError(f"unexpected JWE member {str(unknown[0])[:32]!r}")
    aad = unverified_jwe.get("aad")
    # Old upstream servers sent ``aad`` equal to ``protected`` (and meant no extra AAD). Any
    # other value would change the AAD (RFC 7516 §5.1 step 14); we never need that, so refuse.
    if aad is not None and aad != members["protected"]:
        raise JweError("JWE member 'aad' is not supported")
    return unverified_jwe, members


def _header(unverified_jwe: Mapping[str, JsonValue], protected: str) -> dict[str, JsonValue]:
    """The JOSE header: the protected header plus the optional unprotected ones, disjoint."""
    if len(protected) > _MAX_PROTECTED_LENGTH:
        raise JweError(f"JWE protected header longer than {_MAX_PROTECTED_LENGTH} characters")
    try:
        header = strict_json_object(b64url_decode(protected))
    except ValueError as e:
        raise JweError(f"JWE protected header is not base64url JSON: {e}") from None
    for member in ("header", "unprotected"):
        extra = unverified_jwe.get(member)
        if extra is None:
            continue
        if not isinstance(extra, Mapping):
            raise JweError(f"expected JWE member {member!r} to be an object")
        for name, value in extra.items():
            if name not in _UNPROTECTED_ALLOWED:
                raise JweError(
                    f"JWE header parameter {str(name)[:32]!r} must be in the protected header"
                )
            if name in header:
                raise JweError(f"JWE header parameter {name!r} appears twice")
            header[name] = value
    if "crit" in header:
        # RFC 7516 §4.1.13: extensions we do not understand must make the JWE invalid.
        raise JweError("JWE header 'crit' lists extensions that are not supported")
    if "zip" in header:
        raise JweError("compressed JWE ('zip') is not supported")
    enc = header.get("enc")
    if enc != ENC_A256GCM:
        raise JweError(f"expected JWE enc 'A256GCM', found {shown(enc)}")
    alg = header.get("alg")
    if alg not in _ALGORITHMS:
        raise JweError(
            f"expected JWE alg {', '.join(repr(a) for a in _ALGORITHMS)}, found {shown(alg)}"
        )
    return header


def _unwrap_ecdh(
    private_key: ec.EllipticCurvePrivateKey, header: Mapping[str, object], encrypted_key: bytes
) -> bytes:
    crv = curve_name(private_key.curve)
    if crv is None:
        raise JweError(f"unsupported TEE key curve {private_key.curve.name}")
    epk = header.get("epk")
    if not isinstance(epk, Mapping):
        raise JweError("JWE header has no 'epk' object (ephemeral public key)")
    if epk.get("kty") != "EC":
        raise JweError(f"expected JWE epk kty 'EC', found {shown(epk.get('kty'))}")
    if epk.get("crv") != crv:
        raise JweError(f"JWE epk curve {shown(epk.get('crv'))} does not match the {crv} key")
    try:
        ephemeral = ec_public_key(crv, epk.get("x"), epk.get("y"), what="JWE epk")
    except BadRequestError as e:
        raise JweError(e.detail) from None
    party_u = _optional_b64(header, "apu")
    party_v = _optional_b64(header, "apv")
    if len(encrypted_key) != _WRAPPED_CEK_BYTES:
        raise JweError(
            f"expected a wrapped key of {_WRAPPED_CEK_BYTES} bytes, found {len(encrypted_key)}"
        )
    kek = concat_kdf(
        private_key.exchange(ec.ECDH(), ephemeral),
        ALG_ECDH_ES_A256KW,
        party_u=party_u,
        party_v=party_v,
    )
    try:
        return aes_key_unwrap(kek, encrypted_key)
    except InvalidUnwrap:
        raise JweError(
            "could not unwrap the content key: the JWE was altered or not encrypted to this key"
        ) from None


def _unwrap_akp(
    private_key: MLKEM768PrivateKey, header: Mapping[str, object], encrypted_key: bytes
) -> bytes:
    ek = header.get("ek")
    if not isinstance(ek, str):
        raise JweError("JWE header has no 'ek' string (the ML-KEM ciphertext)")
    try:
        ciphertext = b64url_decode(ek)
    except ValueError as e:
        raise JweError(f"JWE header 'ek' is not base64url: {e}") from None
    if len(encrypted_key) != _WRAPPED_CEK_BYTES:
        raise JweError(
            f"expected a wrapped key of {_WRAPPED_CEK_BYTES} bytes, found {len(encrypted_key)}"
        )
    try:
        kek = akp.decapsulate(private_key, ciphertext)
    except ValueError as e:
        raise JweError(f"JWE header 'ek': {e}") from None
    try:
        return aes_key_unwrap(kek, encrypted_key)
    except InvalidUnwrap:
        raise JweError(
            "could not unwrap the content key: the JWE was altered or not encrypted to this key"
        ) from None


def _unwrap_rsa(private_key: rsa.RSAPrivateKey, alg: str, encrypted_key: bytes) -> bytes:
    if alg == ALG_RSA_OAEP_256:
        try:
            cek = private_key.decrypt(encrypted_key, _OAEP)
        except ValueError:
            raise JweError(
                "could not decrypt the content key: the JWE was altered or not encrypted to "
                "this key"
            ) from None
        if len(cek) != _CEK_BYTES:
            raise JweError(f"expected a {_CEK_BYTES}-byte content key, found {len(cek)} bytes")
        return cek
    log.warning(_RSA1_5_WARNING)
    # Bleichenbacher: a distinguishable padding error turns the decryptor into an oracle. As
    # RFC 7516 §11.5 says, continue with a random CEK so a bad padding fails like a bad tag.
    fallback = os.urandom(_CEK_BYTES)
    try:
        cek = private_key.decrypt(encrypted_key, padding.PKCS1v15())
    except ValueError:
        return fallback
    return cek if len(cek) == _CEK_BYTES else fallback


def _decode(members: Mapping[str, str], name: str) -> bytes:
    try:
        return b64url_decode(members[name])
    except ValueError as e:
        raise JweError(f"JWE member {name!r} is not base64url: {e}") from None


def _optional_b64(header: Mapping[str, object], name: str) -> bytes:
    value = header.get(name)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise JweError(f"expected JWE header {name!r} to be a base64url string")
    try:
        return b64url_decode(value)
    except ValueError as e:
        raise JweError(f"JWE header {name!r} is not base64url: {e}") from None

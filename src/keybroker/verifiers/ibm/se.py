"""The ``se`` verifier: IBM Secure Execution for Linux (s390x), without IBM hardware here.

SE attestation is a question the verifier asks and only the Ultravisor of a host that runs the
guest can answer. The *challenge* (the ``nonce`` of the KBS challenge, a JSON string, as
upstream) is an attestation request: a fresh 64-byte measurement key and 16-byte nonce,
encrypted to the host keys of the configured, verified host-key documents
(:mod:`keybroker.verifiers.ibm.se_hkd`), plus the same two secrets encrypted to the verifier's
own RSA key so that any KBS replica holding that key can check the answer. The guest adds its
runtime-data digest and asks the Ultravisor, which HMACs the running image's header tags, its
Configuration Unique ID, that user data, the nonce and the public host-key hashes.

Evidence is upstream's ``SeAttestationResponse`` (standard base64 members ``measurement``,
``additional_data``, ``user_data``, ``cuid``, ``encr_measurement_key``,
``encr_request_nonce``, ``image_hdr_tags``). Checked, each step failing closed with
:class:`EvidenceError`:

1. sizes and encodings of every member (bounded before anything is decoded);
2. the measurement key and nonce decrypt under the verifier's RSA key, and the nonce is the
   one this verifier derives from that key (so the pair was issued by this verifier, not
   encrypted to its public key by someone who then knows the key; upstream lacks this);
3. the first 64 bytes of user data are the session's runtime-data digest (zero-padded);
4. the measurement equals HMAC-SHA-512 over the documented inputs (compared in constant time);
5. the additional data holds both public host-key hashes.

Claims are upstream's (``cuid``, ``report_data``, ``version``, ``image_phkh``,
``attestation_phkh``, ``tag``), plus ``image_dump_allowed`` when the measured header tag is the
configured image header's (whose plaintext control flags then tell whether the guest may be
dumped); the default policy refuses to call a dumpable guest's configuration trustworthy.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keybroker.errors import AttestationError, EvidenceError, KeybrokerError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.ibm.se_formats import (
    ADDITIONAL_SIZE,
    MAX_USER_DATA,
    MEASUREMENT_KEY_SIZE,
    MEASUREMENT_SIZE,
    NONCE_SIZE,
    TAGS_SIZE,
    AttestationSecrets,
    BootHdrTags,
    SeHeader,
    build_arcb,
    measurement,
    parse_additional_data,
    parse_se_header,
)
from keybroker.verifiers.ibm.se_hkd import (
    MAX_FILE_BYTES,
    MAX_FILES,
    TrustMaterial,
    load_certificates,
    load_crl,
    verify_host_key_document,
    verify_signing_key,
)
from keybroker.verifiers.ibm.se_settings import SeSettings

log = logging.getLogger(__name__)

TEE = Tee.SE
REPORT_DATA_SIZE = 64
ATTESTATION_VERSION = 0x0100  # upstream's claim `version`: 256
CUID_SIZE = 16
MAX_ADDITIONAL = 8 * 4096  # the uvdevice returns at most 8 pages of additional data
MAX_RSA_CIPHERTEXT = 1024  # an RSA key of up to 8192 bits
HOST_KEYS_RECHECK_SECONDS = 3600.0  # re-verify documents, chain and CRLs at least this often
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_BUNDLED_ROOT = Path(__file__).parent.parent / "data" / "digicert-trusted-root-g4.pem"

# member -> (fixed size or None, maximum size)
_MEMBERS: dict[str, tuple[int | None, int]] = {
    "measurement": (MEASUREMENT_SIZE, MEASUREMENT_SIZE),
    "additional_data": (None, MAX_ADDITIONAL),
    "user_data": (None, MAX_USER_DATA),
    "cuid": (CUID_SIZE, CUID_SIZE),
    "encr_measurement_key": (None, MAX_RSA_CIPHERTEXT),
    "encr_request_nonce": (None, MAX_RSA_CIPHERTEXT),
    "image_hdr_tags": (TAGS_SIZE, TAGS_SIZE),
}


@dataclass(frozen=True)
class SeResponse:
    measurement: bytes
    additional_data: bytes
    user_data: bytes
    cuid: bytes
    encr_measurement_key: bytes
    encr_request_nonce: bytes
    image_hdr_tags: BootHdrTags


def parse_response(unverified_evidence: JsonValue) -> SeResponse:
    if not isinstance(unverified_evidence, dict):
        raise EvidenceError("se evidence must be a JSON object (an SeAttestationResponse)")
    values: dict[str, bytes] = {}
    for name, (size, limit) in _MEMBERS.items():
        text = unverified_evidence.get(name)
        if not isinstance(text, str):
            raise EvidenceError(f"se evidence lacks the base64 string `{name}`")
        if len(text) > (limit + 2) // 3 * 4:
            raise EvidenceError(f"se evidence `{name}` is longer than {limit} bytes")
        try:
            value = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise EvidenceError(f"se evidence `{name}` is not standard base64") from None
        if size is not None and len(value) != size:
            raise EvidenceError(
                f"se evidence `{name}` is {len(value)} bytes, expected {size} (truncated?)"
            )
        values[name] = value
    tags = BootHdrTags.from_bytes(values.pop("image_hdr_tags"))
    return SeResponse(image_hdr_tags=tags, **values)


@dataclass(frozen=True)
class _Keys:
    private: rsa.RSAPrivateKey
    binding_secret: bytes
    header: SeHeader


def _not_set_up(problem: str) -> AttestationError:
    # The material is read on first use, not at start-up: a problem is the operator's, but it
    # surfaces at /auth, so it is an attestation failure that says what to fix.
    return AttestationError(f"IBM SE is not set up: {problem}")


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _not_set_up(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as e:
        raise _not_set_up(f"cannot read {what} {path} ({e.strerror})") from None


def _files(directory: Path, what: str) -> list[Path]:
    try:
        files = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as e:
        raise _not_set_up(f"cannot list {what} in {directory} ({e.strerror})") from None
    if len(files) > MAX_FILES:
        raise _not_set_up(f"{directory} holds {len(files)} files, at most {MAX_FILES} are read")
    return files


def _measurement_encryption_key(s: SeSettings) -> rsa.RSAPrivateKey:
    """The verifier's RSA key (upstream's ``encrypt_key.pem``), checked against its public half
    when that file is there."""
    pem = _read(s.measurement_key_private, "the SE measurement-encryption key")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
        public = (
            serialization.load_pem_public_key(
                _read(s.measurement_key_public, "the SE measurement-encryption public key")
            )
            if s.measurement_key_public.exists()
            else None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _not_set_up(
            f"{s.measurement_key_private} or {s.measurement_key_public} is not an unencrypted "
            "PEM key"
        ) from None
    if not isinstance(private, rsa.RSAPrivateKey) or private.key_size < 2048:
        raise _not_set_up(f"{s.measurement_key_private} must be an RSA key >= 2048 bits")
    if public is not None and public != private.public_key():
        raise _not_set_up(
            f"{s.measurement_key_public} is not the public half of {s.measurement_key_private}"
        )
    return private


def nonce_binding(binding_secret: bytes, measurement_key: bytes) -> bytes:
    """The request nonce this verifier pairs with ``measurement_key``: a MAC under a secret
    only the holder of the RSA key has, so a forged (key, nonce) pair does not verify."""
    return hmac.new(binding_secret, measurement_key, hashlib.sha256).digest()[:NONCE_SIZE]


class SeVerifier(Verifier):
    tee = TEE
    may_block = True  # RSA decryption, and the first use reads and verifies files
    makes_challenge = True

    def __init__(self, settings: SeSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: _Keys | None = None
        self._host_keys: tuple[list[ec.EllipticCurvePublicKey], float] | None = None
        if settings.insecure_skip_certs_verification:
            log.warning(
                "INSECURE: SE host-key documents are used without verifying IBM's signatures, "
                "chain or CRLs (insecure_skip_certs_verification); never in production"
            )

    # --- material, loaded on first use (a KBS without SE material still starts) ---------------

    def _load_keys(self) -> _Keys:
        with self._lock:
            if self._keys is None:
                s = self._settings
                private = _measurement_encryption_key(s)
                der = private.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                secret = hashlib.sha256(b"keybroker se nonce binding\x00" + der).digest()
                header = parse_se_header(_read(s.image_header, "the SE image header"))
                self._keys = _Keys(private=private, binding_secret=secret, header=header)
            return self._keys

    def _load_host_keys(self) -> list[ec.EllipticCurvePublicKey]:
        now_ts = self._clock()
        with self._lock:
            if self._host_keys is not None and now_ts < self._host_keys[1]:
                return self._host_keys[0]
        keys = self._verified_host_keys(datetime.datetime.fromtimestamp(now_ts, datetime.UTC))
        with self._lock:
            self._host_keys = (keys, now_ts + HOST_KEYS_RECHECK_SECONDS)
        return keys

    def _verified_host_keys(self, now: datetime.datetime) -> list[ec.EllipticCurvePublicKey]:
        s = self._settings
        documents = []
        for path in _files(s.host_key_documents_dir, "host-key documents"):
            certs = load_certificates(_read(path, "host-key document"), str(path))
            if len(certs) != 1:
                raise _not_set_up(f"host-key document {path} holds {len(certs)} certificates")
            documents.append(certs[0])
        if not documents:
            raise _not_set_up(f"no host-key documents in {s.host_key_documents_dir}")
        if s.insecure_skip_certs_verification:
            log.warning("INSECURE: SE host-key documents used unverified")
            keys = [d.public_key() for d in documents]
            if not all(isinstance(k, ec.EllipticCurvePublicKey) for k in keys):
                raise _not_set_up("an SE host-key document does not hold an EC key")
            return [k for k in keys if isinstance(k, ec.EllipticCurvePublicKey)]
        material = TrustMaterial(
            certificates=[
                c
                for p in _files(s.certificates_dir, "SE certificates")
                for c in load_certificates(_read(p, "SE certificate"), str(p))
            ],
            crls=[load_crl(_read(p, "SE CRL"), str(p)) for p in _files(s.crls_dir, "SE CRLs")],
            roots=self._roots(),
        )
        signing_key = verify_signing_key(material, now)
        return [verify_host_key_document(d, signing_key, material.crls, now) for d in documents]

    def _roots(self) -> list[x509.Certificate]:
        path = self._settings.root_ca if self._settings.root_ca.exists() else _BUNDLED_ROOT
        return load_certificates(_read(path, "the SE root CA"), str(path))

    # --- the challenge ------------------------------------------------------------------------

    def challenge(self, tee_parameters: JsonValue) -> str:
        """Upstream's ``SeAttestationRequest`` as a JSON string (the KBS challenge nonce)."""
        try:
            return self._challenge()
        except KeybrokerError:
            raise
        except Exception as e:  # odd material must refuse /auth, never answer 500
            log.warning("the SE challenge failed (%s: %s)", type(e).__name__, e)
            raise _not_set_up("the SE material could not be used (details in the KBS log)") from e

    def _challenge(self) -> str:
        keys = self._load_keys()
        host_keys = self._load_host_keys()
        measurement_key = os.urandom(MEASUREMENT_KEY_SIZE)
        secrets = AttestationSecrets(
            measurement_key=measurement_key,
            nonce=nonce_binding(keys.binding_secret, measurement_key),
        )
        public = keys.private.public_key()
        request = {
            "request_blob": _b64(build_arcb(host_keys, secrets)),
            "measurement_size": MEASUREMENT_SIZE,
            "additional_size": ADDITIONAL_SIZE,
            "encr_measurement_key": _b64(public.encrypt(secrets.measurement_key, _OAEP)),
            "encr_request_nonce": _b64(public.encrypt(secrets.nonce, _OAEP)),
            "image_hdr_tags": _b64(keys.header.tags.to_bytes()),
        }
        return json.dumps(request, separators=(",", ":"))

    # --- the evidence -------------------------------------------------------------------------

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        response = parse_response(unverified_evidence)
        keys = self._load_keys()
        secrets = self._secrets(keys, response)
        if expected_report_data is not None:
            expected = expected_report_data[:REPORT_DATA_SIZE].ljust(REPORT_DATA_SIZE, b"\0")
            if not hmac.compare_digest(response.user_data[:REPORT_DATA_SIZE], expected):
                raise EvidenceError(
                    "the SE user data does not start with the digest of the session's runtime "
                    "data (wrong nonce or key, or a replayed response)"
                )
        if expected_init_data is not None:
            log.warning("the IBM SE verifier does not bind init data; its digest is ignored")
        expected_measurement = measurement(
            secrets.measurement_key,
            response.image_hdr_tags,
            response.cuid,
            user_data=response.user_data,
            nonce=secrets.nonce,
            additional_data=response.additional_data,
        )
        if not hmac.compare_digest(expected_measurement, response.measurement):
            raise EvidenceError("the SE attestation measurement does not verify")
        if len(response.additional_data) < ADDITIONAL_SIZE:
            raise EvidenceError("the SE additional data lacks the public host-key hashes")
        additional = parse_additional_data(response.additional_data[:ADDITIONAL_SIZE])
        claims: dict[str, JsonValue] = {
            "cuid": response.cuid.hex(),
            "report_data": expected_report_data.hex() if expected_report_data else "",
            "version": ATTESTATION_VERSION,
            "image_phkh": additional.image_phkh.hex(),
            "attestation_phkh": additional.attestation_phkh.hex(),
            "tag": response.image_hdr_tags.tag.hex(),
        }
        if response.image_hdr_tags == keys.header.tags:
            claims["image_dump_allowed"] = keys.header.dump_allowed
        return [TeeClaims(tee=TEE, tee_class="cpu", claims=claims)]

    def _secrets(self, keys: _Keys, response: SeResponse) -> AttestationSecrets:
        try:
            measurement_key = keys.private.decrypt(response.encr_measurement_key, _OAEP)
            nonce = keys.private.decrypt(response.encr_request_nonce, _OAEP)
        except ValueError:
            raise EvidenceError(
                "the SE measurement key or request nonce does not decrypt with this verifier's key"
            ) from None
        if len(measurement_key) != MEASUREMENT_KEY_SIZE or len(nonce) != NONCE_SIZE:
            raise EvidenceError("the SE measurement key or request nonce has the wrong size")
        if not hmac.compare_digest(nonce, nonce_binding(keys.binding_secret, measurement_key)):
            raise EvidenceError("the SE measurement key and nonce were not issued by this verifier")
        return AttestationSecrets(measurement_key=measurement_key, nonce=nonce)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

"""The attestation keys (AKs) the ``tpm`` verifier trusts: a directory the operator fills.

A plain TPM proves nothing by itself: anyone can run a software TPM and quote whatever PCR
values they like. What makes a quote worth believing is that its AK is one the operator has
enrolled (for example after checking its EK certificate and running TPM2_ActivateCredential, or
by creating the AK on a machine they control). This module holds that enrolment list.

Configuration, with upstream Trustee's key names (its AS documents them; its current code
moved the check into the attestation policy, see docs/verifiers-tpm.md)::

    [attestation_service.verifier_config.tpm_verifier]
    trusted_ak_keys_dir = "/etc/tpm/trusted_ak_keys"   # the default, as upstream's
    max_trusted_ak_keys = 100                          # the default, as upstream's

Each regular file named ``*.pub`` (upstream's convention), ``*.pem`` or ``*.crt`` in that
directory holds one PEM public key (``tpm2_createak -f pem`` writes one) or one PEM
certificate whose subject key is the AK; other files are ignored, and a file that does not
parse is skipped with a warning (as upstream). A certificate only names the key: its validity
and issuer are not checked, enrolling it is the operator's decision.

Keys are compared as SHA-256 of their DER SubjectPublicKeyInfo, re-encoded, so the same key in
another encoding still matches. The directory is re-read when its modification time changes
(a file added, removed or renamed), so enrolling an AK needs no restart; editing a file in place
does not change the directory's time (write a new file and rename it over the old one). With
no directory, or none of its files usable, every TPM quote is refused: fail closed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError, EvidenceError

log = logging.getLogger(__name__)

DEFAULT_TRUSTED_AK_KEYS_DIR = Path("/etc/tpm/trusted_ak_keys")
DEFAULT_MAX_TRUSTED_AK_KEYS = 100
AK_FILE_SUFFIXES = (".pub", ".pem", ".crt")
MAX_AK_FILE_SIZE = 64 * 1024  # a PEM key or certificate is a few KiB

AkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class TpmVerifierSettings(BaseModel):
    """``[attestation_service.verifier_config.tpm_verifier]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trusted_ak_keys_dir: Path = DEFAULT_TRUSTED_AK_KEYS_DIR
    max_trusted_ak_keys: int = Field(default=DEFAULT_MAX_TRUSTED_AK_KEYS, ge=1, le=100_000)


def tpm_settings(verifier_config: dict[str, Any] | None) -> TpmVerifierSettings:
    section = (verifier_config or {}).get("tpm_verifier", {})
    try:
        return TpmVerifierSettings.model_validate(section)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        section_name = "[attestation_service.verifier_config.tpm_verifier]"
        raise ConfigError(f"{section_name} {problems}") from None


def ak_fingerprint(key: AkPublicKey) -> bytes:
    """SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def load_ak_file(data: bytes) -> AkPublicKey:
    """One enrolled AK: a PEM public key or a PEM certificate (its subject key)."""
    key: object
    if b"-----BEGIN CERTIFICATE-----" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"a {type(key).__name__.removeprefix('_')} cannot be a TPM AK")
    return key


@dataclass(frozen=True)
class _Snapshot:
    mtime_ns: int | None  # None: the directory could not be read
    fingerprints: frozenset[bytes]


class TrustedAks:
    """The enrolled AKs of one directory, re-read when the directory changes."""

    def __init__(self, directory: Path, max_keys: int = DEFAULT_MAX_TRUSTED_AK_KEYS) -> None:
        self._directory = directory
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._snapshot = self._load()
        log.info(
            "tpm verifier: %d trusted AK key(s) in %s",
            len(self._snapshot.fingerprints),
            directory,
        )

    @property
    def directory(self) -> Path:
        return self._directory

    def _mtime_ns(self) -> int | None:
        try:
            return os.stat(self._directory).st_mtime_ns
        except OSError:
            return None

    def _load(self) -> _Snapshot:
        mtime = self._mtime_ns()
        if mtime is None:
            return _Snapshot(None, frozenset())
        fingerprints: set[bytes] = set()
        try:
            names = sorted(os.listdir(self._directory))
        except OSError as e:
            log.warning("tpm verifier: cannot list %s: %s", self._directory, e.strerror)
            return _Snapshot(None, frozenset())
        candidates = [n for n in names if n.endswith(AK_FILE_SUFFIXES)]
        for name in candidates[: self._max_keys]:
            key = self._read(self._directory / name)
            if key is not None:
                fingerprints.add(ak_fingerprint(key))
        if len(candidates) > self._max_keys:
            log.warning(
                "tpm verifier: %s holds %d AK files; only the first %d (by name) are read",
                self._directory,
                len(candidates),
                self._max_keys,
            )
        return _Snapshot(mtime, frozenset(fingerprints))

    @staticmethod
    def _read(path: Path) -> AkPublicKey | None:
        try:
            if not path.is_file() or path.stat().st_size > MAX_AK_FILE_SIZE:
                return None
            return load_ak_file(path.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("tpm verifier: skipping trusted AK file %s: %s", path, e)
            return None

    def _current(self) -> _Snapshot:
        mtime = self._mtime_ns()
        with self._lock:
            if mtime != self._snapshot.mtime_ns or mtime is None:
                self._snapshot = self._load()
            return self._snapshot

    def check(self, key: AkPublicKey) -> None:
        """Refuse ``key`` unless it is enrolled."""
        snapshot = self._current()
        if not snapshot.fingerprints:
            raise EvidenceError(
                f"no trusted TPM attestation keys are configured (trusted_ak_keys_dir "
                f"{self._directory} is missing or holds no usable key): TPM evidence is refused"
            )
        if ak_fingerprint(key) not in snapshot.fingerprints:
            raise EvidenceError(
                "the TPM attestation key is not one of the trusted AKs in "
                f"{self._directory} (SHA-256 of its public key: {ak_fingerprint(key).hex()})"
            )


def build_trusted_aks(verifier_config: dict[str, Any] | None) -> TrustedAks:
    settings = tpm_settings(verifier_config)
    return TrustedAks(settings.trusted_ak_keys_dir, settings.max_trusted_ak_keys)

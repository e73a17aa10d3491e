"""The NVIDIA GPU verifier (TEE ``nvidia``): Hopper SPDM reports checked here (local mode, the
default), or every device appraised by NVIDIA's NRAS (remote mode, :mod:`.nras`).

Evidence, as upstream's attester (guest-components ``nvidia`` attester) sends it::

    {"device_evidence_list": [{"arch": "HOPPER", "uuid": "GPU-…",
                               "evidence": "<hex or base64 of the SPDM report>",
                               "certificate": "<base64 of the PEM chain, leaf first>"}, …]}

Local mode, for every device, failing closed with :class:`EvidenceError` at the first doubt:

1. the architecture is Hopper (the only one local mode reads, as upstream);
2. the certificate chain leads to NVIDIA's Device Identity CA **pinned in this package**
   (:mod:`keybroker.verifiers.nvidia.gpu_certs`), never to a root from the evidence;
3. the report's ``fwid`` equals the FWID in the signing certificate;
4. the signing certificate's P-384 key signed the report (ECDSA, SHA-384, r||s);
5. the SPDM request nonce is the session's runtime-data digest, truncated or zero-padded to
   32 bytes (upstream's binding).

Each device yields one ``gpu`` submodule with upstream's claims (``arch``, ``uuid``,
``measurements`` {index: hex}, ``config`` {opaque data}). Whether the measurements are the
ones NVIDIA's RIMs list, and the versions acceptable, is the attestation policy's call
(``default_gpu``, with reference values from the RVPS).

Remote mode (``type = "Remote"``): Hopper and Blackwell GPUs (``gpu``) and NVSwitches (LS10,
``switch``) are sent to NRAS with the same 32-byte nonce; NRAS's signed claims become the
submodule's, and a complete protected-PCIe topology adds a ``ppcie`` submodule (upstream's).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.nvidia.gpu_certs import (
    certificate_fwid,
    load_chain,
    pinned_root,
    verify_chain,
)
from keybroker.verifiers.nvidia.nras import (
    NRAS_JWKS_URL,
    NRAS_URL,
    NrasClient,
    nras_claims,
    ppcie_claims,
)
from keybroker.verifiers.nvidia.spdm import (
    MAX_REPORT_BYTES,
    NONCE_SIZE,
    SIGNATURE_SIZE,
    SpdmReport,
    parse_report,
)

MAX_DEVICES = 16  # an HGX board: 8 GPUs and 4 switches
MAX_UUID = 128
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")
# upstream's Architecture enum: variant names and their upper-case aliases
_ARCHITECTURES = {
    "Hopper": "Hopper",
    "HOPPER": "Hopper",
    "Blackwell": "Blackwell",
    "BLACKWELL": "Blackwell",
    "LS10": "LS10",
}


class NvidiaSettings(BaseModel):
    """``[attestation_service.verifier_config.nvidia_verifier]``: upstream's ``type`` and
    ``verifier_url``, plus Keybroker's ``jwks_url``, ``ca_cert``, ``timeout`` and
    ``insecure_http`` for remote mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["Local", "local", "Remote", "remote"] = "Local"
    verifier_url: str = NRAS_URL
    jwks_url: str = NRAS_JWKS_URL
    ca_cert: Path | None = None
    timeout: float = Field(default=60.0, gt=0, le=600)
    insecure_http: bool = False


def nvidia_settings(verifier_config: dict[str, Any] | None) -> NvidiaSettings:
    section = (verifier_config or {}).get("nvidia_verifier") or {}
    if isinstance(section, dict) and isinstance(section.get("verifier"), dict):
        section = section["verifier"]  # upstream's TOML spelling ``[nvidia_verifier.verifier]``
    try:
        return NvidiaSettings.model_validate(section)
    except ValidationError as e:
        raise ConfigError(f"verifier_config.nvidia_verifier is invalid: {e}") from None


def build_nvidia_verifier(
    verifier_config: dict[str, Any] | None, clock: Callable[[], float]
) -> NvidiaVerifier:
    settings = nvidia_settings(verifier_config)
    if settings.type.lower() == "local":
        return NvidiaVerifier(clock=clock)
    try:
        ca_pem = settings.ca_cert.read_bytes() if settings.ca_cert else None
    except OSError as e:
        raise ConfigError(f"nvidia_verifier ca_cert {settings.ca_cert}: {e}") from None
    client = NrasClient(
        settings.verifier_url,
        settings.jwks_url,
        timeout=settings.timeout,
        ca_pem=ca_pem,
        insecure_http=settings.insecure_http,
    )
    return NvidiaVerifier(nras=client, clock=clock)


def regularized(value: bytes, width: int) -> bytes:
    """``value`` truncated or zero-padded to ``width`` bytes (upstream's regularize_data)."""
    return value[:width] + bytes(max(0, width - len(value)))


class NvidiaVerifier(Verifier):
    tee = Tee.NVIDIA
    may_block = True  # a few P-384 verifications per device: kept off the event loop

    def __init__(
        self,
        *,
        anchors: Sequence[x509.Certificate] | None = None,
        nras: NrasClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``anchors``: the trusted roots; NVIDIA's pinned root unless a test gives its own.
        ``nras``: appraise through NRAS (remote mode) instead of locally."""
        self._anchors = list(anchors) if anchors is not None else [pinned_root()]
        self._nras = nras
        self._clock = clock

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        if expected_report_data is None:
            raise EvidenceError("nvidia evidence can only be verified against report data")
        nonce = regularized(expected_report_data, NONCE_SIZE)
        devices = _devices(unverified_evidence)
        if self._nras is not None:
            return self._remote(self._nras, devices, nonce)
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        return [TeeClaims(Tee.NVIDIA, "gpu", self._device(d, nonce, now)) for d in devices]

    def _remote(
        self, nras: NrasClient, devices: list[Mapping[str, JsonValue]], nonce: bytes
    ) -> list[TeeClaims]:
        """Upstream's remote mode: NRAS appraises each device; a complete protected-PCIe
        topology adds a ``ppcie`` submodule."""
        verified: list[TeeClaims] = []
        for device in devices:
            arch = _ARCHITECTURES.get(_string(device, "arch", 16))
            if arch is None:
                raise EvidenceError(
                    "the NVIDIA device architecture is not Hopper, Blackwell or LS10"
                )
            endpoint = "switch" if arch == "LS10" else "gpu"
            evidence = _string(device, "evidence", 4 * MAX_REPORT_BYTES).strip()
            if _HEX.fullmatch(evidence):
                evidence = base64.b64encode(bytes.fromhex(evidence)).decode()
            body: dict[str, JsonValue] = {
                "nonce": nonce.hex(),
                "arch": arch.upper(),
                "evidence_list": [
                    {"evidence": evidence, "certificate": _string(device, "certificate", 64 * 1024)}
                ],
                "claims_version": "3.0",
            }
            answer = nras.attest(endpoint, body)
            claims = nras_claims(answer, nras, endpoint, self._clock())
            verified.append(TeeClaims(Tee.NVIDIA, endpoint, claims))
        try:
            topology = ppcie_claims([(c.tee_class, c.claims) for c in verified])
        except EvidenceError:
            return verified  # not a PPCIE system: the devices stand on their own, as upstream
        return [*verified, TeeClaims(Tee.NVIDIA, "ppcie", topology)]

    def _device(
        self, unverified: Mapping[str, JsonValue], nonce: bytes, now: datetime.datetime
    ) -> dict[str, JsonValue]:
        arch = _ARCHITECTURES.get(_string(unverified, "arch", 16))
        if arch != "Hopper":
            raise EvidenceError(
                "only Hopper GPUs are verified locally; other NVIDIA devices need NRAS"
            )
        uuid = _string(unverified, "uuid", MAX_UUID) if "uuid" in unverified else "unknown"
        report_bytes = _report_bytes(_string(unverified, "evidence", 4 * MAX_REPORT_BYTES))
        chain_pem = _base64(_string(unverified, "certificate", 64 * 1024), "certificate")
        report = parse_report(report_bytes)
        leaf = verify_chain(load_chain(chain_pem), self._anchors, now)
        if report.opaque.get("fwid") != certificate_fwid(leaf).hex():
            raise EvidenceError(
                "the NVIDIA report's fwid is not the one its signing certificate carries"
            )
        _check_signature(report, leaf)
        if report.request_nonce != nonce:
            raise EvidenceError(
                "the NVIDIA report's nonce does not bind this session's runtime data"
            )
        return {
            "arch": arch,
            "uuid": uuid,
            "measurements": {str(i): v.hex() for i, v in sorted(report.measurements.items())},
            "config": dict(report.opaque),
        }


def _devices(unverified: JsonValue) -> list[Mapping[str, JsonValue]]:
    devices = unverified.get("device_evidence_list") if isinstance(unverified, dict) else None
    if not isinstance(devices, list) or not devices:
        raise EvidenceError("nvidia evidence needs a non-empty device_evidence_list")
    if len(devices) > MAX_DEVICES:
        raise EvidenceError(
            f"nvidia evidence lists {len(devices)} devices, at most {MAX_DEVICES} are accepted"
        )
    if not all(isinstance(d, dict) for d in devices):
        raise EvidenceError("every nvidia device evidence must be an object")
    return devices


def _string(unverified: Mapping[str, JsonValue], key: str, limit: int) -> str:
    value = unverified.get(key)
    if not isinstance(value, str):
        raise EvidenceError(f"nvidia device evidence needs a string {key}")
    if len(value) > limit:
        raise EvidenceError(f"nvidia device {key} is longer than {limit} characters")
    return value


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"nvidia device {what} is not base64") from None


def _report_bytes(text: str) -> bytes:
    """Hex (the original encoding) or base64 (NVAT's), tried in upstream's order."""
    stripped = text.strip()
    if _HEX.fullmatch(stripped):
        return bytes.fromhex(stripped)
    return _base64(stripped, "evidence")


def _check_signature(report: SpdmReport, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError("the NVIDIA signing certificate's key is not P-384")
    half = SIGNATURE_SIZE // 2
    r = int.from_bytes(report.signature[:half], "big")
    s = int.from_bytes(report.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError("the NVIDIA report's signature does not verify") from None

"""The NVIDIA BlueField DPU verifier (TEE ``nvidiadpu``): a TCG DICE chain and a signed nonce.

Evidence, as upstream's attester (guest-components ``nvidia_dpu``) sends it::

    {"version": 1, "devices": [{"architecture": "bluefield3",
                                "alias_cert": "<base64 DER>", "device_id_cert": "<base64 DER>",
                                "report_data_signature": "<base64, DER or r||s>"}]}

Checked, failing closed with :class:`EvidenceError`:

1. exactly one device (as upstream), format version 1;
2. Alias → DeviceID → the manufacturer root **configured by the operator**
   (``[attestation_service.verifier_config.nvidia_dpu_verifier] root_ca_cert_path``; NVIDIA
   publishes no DPU root Keybroker could pin, and upstream requires the same setting), built with
   :func:`keybroker.protocol.x509chain.build_path`: signatures, CA flags, validity at the
   injected time; both keys P-384;
3. the Alias certificate is fresh: issued (notBefore) at most ``max_cert_age_secs`` ago
   (default 3600, upstream's), never in the future;
4. the Alias key signed (ECDSA P-384, SHA-384) the session's runtime-data digest zero-padded
   to 64 bytes: the bytes upstream's attester signs.

Claims, upstream's names: ``device_serial``, ``device_class`` (the DeviceID CN),
``firmware_layers_count`` and ``accumulated_fwid`` (SHA-384 over the FWIDs of the DeviceID's
DICE TcbInfo, :mod:`keybroker.verifiers.tcg.dice`), ``alias_timestamp``, ``session_nonce``.
TEE class ``nvidia-dpu`` (upstream's), so the policy is ``<id>_nvidia-dpu``.

With no root configured the verifier still registers (``/auth`` answers) but refuses every
piece of evidence, saying the root is missing.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.protocol.x509chain import build_path
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.tcg.dice import TCB_INFO_OID, tcb_info_fwids

TEE_CLASS = "nvidia-dpu"
REPORT_DATA_SIZE = 64  # the attester zero-pads report data to 64 bytes before signing
MAX_CERT_BYTES = 8 * 1024
MAX_SIGNATURE_BYTES = 128


class NvidiaDpuSettings(BaseModel):
    """``[attestation_service.verifier_config.nvidia_dpu_verifier]``, upstream's section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    root_ca_cert_path: Path | None = None
    max_cert_age_secs: int = Field(default=3600, gt=0)


def build_dpu_verifier(
    verifier_config: dict[str, Any] | None, clock: Callable[[], float]
) -> NvidiaDpuVerifier:
    section = (verifier_config or {}).get("nvidia_dpu_verifier") or {}
    try:
        settings = NvidiaDpuSettings.model_validate(section)
    except ValidationError as e:
        raise ConfigError(f"verifier_config.nvidia_dpu_verifier is invalid: {e}") from None
    roots: list[x509.Certificate] = []
    if settings.root_ca_cert_path is not None:
        try:
            roots = x509.load_pem_x509_certificates(settings.root_ca_cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"nvidia_dpu_verifier root_ca_cert_path {settings.root_ca_cert_path}: {e}"
            ) from None
    return NvidiaDpuVerifier(roots, max_cert_age=settings.max_cert_age_secs, clock=clock)


class NvidiaDpuVerifier(Verifier):
    tee = Tee.NVIDIA_DPU
    may_block = True  # three P-384 verifications

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        *,
        max_cert_age: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._roots = list(roots)
        self._max_cert_age = max_cert_age
        self._clock = clock

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        if not self._roots:
            raise EvidenceError(
                "nvidiadpu evidence cannot be verified: no DPU root is configured "
                "(verifier_config.nvidia_dpu_verifier root_ca_cert_path)"
            )
        if expected_report_data is None:
            raise EvidenceError("nvidiadpu evidence can only be verified against report data")
        if len(expected_report_data) > REPORT_DATA_SIZE:
            raise EvidenceError("the report data is longer than the 64 bytes a DPU signs")
        device = _device(unverified_evidence)
        device_id = _certificate(device, "device_id_cert")
        alias = _certificate(device, "alias_cert")
        now = self._clock()
        path = build_path(
            alias,
            [device_id],
            self._roots,
            now=datetime.datetime.fromtimestamp(now, datetime.UTC),
            error=EvidenceError,
            what="the DPU's DICE chain",
        )
        if len(path) < 2 or path[1] != device_id:
            # threat: a DeviceID beside the path would lend its firmware digests unverified
            raise EvidenceError("the DPU's Alias certificate is not issued by its DeviceID")
        issued = int(alias.not_valid_before_utc.timestamp())
        if now < issued or now - issued > self._max_cert_age:
            raise EvidenceError(
                f"the DPU's Alias certificate was issued {int(now - issued)} s ago; at most "
                f"{self._max_cert_age} s are accepted"
            )
        _p384(device_id, "DeviceID")
        signed = expected_report_data + bytes(REPORT_DATA_SIZE - len(expected_report_data))
        _check_signature(_p384(alias, "Alias"), _signature(device), signed)
        fwids = _fwids(device_id)
        claims: dict[str, JsonValue] = {
            "device_serial": format(device_id.serial_number, "x"),
            "device_class": _common_name(device_id),
            "firmware_layers_count": len(fwids),
            "accumulated_fwid": hashlib.sha384(b"".join(fwids)).hexdigest(),
            "alias_timestamp": issued,
            "session_nonce": expected_report_data.hex(),
        }
        return [TeeClaims(Tee.NVIDIA_DPU, TEE_CLASS, claims)]


def _device(unverified: JsonValue) -> Mapping[str, JsonValue]:
    if not isinstance(unverified, dict):
        raise EvidenceError("nvidiadpu evidence must be an object")
    if unverified.get("version") != 1:
        raise EvidenceError("nvidiadpu evidence must be format version 1")
    devices = unverified.get("devices")
    if not isinstance(devices, list) or len(devices) != 1 or not isinstance(devices[0], dict):
        raise EvidenceError("nvidiadpu evidence must carry exactly one device")
    device: Mapping[str, JsonValue] = devices[0]
    if not isinstance(device.get("architecture"), str):
        raise EvidenceError("the DPU evidence names no architecture")
    return device


def _decoded(device: Mapping[str, JsonValue], key: str, limit: int) -> bytes:
    value = device.get(key)
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise EvidenceError(f"the DPU evidence needs a base64 {key} of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"the DPU evidence's {key} is not base64") from None


def _certificate(device: Mapping[str, JsonValue], key: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(_decoded(device, key, MAX_CERT_BYTES))
    except ValueError:
        raise EvidenceError(f"the DPU evidence's {key} is not a DER certificate") from None


def _signature(device: Mapping[str, JsonValue]) -> bytes:
    signature = _decoded(device, "report_data_signature", MAX_SIGNATURE_BYTES)
    if not signature:
        # threat: unsigned evidence would replay any recorded chain
        raise EvidenceError("the DPU evidence's report_data_signature is empty")
    return signature


def _p384(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError(f"the DPU's {what} key is not P-384")
    return key


def _check_signature(key: ec.EllipticCurvePublicKey, signature: bytes, signed: bytes) -> None:
    """Upstream accepts DER or fixed-width r||s (what the attester's p384 crate emits)."""
    if len(signature) == 96:
        signature = encode_dss_signature(
            int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
        )
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise EvidenceError(
            "the DPU's report_data_signature does not verify: the evidence does not bind this "
            "session's runtime data"
        ) from None


def _fwids(device_id: x509.Certificate) -> list[bytes]:
    try:
        extension = device_id.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(TCB_INFO_OID)
        ).value
    except x509.ExtensionNotFound:
        return []
    if not isinstance(extension, x509.UnrecognizedExtension):
        raise EvidenceError("the DPU's DeviceID TcbInfo is not the expected structure")
    return [fwid.digest for fwid in tcb_info_fwids(extension.value, "the DPU's DeviceID TcbInfo")]


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else "unknown"

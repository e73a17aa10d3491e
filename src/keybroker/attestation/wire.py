"""Evidence as the remote AS APIs carry it (gRPC and REST): base64url evidence, raw or
structured runtime data, init-data as TOML or as a digest. Pure conversion, no I/O."""

from __future__ import annotations

import base64
import binascii

from keybroker.attestation.service import EvidenceToVerify
from keybroker.errors import BadRequestError
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.models import InitData, JsonValue, Tee
from keybroker.protocol.untrusted_json import parse_json


def b64url_decode(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{what} is not base64url") from None


def evidence_from_parts(
    *,
    tee: str,
    evidence: str,
    raw_runtime_data: str | None = None,
    structured_runtime_data: JsonValue = None,
    init_data_digest: str | None = None,
    init_data_toml: str | None = None,
    hash_algorithm: str = "",
) -> EvidenceToVerify:
    try:
        parsed_tee = Tee(tee)
    except ValueError:
        raise BadRequestError(f"unknown TEE {tee[:32]!r}") from None
    unverified = parse_json(b64url_decode(evidence, "evidence"), what="evidence")
    try:
        algorithm = HashAlgorithm.parse(hash_algorithm or "sha384")
    except ValueError as e:
        raise BadRequestError(str(e)) from None
    if structured_runtime_data is not None and not isinstance(structured_runtime_data, dict):
        raise BadRequestError("structured runtime data must be a JSON object")
    return EvidenceToVerify(
        tee=parsed_tee,
        unverified_evidence=unverified,
        runtime_data=structured_runtime_data,
        hash_algorithm=algorithm,
        init_data=InitData(format="toml", body=init_data_toml) if init_data_toml else None,
        raw_runtime_data=(
            b64url_decode(raw_runtime_data, "raw runtime data") if raw_runtime_data else None
        ),
        init_data_digest=(
            b64url_decode(init_data_digest, "init-data digest") if init_data_digest else None
        ),
    )

"""RCAR wire models (upstream ``kbs_types``): Request, Challenge, Attestation, the token reply.

These are the shapes guests send and receive, parsed once at the HTTP edge. Field names on the
wire use dashes (``extra-params``, ``tee-pubkey``); the models expose them with underscores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, field_validator
from typing_extensions import TypeAliasType

PROTOCOL_VERSION = "0.4.0"

# Any JSON value, the one alias for the whole package. The containers are read-only (covariant),
# so a caller's ``dict[str, list[str]]`` is a JsonValue; code that reads into one narrows it with
# ``isinstance`` first, because until its parser has checked its shape it is untrusted.
# ``TypeAliasType`` (PEP 695's ``type`` statement, which 3.11 lacks) so pydantic can follow the
# recursion as well as mypy.
JsonValue = TypeAliasType(
    "JsonValue",
    "Mapping[str, JsonValue] | Sequence[JsonValue] | str | int | float | bool | None",
)
# A pydantic field holding JSON that a later parser checks (evidence is TEE-specific and parsed by
# its verifier): typed as JsonValue, but neither validated nor copied per request.
UncheckedJson = Annotated[JsonValue, SkipValidation]


class Tee(StrEnum):
    SAMPLE = "sample"
    SAMPLE_DEVICE = "sampledevice"
    TPM = "tpm"
    TDX = "tdx"
    SNP = "snp"
    SGX = "sgx"
    CCA = "cca"
    CSV = "csv"
    SE = "se"
    NVIDIA = "nvidia"
    HYGON_DCU = "hygondcu"
    AZ_SNP_VTPM = "az-snp-vtpm"
    AZ_TDX_VTPM = "az-tdx-vtpm"
    NVIDIA_DPU = "nvidiadpu"


class _WireModel(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class Request(_WireModel):
    """``POST /kbs/v0/auth`` body."""

    version: str
    tee: Tee
    # Upstream requires it; a missing one is treated as ``{}`` rather than refused, because
    # it only carries optional negotiation hints.
    extra_params: UncheckedJson = Field(default_factory=dict, alias="extra-params")


class Challenge(_WireModel):
    """``/auth`` reply."""

    nonce: str
    extra_params: UncheckedJson = Field(alias="extra-params")


class InitData(_WireModel):
    format: str
    body: str


class RuntimeData(_WireModel):
    nonce: str
    tee_pubkey: dict[str, UncheckedJson] = Field(alias="tee-pubkey")


class CompositeEvidence(_WireModel):
    primary_evidence: UncheckedJson
    additional_evidence: str = ""

    @field_validator("primary_evidence")
    @classmethod
    def _present(cls, value: JsonValue) -> JsonValue:
        if value is None:
            raise ValueError("primary_evidence is required")
        return value


class Attestation(_WireModel):
    """``POST /kbs/v0/attest`` body."""

    init_data: InitData | None = Field(default=None, alias="init-data")
    runtime_data: RuntimeData = Field(alias="runtime-data")
    tee_evidence: CompositeEvidence = Field(alias="tee-evidence")


class AttestationResponse(_WireModel):
    token: str

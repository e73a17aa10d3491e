"""The KBS's client for a remote Attestation Service over gRPC (``type = "coco_as_grpc"``).

Each call has a deadline. gRPC channels reconnect by themselves with exponential backoff, so
an AS that comes back is used again without restarting the KBS; the backoff is capped at one
second (:data:`RECONNECT_OPTIONS`), so that is within a second of its return rather than after
gRPC's default of up to two minutes. An AS that is down or too slow
answers 503 with the address and the reason; an AS that refuses the evidence answers 401.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import grpc

from keybroker.attestation.service import AttestationBackend, EvidenceToVerify
from keybroker.config import GrpcAsConfig
from keybroker.errors import (
    AttestationError,
    BadRequestError,
    ServiceUnavailableError,
    UnsupportedOperationError,
)
from keybroker.grpc_api import RECONNECT_OPTIONS, attestation_pb2, attestation_pb2_grpc
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.models import JsonValue, Tee
from keybroker.rvps.grpc_service import RemoteReferenceValues

log = logging.getLogger(__name__)

_REFUSALS = {
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def to_wire(item: EvidenceToVerify) -> attestation_pb2.IndividualAttestationRequest:
    request = attestation_pb2.IndividualAttestationRequest(
        tee=item.tee.value,
        evidence=_b64url(json.dumps(item.unverified_evidence, separators=(",", ":")).encode()),
        runtime_data_hash_algorithm=item.hash_algorithm.value,
    )
    if item.raw_runtime_data is not None:
        request.raw_runtime_data = _b64url(item.raw_runtime_data)
    elif item.runtime_data is not None:
        request.structured_runtime_data = json.dumps(item.runtime_data, separators=(",", ":"))
    if item.init_data is not None:
        if item.init_data.format != "toml":
            raise BadRequestError("a remote attestation service takes TOML init-data only")
        request.init_data_toml = item.init_data.body
    elif item.init_data_digest is not None:
        request.init_data_digest = _b64url(item.init_data_digest)
    return request


def _tls_credentials(ca_file: Path | None) -> grpc.ChannelCredentials:
    """System trust, or ``ca_cert_path`` (which env ``SSL_CERT_FILE`` fills when unset)."""
    roots = ca_file.read_bytes() if ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


class GrpcAttestationService(AttestationBackend):
    def __init__(self, config: GrpcAsConfig) -> None:
        self._tls = config.as_addr.startswith("https://")
        self._target = config.as_addr.removeprefix("http://").removeprefix("https://")
        self._timeout = config.request_timeout
        self._ca_file = config.ca_cert_path
        self._stub: attestation_pb2_grpc.AttestationServiceStub | None = None
        self._rvps = (
            RemoteReferenceValues(config.rvps_addr, timeout=self._timeout)
            if config.rvps_addr
            else None
        )

    def _client(self) -> attestation_pb2_grpc.AttestationServiceStub:
        # Created on first use, inside the worker's event loop.
        if self._stub is None:
            channel = (
                grpc.aio.secure_channel(
                    self._target, _tls_credentials(self._ca_file), options=RECONNECT_OPTIONS
                )
                if self._tls
                else grpc.aio.insecure_channel(self._target, options=RECONNECT_OPTIONS)
            )
            self._stub = attestation_pb2_grpc.AttestationServiceStub(channel)
        return self._stub

    def supports(self, tee: Tee) -> bool:
        return True  # the remote service decides, and says so at /attest

    def required_hash_algorithm(self, tee: Tee) -> HashAlgorithm | None:
        return HashAlgorithm.SHA512 if tee is Tee.SE else None  # as upstream's gRPC client

    async def challenge(self, tee: Tee, tee_parameters: JsonValue) -> str | None:
        if tee is not Tee.SE:  # upstream asks the AS for SE challenges only
            return None
        request = attestation_pb2.ChallengeRequest(
            inner={"tee": tee.value, "tee_params": json.dumps(tee_parameters)}
        )
        try:
            reply = await self._client().GetAttestationChallenge(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        return str(reply.attestation_challenge)

    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        request = attestation_pb2.AttestationRequest(
            verification_requests=[to_wire(item) for item in evidence], policy_ids=["default"]
        )
        try:
            reply = await self._client().AttestationEvaluate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        return str(reply.attestation_token)

    async def set_policy(self, policy_id: str, source: str) -> None:
        request = attestation_pb2.SetPolicyRequest(
            policy_id=policy_id, policy=_b64url(source.encode())
        )
        try:
            await self._client().SetAttestationPolicy(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            error = self._error(e)
            if isinstance(error, AttestationError):  # a refused policy is the caller's error
                raise BadRequestError(error.detail) from None
            raise error from None

    def _policies_not_readable(self, operation: str) -> str:
        return (
            f"cannot {operation} the policies of the remote attestation service at "
            f"{self._target}: its gRPC API (upstream's attestation.AttestationService) can "
            "only set a policy; manage them where that service stores them"
        )

    async def register_reference_value(self, message: str) -> list[str]:
        return await self._remote_rvps().register(message)

    async def query_reference_value(self, reference_value_id: str) -> JsonValue | None:
        return await self._remote_rvps().query(reference_value_id)

    async def list_reference_values(self) -> list[str]:
        return await self._remote_rvps().names()

    async def delete_reference_value(self, reference_value_id: str) -> bool:
        return await self._remote_rvps().delete(reference_value_id)

    def _remote_rvps(self) -> RemoteReferenceValues:
        if self._rvps is None:
            raise UnsupportedOperationError(
                "set [attestation_service] rvps_addr to manage the remote AS's reference values "
                "through the KBS, or use rvps-tool"
            )
        return self._rvps

    def _error(self, error: grpc.aio.AioRpcError) -> Exception:
        detail = error.details() or error.code().name
        if error.code() in _REFUSALS:
            return AttestationError(f"the attestation service refused: {detail}")
        log.error("attestation service %s: %s %s", self._target, error.code().name, detail)
        return ServiceUnavailableError(
            f"the attestation service at {self._target} is unavailable "
            f"({error.code().name.lower()}): retry later"
        )

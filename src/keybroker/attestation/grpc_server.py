"""The Attestation Service over gRPC (``attestation.AttestationService``), as ``grpc-as`` serves it.

Wire-compatible with upstream's grpc-as: evidence, raw runtime data and init-data digests are
base64url without padding; structured runtime data is JSON text; an empty hash algorithm means
sha384; an empty policy list means ``default``; policies are base64url Rego. Failures of the
attestation itself answer ``ABORTED`` (upstream's code), malformed requests ``INVALID_ARGUMENT``,
and the detail names the problem without echoing evidence.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from keybroker.attestation.service import (
    BuiltinAttestationService,
    EvidenceToVerify,
    supplemental_challenge,
)
from keybroker.attestation.wire import b64url_decode, evidence_from_parts
from keybroker.errors import AttestationError, BadRequestError, KeybrokerError
from keybroker.grpc_api import attestation_pb2, attestation_pb2_grpc
from keybroker.protocol.untrusted_json import parse_json

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def evidence_from_wire(request: attestation_pb2.IndividualAttestationRequest) -> EvidenceToVerify:
    structured = None
    if request.WhichOneof("runtime_data") == "structured_runtime_data":
        structured = parse_json(request.structured_runtime_data, what="structured_runtime_data")
    return evidence_from_parts(
        tee=request.tee,
        evidence=request.evidence,
        raw_runtime_data=request.raw_runtime_data or None,
        structured_runtime_data=structured,
        init_data_digest=request.init_data_digest or None,
        init_data_toml=request.init_data_toml or None,
        hash_algorithm=request.runtime_data_hash_algorithm,
    )


class AttestationServicer(attestation_pb2_grpc.AttestationServiceServicer):  # type: ignore[misc]
    def __init__(self, service: BuiltinAttestationService) -> None:
        self._service = service

    async def AttestationEvaluate(  # noqa: N802 - the gRPC method name
        self, request: attestation_pb2.AttestationRequest, context: Any
    ) -> attestation_pb2.AttestationResponse:
        try:
            evidence = [evidence_from_wire(item) for item in request.verification_requests]
            token = await self._service.evaluate(evidence, list(request.policy_ids) or ["default"])
        except KeybrokerError as e:
            await _abort(context, e)
        return attestation_pb2.AttestationResponse(attestation_token=token)

    async def SetAttestationPolicy(  # noqa: N802
        self, request: attestation_pb2.SetPolicyRequest, context: Any
    ) -> attestation_pb2.SetPolicyResponse:
        try:
            source = b64url_decode(request.policy, "policy").decode("utf-8")
            await self._service.set_policy(request.policy_id, source)
        except UnicodeDecodeError:
            await _abort(context, BadRequestError("the policy is not UTF-8 text"))
        except KeybrokerError as e:
            await _abort(context, e)
        return attestation_pb2.SetPolicyResponse()

    async def GetAttestationChallenge(  # noqa: N802
        self, request: attestation_pb2.ChallengeRequest, context: Any
    ) -> attestation_pb2.ChallengeResponse:
        try:
            nonce = await supplemental_challenge(self._service, dict(request.inner))
        except KeybrokerError as e:
            await _abort(context, e)
        return attestation_pb2.ChallengeResponse(attestation_challenge=nonce)


async def _abort(context: Any, error: KeybrokerError) -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, AttestationError):
        code = grpc.StatusCode.ABORTED
    elif error.status >= 500:
        code = grpc.StatusCode.INTERNAL
    log.warning("gRPC request refused: %s", error.detail)
    await context.abort(code, error.detail)


def build_server(
    service: BuiltinAttestationService,
    address: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
) -> grpc.aio.Server:
    """``tls``: (certificate chain PEM, private key PEM) to serve gRPC over TLS."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.aio.server(options=options)
    attestation_pb2_grpc.add_AttestationServiceServicer_to_server(
        AttestationServicer(service), server
    )
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return server

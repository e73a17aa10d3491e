"""The RVPS over gRPC (``reference.ReferenceValueProviderService``): server and client.

The client is what an Attestation Service uses with ``rvps_config = { type = "GrpcRemote" }``.
Each call has a deadline; an RVPS that is down makes attestation fail closed (503) with its
address named, never a guest appraised without its reference values.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc

from keybroker.errors import (
    AttestationError,
    BadRequestError,
    KeybrokerError,
    ServiceUnavailableError,
    UnsupportedOperationError,
)
from keybroker.grpc_api import RECONNECT_OPTIONS, reference_pb2, reference_pb2_grpc
from keybroker.protocol.models import JsonValue
from keybroker.rvps.store import ReferenceValueStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


class ReferenceValueServicer(reference_pb2_grpc.ReferenceValueProviderServiceServicer):  # type: ignore[misc]
    def __init__(self, store: ReferenceValueStore) -> None:
        self._store = store

    async def QueryReferenceValue(  # noqa: N802 - the gRPC method name
        self, request: reference_pb2.ReferenceValueQueryRequest, context: Any
    ) -> reference_pb2.ReferenceValueQueryResponse:
        try:
            value = await self._store.query(request.reference_value_id)
        except KeybrokerError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.detail)
        if value is None:
            return reference_pb2.ReferenceValueQueryResponse()
        return reference_pb2.ReferenceValueQueryResponse(reference_value_results=json.dumps(value))

    async def RegisterReferenceValue(  # noqa: N802
        self, request: reference_pb2.ReferenceValueRegisterRequest, context: Any
    ) -> reference_pb2.ReferenceValueRegisterResponse:
        try:
            names = await self._store.register(request.message)
        except KeybrokerError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.detail)
        log.info("registered reference values %s", ", ".join(names))
        return reference_pb2.ReferenceValueRegisterResponse()


def build_server(store: ReferenceValueStore, address: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    reference_pb2_grpc.add_ReferenceValueProviderServiceServicer_to_server(
        ReferenceValueServicer(store), server
    )
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server


class RemoteReferenceValues:
    """The reference-value interface of :class:`ReferenceValueStore`, served by a remote RVPS."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._target = address.removeprefix("http://")
        self._timeout = timeout
        self._stub: reference_pb2_grpc.ReferenceValueProviderServiceStub | None = None

    def _client(self) -> reference_pb2_grpc.ReferenceValueProviderServiceStub:
        if self._stub is None:  # created inside the running event loop
            channel = grpc.aio.insecure_channel(self._target, options=RECONNECT_OPTIONS)
            self._stub = reference_pb2_grpc.ReferenceValueProviderServiceStub(channel)
        return self._stub

    async def register(self, message: str) -> list[str]:
        """Register at the remote RVPS. Its API does not say which names it stored, so the
        list returned is empty."""
        request = reference_pb2.ReferenceValueRegisterRequest(message=message)
        try:
            await self._client().RegisterReferenceValue(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, BadRequestError) from None
        return []

    async def query(self, reference_value_id: str) -> JsonValue | None:
        request = reference_pb2.ReferenceValueQueryRequest(reference_value_id=reference_value_id)
        try:
            reply = await self._client().QueryReferenceValue(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, AttestationError) from None
        if not reply.HasField("reference_value_results"):
            return None
        value: JsonValue = json.loads(reply.reference_value_results)
        return value

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]:
        found: dict[str, JsonValue] = {}
        for reference_value_id in ids:
            value = await self.query(reference_value_id)
            if value is not None:
                found[reference_value_id] = value
        return found

    async def all_ids(self) -> list[str]:
        raise AttestationError(
            "a remote RVPS cannot list its reference values: name the ids literally in "
            'the policy (query_reference_value("..."))'
        )

    async def names(self) -> list[str]:
        raise UnsupportedOperationError(self._not_in_upstream_api("list"))

    async def delete(self, reference_value_id: str) -> bool:
        raise UnsupportedOperationError(self._not_in_upstream_api("delete"))

    def _not_in_upstream_api(self, operation: str) -> str:
        return (
            f"cannot {operation} the reference values of the remote RVPS at {self._target}: "
            "its gRPC API (upstream's reference.ReferenceValueProviderService) has only query "
            "and register; manage them where that RVPS stores them"
        )

    def _error(self, error: grpc.aio.AioRpcError, refusal: type[KeybrokerError]) -> KeybrokerError:
        detail = error.details() or error.code().name
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return refusal(f"the RVPS refused: {detail}")
        log.error("RVPS %s: %s %s", self._target, error.code().name, detail)
        return ServiceUnavailableError(
            f"the RVPS at {self._target} is unavailable ({error.code().name.lower()}): "
            "attestation cannot use reference values, so it fails closed"
        )

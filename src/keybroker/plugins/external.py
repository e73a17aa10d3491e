"""Upstream's ``external`` plugin: requests to ``/kbs/v0/external/<backend>/...`` are forwarded
over gRPC (service ``kbs.plugin.v1.KbsPlugin``, ``grpc_api/plugin.proto``) to a plugin process.

The first path segment names the backend; the rest is forwarded. Before anything else the KBS
asks the plugin ``ValidateAuth`` (admin authorization or the guest path), and on the guest path
``NeedsEncryption`` (whether ``Handle``'s answer is sealed to the TEE key). Every call has a
deadline; a plugin that is down, slow or faulty answers 503, an answer over
:data:`MAX_ANSWER_BYTES` is refused (503), and a plugin's non-2xx ``status_code`` answers 401, as
upstream does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from keybroker.config import ExternalBackendConfig, ExternalPluginConfig
from keybroker.errors import (
    ConfigError,
    PluginNotFoundError,
    ServiceUnavailableError,
    UnauthenticatedError,
)
from keybroker.grpc_api import RECONNECT_OPTIONS, plugin_pb2, plugin_pb2_grpc
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse

log = logging.getLogger(__name__)

# Largest gRPC message accepted from a plugin (the whole Handle answer, framing included).
MAX_ANSWER_BYTES = 1024 * 1024
# Deadline for each call when the backend sets no ``timeout_ms`` (upstream then waits forever).
DEFAULT_TIMEOUT_MS = 10_000

_Reply = TypeVar("_Reply")


def _read(path: Path, what: str, backend: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"external plugin backend {backend}: cannot read {what}: {e}") from None


class _Backend:
    """One plugin process: its channel (made on first use, inside the serving event loop)."""

    def __init__(self, config: ExternalBackendConfig) -> None:
        self.name = config.name
        self._target = config.endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
        self._timeout = (config.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        self._credentials: grpc.ChannelCredentials | None = None
        if config.ca_cert_path is not None:
            roots = _read(config.ca_cert_path, "ca_cert_path", self.name)
            chain = key = None
            if config.client_cert_path is not None and config.client_key_path is not None:
                chain = _read(config.client_cert_path, "client_cert_path", self.name)
                key = _read(config.client_key_path, "client_key_path", self.name)
            self._credentials = grpc.ssl_channel_credentials(roots, key, chain)
        else:
            log.warning(
                "external plugin backend %s is plaintext gRPC (%s): for development only",
                self.name,
                config.endpoint,
            )
        self._stub: plugin_pb2_grpc.KbsPluginStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> plugin_pb2_grpc.KbsPluginStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            options = [
                *RECONNECT_OPTIONS,
                ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            ]
            channel = (
                grpc.aio.secure_channel(self._target, self._credentials, options=options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(self._target, options=options)
            )
            self._stub, self._loop = plugin_pb2_grpc.KbsPluginStub(channel), loop
        return self._stub

    async def call(self, rpc: Callable[..., Awaitable[_Reply]], message: object) -> _Reply:
        try:
            return await rpc(message, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    def _error(self, error: grpc.aio.AioRpcError) -> ServiceUnavailableError:
        code = error.code()
        log.warning("external plugin %s: gRPC %s", self.name, code.name)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {self._timeout:g} s"
        elif code is grpc.StatusCode.UNAVAILABLE:
            reason = "unreachable"
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            reason = f"answer larger than {MAX_ANSWER_BYTES} bytes refused"
        else:
            reason = f"failed (gRPC {code.name})"
        return ServiceUnavailableError(f"external plugin {self.name}: {reason}")

    async def validate_auth(self, request: PluginRequest, path: tuple[str, ...]) -> bool:
        message = plugin_pb2.ValidateAuthRequest(
            body=request.body, query=request.query, path=path, method=request.method
        )
        reply = await self.call(self._client().ValidateAuth, message)
        return bool(reply.requires_admin_auth)

    async def needs_encryption(self, request: PluginRequest, path: tuple[str, ...]) -> bool:
        message = plugin_pb2.NeedsEncryptionRequest(
            body=request.body, query=request.query, path=path, method=request.method
        )
        reply = await self.call(self._client().NeedsEncryption, message)
        return bool(reply.requires_payload_encryption)

    async def handle(self, request: PluginRequest, path: tuple[str, ...]) -> bytes:
        message = plugin_pb2.PluginRequest(
            body=request.body, query=request.query, path=path, method=request.method
        )
        reply = await self.call(self._client().Handle, message)
        status = int(reply.status_code)
        if status != 0 and not 200 <= status <= 299:
            # upstream answers 401 for a plugin's refusal; its body is not echoed (may be private)
            raise UnauthenticatedError(f"external plugin {self.name} refused: status {status}")
        return bytes(reply.body)


class ExternalPlugin(Plugin):
    name = "external"

    def __init__(self, config: ExternalPluginConfig) -> None:
        self._backends = {entry.name: _Backend(entry) for entry in config.backends}

    def _route(self, request: PluginRequest) -> tuple[_Backend, tuple[str, ...]]:
        if not request.path:
            raise PluginNotFoundError("external plugin: the backend name is missing")
        backend = self._backends.get(request.path[0])
        if backend is None:
            raise PluginNotFoundError(f"external plugin {request.path[0][:64]} not registered")
        return backend, request.path[1:]

    def check(self, request: PluginRequest) -> None:
        self._route(request)  # an unknown backend answers 404 before any gRPC call

    # The plugin process decides both; these synchronous answers are the fail-closed defaults
    # for a caller that cannot ask it (admin required, answer sealed).
    def requires_admin(self, request: PluginRequest) -> bool:
        return True

    def needs_encryption(self, request: PluginRequest) -> bool:
        return True

    async def ask_requires_admin(self, request: PluginRequest) -> bool:
        backend, path = self._route(request)
        return await backend.validate_auth(request, path)

    async def ask_needs_encryption(self, request: PluginRequest) -> bool:
        backend, path = self._route(request)
        return await backend.needs_encryption(request, path)

    async def handle(self, request: PluginRequest) -> PluginResponse:
        backend, path = self._route(request)
        return PluginResponse(await backend.handle(request, path))

"""The ``resource`` plugin: confidential resources at ``repository/type/tag``.

``GET`` releases a resource to an attested guest (policy-checked, JWE-encrypted by the KBS);
``POST``/``PUT`` store one and ``DELETE`` removes one (admin only). Bytes come from and go to a
:class:`~keybroker.storage.secrets.SecretBackend`.
"""

from __future__ import annotations

from collections.abc import Callable

from keybroker.errors import KeybrokerError, MethodNotAllowedError
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.secrets import SecretBackend

_READ = frozenset({"GET"})
_WRITE = frozenset({"POST", "PUT", "DELETE"})

# Told of every operation: ("read" | "write" | "delete", the path, or None when it failed).
ResourceObserver = Callable[[str, ResourcePath | None], None]
_OPERATIONS = {"GET": "read", "POST": "write", "PUT": "write", "DELETE": "delete"}


def _ignore(_operation: str, _path: ResourcePath | None) -> None:
    pass


class ResourcePlugin(Plugin):
    name = "resource"

    def __init__(self, backend: SecretBackend, observe: ResourceObserver = _ignore) -> None:
        self._backend = backend
        self._observe = observe

    def check(self, request: PluginRequest) -> None:
        ResourcePath.from_segments(request.path)  # traversal and shape, before any policy

    def repository_path(self, request: PluginRequest) -> ResourcePath:
        return ResourcePath.from_segments(request.path)

    def requires_admin(self, request: PluginRequest) -> bool:
        return request.method in _WRITE

    def needs_encryption(self, request: PluginRequest) -> bool:
        return request.method in _READ

    async def handle(self, request: PluginRequest) -> PluginResponse:
        path = ResourcePath.from_segments(request.path)
        operation = _OPERATIONS.get(request.method)
        if operation is None:
            raise MethodNotAllowedError(f"the resource plugin does not answer {request.method}")
        try:
            response = await self._operate(request, path)
        except KeybrokerError:
            self._observe(operation, None)  # a path that failed never becomes a label
            raise
        self._observe(operation, path)
        return response

    async def _operate(self, request: PluginRequest, path: ResourcePath) -> PluginResponse:
        if request.method == "GET":
            return PluginResponse(await self._backend.read(path))
        if request.method in ("POST", "PUT"):
            await self._backend.write(path, request.body)
            return PluginResponse(b"", content_type="text/plain")
        if request.method == "DELETE":
            await self._backend.delete(path)
            return PluginResponse(b"", content_type="text/plain")
        raise MethodNotAllowedError(
            f"the resource plugin does not answer {request.method}",
            allow=tuple(sorted(_READ | _WRITE)),
        )

"""The ``resource`` plugin: confidential resources at ``repository/type/tag``.

``GET`` releases a resource to an attested guest (policy-checked, JWE-encrypted by the KBS):
the current version, or the one ``?version=N`` names. ``POST``/``PUT`` store a new version and
``DELETE`` soft-deletes the current one (or ``?version=N``) (admin only). Bytes come from and go
to a :class:`~keybroker.storage.secrets.SecretBackend`.

For a guest's read the version is resolved before the resource policy runs
(:meth:`prepare_release`), so the policy sees the number it is deciding about and the bytes
released are exactly that version's, even if a writer makes a newer one meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from keybroker.errors import KeybrokerError, MethodNotAllowedError, ResourceNotFoundError
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.secrets import SecretBackend
from keybroker.storage.versions import parse_version

_READ = frozenset({"GET"})
_WRITE = frozenset({"POST", "PUT", "DELETE"})
VERSION_HEADER = "Keybroker-Resource-Version"

# Told of every operation: ("read" | "write" | "delete", the path, or None when it failed).
ResourceObserver = Callable[[str, ResourcePath | None], None]
_OPERATIONS = {"GET": "read", "POST": "write", "PUT": "write", "DELETE": "delete"}


def _ignore(_operation: str, _path: ResourcePath | None) -> None:
    pass


def requested_version(request: PluginRequest) -> int | None:
    """The ``?version=`` of a request, checked (400 unless 1 to 2^31-1 in plain digits)."""
    text = request.query.get("version")
    return None if text is None else parse_version(text)


class ResourcePlugin(Plugin):
    name = "resource"

    def __init__(self, backend: SecretBackend, observe: ResourceObserver = _ignore) -> None:
        self._backend = backend
        self._observe = observe

    @property
    def backend(self) -> SecretBackend:
        return self._backend

    def check(self, request: PluginRequest) -> None:
        ResourcePath.from_segments(request.path)  # traversal and shape, before any policy
        requested_version(request)  # a malformed ?version= is a 400 before any token work

    def repository_path(self, request: PluginRequest) -> ResourcePath:
        return ResourcePath.from_segments(request.path)

    def requires_admin(self, request: PluginRequest) -> bool:
        return request.method in _WRITE

    def needs_encryption(self, request: PluginRequest) -> bool:
        return request.method in _READ

    async def prepare_release(self, request: PluginRequest) -> PluginRequest:
        if request.method not in _READ:
            return request
        path = ResourcePath.from_segments(request.path)
        resolved = await self._backend.resolve(path, requested_version(request))
        return replace(request, resolved_version=resolved)

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
            version = request.resolved_version
            if version is None and self._backend.versioned:
                # none live (or not prepared by the caller): look once more, never read blind
                version = await self._backend.resolve(path, requested_version(request))
                if version is None:
                    raise ResourceNotFoundError(f"resource not found: {path}")
            return PluginResponse(await self._backend.read(path, version))
        if request.method in ("POST", "PUT"):
            number = await self._backend.write(path, request.body)
            headers = () if number is None else ((VERSION_HEADER, str(number)),)
            return PluginResponse(b"", content_type="text/plain", headers=headers)
        if request.method == "DELETE":
            await self._backend.delete(path, requested_version(request))
            return PluginResponse(b"", content_type="text/plain")
        raise MethodNotAllowedError(
            f"the resource plugin does not answer {request.method}",
            allow=tuple(sorted(_READ | _WRITE)),
        )

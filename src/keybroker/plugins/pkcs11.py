"""Upstream's ``pkcs11`` plugin: ``/kbs/v0/pkcs11/resource/<repo>/<type>/<tag>``.

The same semantics as the ``resource`` plugin (guests read after attestation and policy, admins
write), over the PKCS#11 secret backend. Upstream's ``wrap-key`` endpoint is not served: it
answers 404 like any unknown path.
"""

from __future__ import annotations

from dataclasses import replace

from keybroker.errors import NotFoundError
from keybroker.plugins.base import PluginRequest, PluginResponse
from keybroker.plugins.resource import ResourcePlugin
from keybroker.protocol.resource_path import ResourcePath


class Pkcs11Plugin(ResourcePlugin):
    name = "pkcs11"

    def check(self, request: PluginRequest) -> None:
        super().check(_inner(request))

    def repository_path(self, request: PluginRequest) -> ResourcePath:
        return super().repository_path(_inner(request))

    async def handle(self, request: PluginRequest) -> PluginResponse:
        return await super().handle(_inner(request))


def _inner(request: PluginRequest) -> PluginRequest:
    if not request.path or request.path[0] != "resource":
        raise NotFoundError(
            "the pkcs11 plugin serves /kbs/v0/pkcs11/resource/<repository>/<type>/<tag> only"
        )
    return replace(request, path=request.path[1:])

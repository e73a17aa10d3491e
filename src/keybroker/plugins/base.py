"""The plugin interface: what answers ``/kbs/v0/<plugin>/<path...>``.

The KBS asks a plugin three things about a request: does it need admin authorization
(``requires_admin``), must its response be encrypted to the guest's TEE key
(``needs_encryption``), and what is the response (``handle``). Guest requests are admitted by
the resource policy before ``handle`` runs; admin requests by the admin guard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.versions import Version


@dataclass(frozen=True)
class PluginRequest:
    method: str
    path: tuple[str, ...]
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # init-data claims from the guest's token, for plugins that tailor their answer to them
    init_data_claims: JsonValue = None
    # the version a guest's read will release, found before the resource policy runs (the
    # policy sees its number as data "version"); None where the plugin keeps no versions
    resolved_version: Version | None = None


@dataclass(frozen=True)
class PluginResponse:
    body: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


class Plugin(ABC):
    name: ClassVar[str]

    def methods(self, request: PluginRequest) -> tuple[str, ...]:
        """The HTTP methods this plugin answers at the request's path (others answer 405)."""
        return ("DELETE", "GET", "POST", "PUT")

    def check(self, request: PluginRequest) -> None:  # noqa: B027 - optional hook
        """Reject a malformed request before any authorization work (default: accept)."""

    def repository_path(self, request: PluginRequest) -> ResourcePath | None:
        """The ``repository/type/tag`` the request names, when this plugin's paths are
        repository paths: tenant resource policies are matched against it. None (the default):
        the global resource policy decides, whatever the path says."""
        return None

    @abstractmethod
    def requires_admin(self, request: PluginRequest) -> bool: ...

    @abstractmethod
    def needs_encryption(self, request: PluginRequest) -> bool: ...

    async def ask_requires_admin(self, request: PluginRequest) -> bool:
        """What the KBS calls: ``requires_admin``, unless the answer needs I/O (``external``)."""
        return self.requires_admin(request)

    async def ask_needs_encryption(self, request: PluginRequest) -> bool:
        """What the KBS calls: ``needs_encryption``, unless the answer needs I/O."""
        return self.needs_encryption(request)

    async def prepare_release(self, request: PluginRequest) -> PluginRequest:
        """Before the resource policy judges a guest's request: ``request`` with what the
        policy must see filled in (``resolved_version``). Default: unchanged."""
        return request

    @abstractmethod
    async def handle(self, request: PluginRequest) -> PluginResponse: ...

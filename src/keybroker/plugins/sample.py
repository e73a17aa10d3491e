"""The ``sample`` plugin (upstream's example): a fixed answer, behind admin authorization."""

from __future__ import annotations

from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse


class SamplePlugin(Plugin):
    name = "sample"

    def __init__(self, item: str) -> None:
        self._item = item

    def requires_admin(self, request: PluginRequest) -> bool:
        return True

    def needs_encryption(self, request: PluginRequest) -> bool:
        return False

    async def handle(self, request: PluginRequest) -> PluginResponse:
        return PluginResponse(b"sample plugin response", content_type="text/plain")

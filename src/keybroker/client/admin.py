"""The operator side: resources and resource policies through the KBS admin API."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from keybroker.client.http import make_http, send
from keybroker.protocol.resource_path import ResourcePath

API = "/kbs/v0"


class AdminClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        http: httpx.Client | None = None,
        cert_file: Path | None = None,
    ) -> None:
        self._http = http if http is not None else make_http(url, cert_file)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def close(self) -> None:
        self._http.close()

    def set_resource(self, path: ResourcePath | str, data: bytes) -> None:
        send(
            self._http,
            "POST",
            f"{API}/resource/{_path(path)}",
            content=data,
            headers={**self._headers, "Content-Type": "application/octet-stream"},
        )

    def delete_resource(self, path: ResourcePath | str) -> None:
        send(self._http, "DELETE", f"{API}/resource/{_path(path)}", headers=self._headers)

    def set_resource_policy(self, rego: str) -> None:
        encoded = base64.urlsafe_b64encode(rego.encode()).rstrip(b"=").decode()
        send(
            self._http,
            "POST",
            f"{API}/resource-policy",
            json={"policy": encoded},
            headers=self._headers,
        )

    def list_resource_policies(self) -> list[str]:
        listed = send(self._http, "GET", f"{API}/resource-policy", headers=self._headers).json()
        return [str(item) for item in listed] if isinstance(listed, list) else []


def _path(path: ResourcePath | str) -> ResourcePath:
    return path if isinstance(path, ResourcePath) else ResourcePath.parse(path)

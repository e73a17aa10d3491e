"""The operator side: resources and resource policies through the KBS admin API."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx

from keybroker.client.http import make_http, send
from keybroker.protocol.models import JsonValue
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
        encoded = _b64url(rego)
        send(
            self._http,
            "POST",
            f"{API}/resource-policy",
            json={"policy": encoded},
            headers=self._headers,
        )

    def set_attestation_policy(
        self, rego: str, *, policy_id: str = "default_cpu", policy_type: str = "rego"
    ) -> None:
        body = {"type": policy_type, "policy_id": policy_id, "policy": _b64url(rego)}
        send(self._http, "POST", f"{API}/attestation-policy", json=body, headers=self._headers)

    def register_reference_value(self, message: dict[str, JsonValue]) -> list[str]:
        reply = send(
            self._http,
            "POST",
            f"{API}/reference-value",
            content=json.dumps(message).encode(),
            headers={**self._headers, "Content-Type": "application/json"},
        ).json()
        return [str(name) for name in reply.get("registered", [])]

    def set_sample_reference_value(self, name: str, value: JsonValue) -> list[str]:
        """Register ``{name: value}`` through the ``sample`` extractor."""
        payload = base64.b64encode(json.dumps({name: value}).encode()).decode()
        return self.register_reference_value(
            {"version": "0.1.0", "type": "sample", "payload": payload}
        )

    def get_reference_value(self, reference_value_id: str) -> JsonValue:
        path = f"{API}/reference-value/{reference_value_id}"
        return send(self._http, "GET", path, headers=self._headers).json()

    def explain_policy(self, request: dict[str, JsonValue]) -> dict[str, JsonValue]:
        """Evaluate a resource or attestation policy and get every rule's value (see
        docs/policy-explain.md)."""
        reply = send(
            self._http, "POST", f"{API}/policy-explain", json=request, headers=self._headers
        ).json()
        return reply if isinstance(reply, dict) else {}

    def list_resource_policies(self) -> list[str]:
        listed = send(self._http, "GET", f"{API}/resource-policy", headers=self._headers).json()
        return [str(item) for item in listed] if isinstance(listed, list) else []


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _path(path: ResourcePath | str) -> ResourcePath:
    return path if isinstance(path, ResourcePath) else ResourcePath.parse(path)

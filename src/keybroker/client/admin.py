"""The operator side: resources, policies, reference values and the audit log through the KBS
admin API."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import httpx

from keybroker.client.http import make_http, send
from keybroker.errors import ClientError
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath

API = "/kbs/v0"
VERSION_HEADER = "Keybroker-Resource-Version"  # keybroker.plugins.resource names it too


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

    def set_resource(self, path: ResourcePath | str, data: bytes) -> int | None:
        """Store a resource; the version it became (None if the backend keeps none)."""
        response = send(
            self._http,
            "POST",
            f"{API}/resource/{_path(path)}",
            content=data,
            headers={**self._headers, "Content-Type": "application/octet-stream"},
        )
        version = response.headers.get(VERSION_HEADER, "")
        return int(version) if version.isdigit() else None

    def delete_resource(self, path: ResourcePath | str, *, version: int | None = None) -> None:
        """Delete a resource (versioned backends: soft-delete its current version or
        ``version``)."""
        query = "" if version is None else f"?version={int(version)}"
        send(self._http, "DELETE", f"{API}/resource/{_path(path)}{query}", headers=self._headers)

    def list_resources(
        self, prefix: str = "", *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, JsonValue]:
        """One page of resources under ``prefix`` (``repo`` or ``repo/type``), with its
        ``next_cursor``. The prefix goes in the path, where admin ACLs can match it."""
        segments = [s for s in prefix.strip("/").split("/") if s]
        target = "/".join([f"{API}/resources", *[quote(s, safe="") for s in segments]])
        params: dict[str, str] = {}
        if limit is not None:
            params["limit"] = str(limit)
        if cursor is not None:
            params["cursor"] = cursor
        reply = send(self._http, "GET", target, params=params, headers=self._headers).json()
        return reply if isinstance(reply, dict) else {}

    def list_all_resources(self, prefix: str = "", *, max_pages: int = 1000) -> list[JsonValue]:
        """Every resource under ``prefix``, following the cursors (at most ``max_pages``)."""
        found: list[JsonValue] = []
        cursor: str | None = None
        for _ in range(max_pages):
            page = self.list_resources(prefix, cursor=cursor)
            listed = page.get("resources")
            found.extend(listed if isinstance(listed, list) else [])
            next_cursor = page.get("next_cursor")
            if not isinstance(next_cursor, str):
                return found
            cursor = next_cursor
        raise ClientError(f"the listing did not end within {max_pages} pages")

    def resource_meta(self, path: ResourcePath | str) -> dict[str, JsonValue]:
        """A resource's versions and times (never its value)."""
        target = f"{API}/resource-meta/{_path(path)}"
        reply = send(self._http, "GET", target, headers=self._headers).json()
        return reply if isinstance(reply, dict) else {}

    def rollback_resource(self, path: ResourcePath | str, version: int) -> int:
        """Make ``version`` current again (as a new version); the new version's number."""
        return self._version_action(path, "rollback", version) or 0

    def undelete_resource(self, path: ResourcePath | str, version: int) -> None:
        self._version_action(path, "undelete", version)

    def purge_resource(self, path: ResourcePath | str, version: int | None = None) -> None:
        """Destroy ``version`` for good, or the whole resource with every version."""
        self._version_action(path, "purge", version)

    def _version_action(
        self, path: ResourcePath | str, action: str, version: int | None
    ) -> int | None:
        body: dict[str, JsonValue] = {} if version is None else {"version": int(version)}
        target = f"{API}/resource-meta/{_path(path)}/{action}"
        reply = send(self._http, "POST", target, json=body, headers=self._headers).json()
        answer = reply.get("version") if isinstance(reply, dict) else None
        return answer if isinstance(answer, int) else None

    def set_resource_policy(self, rego: str, *, prefix: str | None = None) -> None:
        """The global policy (upstream's call), or the tenant policy of ``prefix``
        (``repository`` or ``repository/type``)."""
        encoded = _b64url(rego)
        send(
            self._http,
            "POST",
            _resource_policy_path(prefix),
            json={"policy": encoded},
            headers=self._headers,
        )

    def get_resource_policy(self, prefix: str | None = None) -> str:
        """The Rego text of the global policy, or of the tenant policy of ``prefix``."""
        path = _resource_policy_path(prefix or "resource-policy")
        return _policy_of(send(self._http, "GET", path, headers=self._headers).json())

    def delete_resource_policy(self, prefix: str) -> None:
        send(self._http, "DELETE", _resource_policy_path(prefix), headers=self._headers)

    def set_attestation_policy(
        self, rego: str, *, policy_id: str = "default_cpu", policy_type: str = "rego"
    ) -> None:
        body = {"type": policy_type, "policy_id": policy_id, "policy": _b64url(rego)}
        send(self._http, "POST", f"{API}/attestation-policy", json=body, headers=self._headers)

    def list_attestation_policies(self) -> list[str]:
        return _names(send(self._http, "GET", f"{API}/attestation-policy", headers=self._headers))

    def get_attestation_policy(self, policy_id: str) -> str:
        path = f"{API}/attestation-policy/{_segment(policy_id)}"
        return _policy_of(send(self._http, "GET", path, headers=self._headers).json())

    def delete_attestation_policy(self, policy_id: str) -> bool:
        """Remove a policy; True when the shipped default of that id took its place."""
        path = f"{API}/attestation-policy/{_segment(policy_id)}"
        reply = send(self._http, "DELETE", path, headers=self._headers).json()
        return isinstance(reply, dict) and reply.get("restored_default") is True

    def list_reference_values(self) -> list[str]:
        return _names(send(self._http, "GET", f"{API}/reference-value", headers=self._headers))

    def delete_reference_value(self, reference_value_id: str) -> None:
        path = f"{API}/reference-value/{_segments(reference_value_id)}"
        send(self._http, "DELETE", path, headers=self._headers)

    def register_reference_value(self, message: Mapping[str, JsonValue]) -> list[str]:
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
        value: JsonValue = send(self._http, "GET", path, headers=self._headers).json()
        return value

    def explain_policy(self, request: dict[str, JsonValue]) -> dict[str, JsonValue]:
        """Evaluate a resource or attestation policy and get every rule's value (see
        docs/policy-explain.md)."""
        reply = send(
            self._http, "POST", f"{API}/policy-explain", json=request, headers=self._headers
        ).json()
        return reply if isinstance(reply, dict) else {}

    def list_resource_policies(self) -> list[str]:
        return _names(send(self._http, "GET", f"{API}/resource-policy", headers=self._headers))

    def audit_log(self, **query: str | int | None) -> dict[str, JsonValue]:
        """A page of audit records, newest first, and the chain's status (``GET /audit-log``:
        ``action``, ``decision``, ``target``, ``since``, ``limit``, ``cursor``, ``verify``)."""
        return self._get_object(f"{API}/audit-log", query)

    def recent_attestations(self, **query: str | int | None) -> dict[str, JsonValue]:
        """Recent attestations from the audit log, counted by TEE and status."""
        return self._get_object(f"{API}/audit-log/attestations", query)

    def _get_object(self, path: str, query: dict[str, str | int | None]) -> dict[str, JsonValue]:
        params = {name: str(value) for name, value in query.items() if value is not None}
        reply = send(self._http, "GET", path, params=params, headers=self._headers).json()
        return reply if isinstance(reply, dict) else {}


def _names(reply: httpx.Response) -> list[str]:
    listed = reply.json()
    return [str(item) for item in listed] if isinstance(listed, list) else []


def _policy_of(reply: JsonValue) -> str:
    """The Rego text of a policy read back (``{"policy": "<base64url>"}``)."""
    encoded = reply.get("policy") if isinstance(reply, dict) else None
    if not isinstance(encoded, str):
        raise ClientError('the KBS answered a policy without a string "policy"')
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ClientError("the KBS answered a policy that is not base64url UTF-8") from None


def _resource_policy_path(prefix: str | None) -> str:
    return f"{API}/resource-policy" + (f"/{_segments(prefix)}" if prefix is not None else "")


def _segments(name: str) -> str:
    return "/".join(_segment(segment) for segment in name.strip("/").split("/"))


def _segment(segment: str) -> str:
    """One path segment, percent-encoded; ``.`` and ``..`` are refused here, because an HTTP
    client may resolve them into another path before the KBS could refuse them."""
    if segment in ("", ".", ".."):
        raise ClientError(f"{segment!r} cannot be a segment of a policy or reference value name")
    return quote(segment, safe="")


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _path(path: ResourcePath | str) -> ResourcePath:
    return path if isinstance(path, ResourcePath) else ResourcePath.parse(path)

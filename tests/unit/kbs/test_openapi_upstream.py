"""Keybroker answers what upstream's own document (kbs/docs/kbs.yaml) promises its clients.

docs/api.md lists where the two documents differ; these tests pin the part an upstream client
depends on: every upstream path is served for its methods, and the bodies of the handshake, the
released resource and the errors validate against upstream's schemas.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import yaml

from conftest import Kbs, vector
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy

UPSTREAM: dict[str, Any] = yaml.safe_load(vector("kbs", "openapi-kbs.yaml").read_text())
# upstream's document places /metrics at the server root (a per-path server override)
AT_THE_ROOT = {"/metrics"}


def _valid(instance: object, schema_name: str) -> None:
    schema = {**UPSTREAM, **UPSTREAM["components"]["schemas"][schema_name]}  # refs resolve
    jsonschema.validate(instance, schema)


@pytest.mark.parametrize(
    ("path", "method"),
    [
        (path, method)
        for path, item in UPSTREAM["paths"].items()
        for method in ("get", "post")
        if method in item
    ],
)
def test_every_upstream_operation_is_served(kbs: Kbs, path: str, method: str) -> None:
    prefix = "" if path in AT_THE_ROOT else "/kbs/v0"
    concrete = prefix + re.sub(r"\{[^}]+\}", "a", path)
    reply = kbs.client.request(method.upper(), concrete, content=b"{}")
    documented = {str(status) for status in UPSTREAM["paths"][path][method].get("responses", {})}
    if documented == {"405"}:  # upstream documents the refusal itself (POST /metrics)
        assert reply.status_code == 405, reply.text
        return
    assert reply.status_code != 405, reply.text
    if reply.status_code == 404:
        assert not reply.json()["type"].endswith(("/PluginNotFound", "/InvalidRequestPath"))


def test_handshake_and_release_bodies_match_upstream_schemas(kbs: Kbs) -> None:
    admin = AdminClient("http://testserver", http=kbs.client)
    admin.set_resource("default/key/one", b"secret")
    admin.set_resource_policy(builtin_policy("allow_all"))
    captured: list[Any] = []
    kbs.client.event_hooks["response"] = [lambda r: captured.append((r.read(), r))]
    assert KbsClient("http://testserver", http=kbs.client).get_resource("default/key/one")
    by_path = {r.request.url.path: r for _, r in captured}
    _valid(by_path["/kbs/v0/auth"].json(), "Challenge")
    assert by_path["/kbs/v0/auth"].cookies.get("kbs-session-id")
    _valid(by_path["/kbs/v0/attest"].json(), "AttestationToken")
    _valid(by_path["/kbs/v0/resource/default/key/one"].json(), "JweResponse")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/kbs/v0/resource/default/key/one", 401),  # no session, no token
        ("/kbs/v0/nothing-here/x", 404),
    ],
)
def test_error_bodies_match_upstream_error_information(kbs: Kbs, path: str, status: int) -> None:
    reply = kbs.client.get(path)
    assert reply.status_code == status
    _valid(reply.json(), "ErrorInformation")
    assert reply.json()["type"].startswith("https://github.com/confidential-containers/kbs/errors/")

"""The ``provisioner`` plugin's identities, documents, routes and config keys (upstream's
``provisioner/mod.rs``).

The end-to-end flow with a real ``kbs`` process, admin tokens and an attested guest is in
tests/e2e/test_e2e_provisioner.py; here each refused input has its own case, against the real
in-memory store.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.config import KbsConfig, ProvisionerPluginConfig, load_config
from keybroker.errors import (
    BadRequestError,
    ConfigError,
    InvalidRequestPathError,
    PayloadTooLargeError,
    PolicyDeniedError,
    ResourceNotFoundError,
    StorageError,
)
from keybroker.kbs.app import create_app
from keybroker.plugins.base import PluginRequest
from keybroker.plugins.provisioner import (
    CONFDATA_KEY,
    MAX_BODY,
    MAX_NAMESPACE_LENGTH,
    MAX_VM_NAME_LENGTH,
    STORAGE_NAMESPACE,
    ProvisionerConfig,
    ProvisionerPlugin,
    VmIdentity,
    confdata,
    generate_passphrase,
)
from keybroker.protocol.models import JsonValue
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.provider import memory_provider

# Upstream's PROVISIONER_NAMESPACE constant, written out: the derivation must not drift.
UPSTREAM_NAMESPACE = "feab5599-6854-52bc-95f0-0241c03e620a"


def _plugin(key_length: int = 32) -> tuple[ProvisionerPlugin, MemoryKeyValueStorage]:
    storage = MemoryKeyValueStorage()
    return ProvisionerPlugin(ProvisionerConfig(key_length=key_length), storage), storage


def _provision(plugin: ProvisionerPlugin, body: JsonValue) -> dict[str, str]:
    request = PluginRequest("POST", ("provision",), body=json.dumps(body).encode())
    plugin.check(request)
    answer: dict[str, str] = json.loads(asyncio.run(plugin.handle(request)).body)
    return answer


def _fetch(plugin: ProvisionerPlugin, vm_uuid: str, claims: JsonValue) -> bytes:
    request = PluginRequest("GET", ("default", vm_uuid, "root"), init_data_claims=claims)
    plugin.check(request)
    return asyncio.run(plugin.handle(request)).body


def _bound(vm_uuid: str) -> dict[str, JsonValue]:
    return {"trustee.kbs.resource": f"kbs+provisioner:///default/{vm_uuid}/root"}


def test_the_vm_uuid_is_upstreams_uuid5_of_namespace_and_name() -> None:
    identity = VmIdentity.from_body(b'{"vm_name": "vm-1", "namespace": "tenant-a"}')
    expected = uuid.uuid5(uuid.UUID(UPSTREAM_NAMESPACE), "tenant-a/vm-1")
    assert identity.uuid == str(expected)
    assert VmIdentity.from_body(b'{"vm_name": "vm-1"}').namespace == "default"


def test_the_document_is_confdata_toml_with_a_fresh_alphanumeric_passphrase() -> None:
    first, second = generate_passphrase(48), generate_passphrase(48)
    assert first != second
    assert len(first) == 48 and re.fullmatch(r"[A-Za-z0-9]+", first)
    document = tomllib.loads(confdata(first).decode())
    assert document == {"version": "0.1.0", "data": {CONFDATA_KEY: first}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid json"),
        (b'["vm-1"]', "must be"),
        (b"{}", "`vm_name` is required"),
        (b'{"vm_name": 7}', "`vm_name`"),
        (b'{"vm_name": ""}', "`vm_name`"),
        (b'{"vm_name": "vm 1"}', "`vm_name`"),
        (b'{"vm_name": "-vm"}', "`vm_name`"),
        (b'{"vm_name": "vm\\u0000"}', "`vm_name`"),
        (json.dumps({"vm_name": "v" * (MAX_VM_NAME_LENGTH + 1)}).encode(), "`vm_name`"),
        (
            json.dumps({"vm_name": "vm", "namespace": "n" * (MAX_NAMESPACE_LENGTH + 1)}).encode(),
            "`namespace`",
        ),
        (b'{"vm_name": "vm", "namespace": null}', "`namespace`"),
        (b'{"vm_name": "vm", "uid": "x"}', "unknown field(s) uid"),
    ],
)
def test_a_malformed_provision_body_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=re.escape(message)):
        VmIdentity.from_body(body)


@pytest.mark.parametrize(
    "body",
    [
        {"vm_name": "../../etc/passwd"},
        {"vm_name": ".."},
        {"vm_name": "vm", "namespace": ".."},
        {"vm_name": "vm", "namespace": "../repository"},
        {"vm_name": "b/c", "namespace": "a"},  # would derive the uuid of namespace a/b, vm c
        {"vm_name": "c", "namespace": "a/b"},
        {"vm_name": "vm%2F.."},
    ],
)
def test_traversal_and_separator_in_an_identity_is_refused(body: dict[str, str]) -> None:
    with pytest.raises(BadRequestError, match="starting with a letter or digit"):
        VmIdentity.from_body(json.dumps(body).encode())


def test_provisioning_again_answers_the_same_and_keeps_the_key() -> None:
    plugin, storage = _plugin()
    answer = _provision(plugin, {"vm_name": "vm-1", "namespace": "tenant-a"})
    vm_uuid = answer["uuid"]
    assert answer == {"uuid": vm_uuid, "resource_path": f"default/{vm_uuid}/root"}
    stored = asyncio.run(storage.get(answer["resource_path"]))
    assert stored is not None
    assert _provision(plugin, {"vm_name": "vm-1", "namespace": "tenant-a"}) == answer
    assert asyncio.run(storage.get(answer["resource_path"])) == stored
    other = _provision(plugin, {"vm_name": "vm-1", "namespace": "tenant-b"})
    assert other["uuid"] != vm_uuid


def test_concurrent_provisions_of_one_vm_store_one_key() -> None:
    plugin, storage = _plugin()
    body = json.dumps({"vm_name": "racer"}).encode()

    async def race() -> list[bytes]:
        requests = [PluginRequest("POST", ("provision",), body=body) for _ in range(8)]
        answers = await asyncio.gather(*(plugin.handle(r) for r in requests))
        return [answer.body for answer in answers]

    answers = asyncio.run(race())
    assert len(set(answers)) == 1
    assert asyncio.run(storage.list_keys()) == [json.loads(answers[0])["resource_path"]]


class _FailingWrites(MemoryKeyValueStorage):
    """The real in-memory store, whose writes fail after they begin (a disk or a database
    going away mid-write)."""

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        raise OSError(28, "No space left on device")


def test_a_failed_write_answers_an_error_and_leaves_the_store_as_it_was() -> None:
    storage = _FailingWrites()
    plugin = ProvisionerPlugin(ProvisionerConfig(), storage)
    request = PluginRequest("POST", ("provision",), body=b'{"vm_name": "vm-1"}')
    with pytest.raises(StorageError, match="No space left on device") as caught:
        asyncio.run(plugin.handle(request))
    assert caught.value.status == 500
    assert asyncio.run(storage.list_keys()) == []


def test_the_compact_answer_matches_upstreams_serde_bytes() -> None:
    plugin, _ = _plugin()
    request = PluginRequest("POST", ("provision",), body=b'{"vm_name": "vm-1"}')
    body = asyncio.run(plugin.handle(request)).body
    vm_uuid = json.loads(body)["uuid"]
    assert body == f'{{"uuid":"{vm_uuid}","resource_path":"default/{vm_uuid}/root"}}'.encode()


def test_the_guest_gets_its_document_only_when_its_init_data_binds_it() -> None:
    plugin, _ = _plugin(key_length=64)
    vm_uuid = _provision(plugin, {"vm_name": "vm-1"})["uuid"]
    document = tomllib.loads(_fetch(plugin, vm_uuid, _bound(vm_uuid)).decode())
    assert len(document["data"][CONFDATA_KEY]) == 64


@pytest.mark.parametrize(
    "claims",
    [
        None,
        {},
        {"trustee.kbs.resource": 7},
        {"trustee.kbs.resource": "kbs+provisioner:///default/other/root"},
        {"trustee.kbs.resource": "kbs:///default/{uuid}/root"},
    ],
)
def test_a_guest_whose_init_data_does_not_bind_the_vm_is_refused(claims: JsonValue) -> None:
    plugin, _ = _plugin()
    vm_uuid = _provision(plugin, {"vm_name": "vm-1"})["uuid"]
    if isinstance(claims, dict) and isinstance(claims.get("trustee.kbs.resource"), str):
        claims = {"trustee.kbs.resource": str(claims["trustee.kbs.resource"]).format(uuid=vm_uuid)}
    with pytest.raises(PolicyDeniedError, match="init-data"):
        _fetch(plugin, vm_uuid, claims)


def test_a_guest_of_another_vm_is_refused() -> None:
    plugin, _ = _plugin()
    mine = _provision(plugin, {"vm_name": "vm-1"})["uuid"]
    theirs = _provision(plugin, {"vm_name": "vm-2"})["uuid"]
    with pytest.raises(PolicyDeniedError, match="binds"):
        _fetch(plugin, theirs, _bound(mine))


def test_deprovision_removes_the_document_and_an_unknown_id_is_refused() -> None:
    plugin, storage = _plugin()
    vm_uuid = _provision(plugin, {"vm_name": "vm-1"})["uuid"]
    request = PluginRequest("DELETE", ("provision", vm_uuid))
    plugin.check(request)
    assert json.loads(asyncio.run(plugin.handle(request)).body) == {"status": "deleted"}
    assert asyncio.run(storage.list_keys()) == []
    with pytest.raises(ResourceNotFoundError, match="no VM is provisioned"):
        asyncio.run(plugin.handle(request))
    with pytest.raises(ResourceNotFoundError, match="no VM is provisioned"):
        _fetch(plugin, vm_uuid, _bound(vm_uuid))


@pytest.mark.parametrize(
    ("method", "path", "error"),
    [
        ("GET", (), InvalidRequestPathError),
        ("GET", ("provision", "x", "y"), InvalidRequestPathError),
        ("GET", ("default", "x", "root", "more"), InvalidRequestPathError),
        ("GET", ("resource", "x", "root"), InvalidRequestPathError),
        ("DELETE", ("provision", "../../repository"), BadRequestError),
        ("DELETE", ("provision", "FEAB5599-6854-52BC-95F0-0241C03E620A"), BadRequestError),
        ("GET", ("default", "..", "root"), BadRequestError),
        ("GET", ("default", "a/../b", "root"), BadRequestError),
    ],
)
def test_a_path_outside_the_three_endpoints_is_refused_before_authorization(
    method: str, path: tuple[str, ...], error: type[Exception]
) -> None:
    plugin, _ = _plugin()
    with pytest.raises(error):
        plugin.check(PluginRequest(method, path))


def test_methods_admin_and_sealing_follow_upstream() -> None:
    plugin, _ = _plugin()
    provision = PluginRequest("POST", ("provision",))
    deprovision = PluginRequest("DELETE", ("provision", UPSTREAM_NAMESPACE))
    fetch = PluginRequest("GET", ("default", UPSTREAM_NAMESPACE, "root"))
    assert plugin.methods(provision) == ("POST",)
    assert plugin.methods(deprovision) == ("DELETE",)
    assert plugin.methods(fetch) == ("GET",)
    assert plugin.requires_admin(provision) and plugin.requires_admin(deprovision)
    assert not plugin.requires_admin(fetch)
    assert plugin.needs_encryption(fetch) and not plugin.needs_encryption(provision)


def test_an_oversized_provision_body_is_refused() -> None:
    plugin, _ = _plugin()
    body = json.dumps({"vm_name": "vm", "namespace": "x" * MAX_BODY}).encode()
    with pytest.raises(PayloadTooLargeError, match=f"at most {MAX_BODY} bytes"):
        plugin.check(PluginRequest("POST", ("provision",), body=body))


def test_query_parameters_are_refused() -> None:
    plugin, _ = _plugin()
    with pytest.raises(BadRequestError, match="no query"):
        plugin.check(PluginRequest("POST", ("provision",), query={"vm_name": "x"}))


def test_upstream_form_of_the_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "kbs-config.toml"
    path.write_text('[[plugins]]\nname = "provisioner"\n\n[[plugins]]\nname = "resource"\n')
    plugins = [p for p in load_config(path).plugins if isinstance(p, ProvisionerPluginConfig)]
    assert len(plugins) == 1 and plugins[0].settings().key_length == 32
    path.write_text('[[plugins]]\nname = "provisioner"\nkey_length = 64\n')
    (plugin,) = load_config(path).plugins
    assert isinstance(plugin, ProvisionerPluginConfig) and plugin.settings().key_length == 64


def test_an_earlier_upstream_kbs_url_loads_and_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = KbsConfig.model_validate(
        {"plugins": [{"name": "provisioner", "kbs_url": "https://kbs.example:8080"}]}
    )
    (entry,) = config.plugins
    assert isinstance(entry, ProvisionerPluginConfig)
    with caplog.at_level("WARNING", logger="keybroker.plugins.provisioner"):
        ProvisionerPlugin(entry.settings(), MemoryKeyValueStorage())
    assert "`kbs_url` is ignored" in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"key_length": 8}, "greater than or equal to 16"),
        ({"key_length": 100_000}, "less than or equal to 4096"),
        ({"key_length": "32x"}, "key_length"),
        ({"keylength": 32}, "keylength"),
    ],
)
def test_a_weak_or_unknown_provisioner_setting_is_refused(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        KbsConfig.model_validate({"plugins": [{"name": "provisioner", **settings}]})


def test_the_kbs_serves_the_plugin_over_its_provisioner_storage_namespace() -> None:
    storage = memory_provider()
    config = kbs_config(plugins=[{"name": "provisioner"}])
    with TestClient(create_app(config, storage=storage)) as client:
        reply = client.post("/kbs/v0/provisioner/provision", json={"vm_name": "vm-1"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        key = reply.json()["resource_path"]
        assert asyncio.run(storage.get(STORAGE_NAMESPACE).list_keys()) == [key]
        assert asyncio.run(storage.get("repository").list_keys()) == []
        # the guest's GET needs an attestation token before anything else
        assert client.get(f"/kbs/v0/provisioner/{key}").status_code == 401

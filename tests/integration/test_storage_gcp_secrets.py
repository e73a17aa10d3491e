"""The GCP Secret Manager backend: Google's own client (REST transport) and google-auth against
the Secret Manager and OAuth token endpoint STAND-IN over real HTTP (tests/standins/gcp_secrets.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import kbs_config, vector
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.config import parse_config
from keybroker.errors import (
    ConfigError,
    KbsRejectedError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
    UnsupportedOperationError,
)
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.gcp_secrets import (
    GcpSecretsConfig,
    GcpSecretsSecretBackend,
    crc32c,
    secret_version_name,
)
from ports import free_port
from secret_backend_gcp import gcp_backend
from standins.gcp_secrets import (
    PROJECT,
    GcpStandIn,
    ServiceAccount,
    adc_env,
    gcp_stand_in,
    use_service_account,
)
from standins.server import ServedApp


@pytest.fixture
def gcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcpStandIn]:
    """A fresh stand-in, and its service account's key file as the ADC of this test."""
    with gcp_stand_in() as stand_in:
        use_service_account(stand_in, tmp_path, monkeypatch)
        yield stand_in


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def test_secret_version_name_is_upstreams() -> None:
    assert secret_version_name("my-project", "my-secret") == (
        "projects/my-project/secrets/my-secret/versions/latest"
    )
    assert secret_version_name("123456789", "db-password") == (
        "projects/123456789/secrets/db-password/versions/latest"
    )


def test_crc32c_known_answers() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)


def test_secret_by_tag_repository_and_type_ignored(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, "s3cr3t ünïcode".encode())
    backend = gcp_backend(gcp)
    for path in (f"default/any/{name}", f"other/kind/{name}"):
        assert asyncio.run(backend.read(ResourcePath.parse(path))) == "s3cr3t ünïcode".encode()


def test_binary_secret_of_every_byte(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, bytes(range(256)) * 4)
    assert asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", name))) == (
        bytes(range(256)) * 4
    )


def test_latest_version_is_released(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, b"first")
    gcp.state.add_secret(name, b"rotated")
    assert asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", name))) == b"rotated"


def test_missing_secret_is_not_found(gcp: GcpStandIn) -> None:
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", _name())))


def test_tag_that_cannot_be_a_secret_name_is_not_found_without_a_request(
    gcp: GcpStandIn,
) -> None:
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", "has.dot")))
    assert gcp.state.access_calls == 0


def test_concurrent_reads(gcp: GcpStandIn) -> None:
    names = [_name() for _ in range(6)]
    for name in names:
        gcp.state.add_secret(name, name.encode() * 3)
    backend = gcp_backend(gcp)

    async def scenario() -> list[bytes]:
        return list(await asyncio.gather(*(backend.read(ResourcePath("r", "t", n)) for n in names)))

    assert asyncio.run(scenario()) == [name.encode() * 3 for name in names]


def test_access_token_is_cached_until_it_expires_then_refreshed(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, b"v")
    backend = gcp_backend(gcp)
    path = ResourcePath("a", "b", name)
    for _ in range(3):
        assert asyncio.run(backend.read(path)) == b"v"
    assert gcp.state.token_calls == 1  # one JWT-bearer exchange, then the cached token
    gcp.state.expire_access_tokens()
    assert asyncio.run(backend.read(path)) == b"v"
    assert gcp.state.unauthenticated == 1  # the expired token was refused once...
    assert gcp.state.token_calls == 2  # ...and the client fetched a new one and tried again


def test_wrong_service_account_key_is_refused_by_the_token_endpoint_and_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key the stand-in does not trust for the account (rotated away, or forged)."""
    with gcp_stand_in() as stand_in:
        impostor = ServiceAccount(stand_in.account.email)  # same e-mail, another key
        use_service_account(stand_in, tmp_path, monkeypatch, impostor)
        name = _name()
        stand_in.state.add_secret(name, b"never released")
        with caplog.at_level(logging.WARNING), pytest.raises(ServiceUnavailableError) as refused:
            asyncio.run(gcp_backend(stand_in).read(ResourcePath("a", "b", name)))
        assert "credentials were refused" in str(refused.value)
        assert stand_in.state.token_calls >= 1
        assert stand_in.state.access_calls == 0  # no request ever carried a token
    assert "invalid_grant" in caplog.text  # the operator learns why
    assert "never released" not in caplog.text


def test_token_endpoint_unavailable_is_retried_then_unavailable(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, b"v")
    backend = gcp_backend(gcp, max_attempts=1)
    gcp.state.token_unavailable = True
    with pytest.raises(ServiceUnavailableError, match="token endpoint is busy"):
        asyncio.run(backend.read(ResourcePath("a", "b", name)))
    assert gcp.state.access_calls == 0
    gcp.state.token_unavailable = False  # back: the same backend recovers
    assert asyncio.run(backend.read(ResourcePath("a", "b", name))) == b"v"


def test_api_refusing_every_token_is_unavailable(
    gcp: GcpStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API refuses every token (as after a revocation, or one that expired on arrival): 503,
    not a secret."""
    name = _name()
    gcp.state.add_secret(name, b"v")
    monkeypatch.setattr(gcp.state, "token_lifetime", 0)  # every token is born expired
    with pytest.raises(ServiceUnavailableError, match="refused the KBS's credentials"):
        asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", name)))
    assert gcp.state.unauthenticated >= 1


def test_checksum_mismatch_is_refused(gcp: GcpStandIn, caplog: pytest.LogCaptureFixture) -> None:
    name = _name()
    gcp.state.add_secret(name, b"corrupted on the way")
    gcp.state.corrupt_checksum = True
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="CRC32C") as refused:
        asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", name)))
    assert not isinstance(refused.value, ServiceUnavailableError)
    assert "corrupted on the way" not in caplog.text


def test_permission_denied_is_a_storage_error_naming_the_status(
    gcp: GcpStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    name = _name()
    gcp.state.add_secret(name, b"v")
    gcp.state.denied.add(name)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as refused:
        asyncio.run(gcp_backend(gcp).read(ResourcePath("a", "b", name)))
    assert "403 PERMISSION_DENIED" in str(refused.value)
    assert not isinstance(refused.value, ResourceNotFoundError | ServiceUnavailableError)
    assert "secretmanager.versions.access" not in str(refused.value)  # Google's message: log
    assert "secretmanager.versions.access" in caplog.text


def test_throttled_service_is_unavailable_after_bounded_retries(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, b"v")
    backend = gcp_backend(gcp, max_attempts=3)
    gcp.state.throttle = True
    with pytest.raises(ServiceUnavailableError, match="RESOURCE_EXHAUSTED"):
        asyncio.run(backend.read(ResourcePath("a", "b", name)))
    assert gcp.state.access_calls == 3  # retried, but no more than max_attempts


def test_write_and_delete_are_refused_cleanly(gcp: GcpStandIn) -> None:
    backend = gcp_backend(gcp)
    path = ResourcePath("a", "b", _name())
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.write(path, b"x"))
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.delete(path))
    assert gcp.state.access_calls == gcp.state.token_calls == 0  # nothing reached Google


def test_stopped_service_is_unavailable(gcp: GcpStandIn) -> None:
    name = _name()
    gcp.state.add_secret(name, b"v")
    backend = gcp_backend(gcp, timeout=1)
    assert asyncio.run(backend.read(ResourcePath("a", "b", name))) == b"v"
    gcp.server.stop()
    with pytest.raises(ServiceUnavailableError, match="unreachable"):
        asyncio.run(backend.read(ResourcePath("a", "b", name)))


def test_wrong_port_is_unavailable(gcp: GcpStandIn) -> None:
    backend = gcp_backend(gcp, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(ServiceUnavailableError, match="retry later"):
        asyncio.run(backend.read(ResourcePath("a", "b", "anything")))


def test_service_that_never_answers_is_unavailable(gcp: GcpStandIn) -> None:
    release = asyncio.Event()

    async def hang(request: Request) -> Response:
        await asyncio.wait_for(release.wait(), 30)
        return Response(b"{}")

    server = ServedApp(Starlette(routes=[Route("/{rest:path}", hang, methods=["GET"])]))
    server.start()
    try:
        backend = gcp_backend(gcp, endpoint_url=server.url, timeout=0.5, max_attempts=1)
        with pytest.raises(ServiceUnavailableError, match="retry later"):
            asyncio.run(backend.read(ResourcePath("a", "b", "slow")))
    finally:
        server.stop()


def test_server_error_is_unavailable(gcp: GcpStandIn) -> None:
    async def fail(request: Request) -> Response:
        return Response(
            b'{"error":{"code":500,"message":"internal","status":"INTERNAL"}}',
            status_code=500,
            media_type="application/json",
        )

    server = ServedApp(Starlette(routes=[Route("/{rest:path}", fail, methods=["GET"])]))
    server.start()
    try:
        backend = gcp_backend(gcp, endpoint_url=server.url, max_attempts=1)
        with pytest.raises(ServiceUnavailableError, match="500 INTERNAL"):
            asyncio.run(backend.read(ResourcePath("a", "b", "x")))
    finally:
        server.stop()


def test_no_credentials_anywhere_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in adc_env(tmp_path / "no-such-key.json", tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    with pytest.raises(ConfigError, match="no usable Google credentials"):
        GcpSecretsSecretBackend(GcpSecretsConfig(project_id=PROJECT))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("project_id", "a/b"),
        ("project_id", "../x"),
        ("project_id", ""),
        ("endpoint_url", "ftp://example.com"),
        ("endpoint_url", "https://user@example.com"),
        ("endpoint_url", "https://example.com/path"),
        ("max_attempts", 0),
        ("max_attempts", 11),
        ("timeout", 0),
    ],
)
def test_bad_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        GcpSecretsConfig.model_validate({"project_id": "p", field: value})


def test_upstream_documented_config_loads() -> None:
    """Upstream's docs/config.md form: ``storage_backend_type = "Gcp"`` with its two keys."""
    config = parse_config(
        {
            "plugins": [
                {
                    "name": "resource",
                    "storage_backend_type": "Gcp",
                    "project_id": "my-project",
                    "endpoint_url": "http://localhost:8080",
                }
            ]
        },
        source="test",
    )
    plugin = config.plugins[0]
    assert plugin.backend_kind() == "gcp"  # type: ignore[union-attr]
    assert plugin.backend_settings() == GcpSecretsConfig(  # type: ignore[union-attr]
        project_id="my-project", endpoint_url="http://localhost:8080"
    )
    minimal = parse_config(
        {"plugins": [{"name": "resource", "storage_backend_type": "gcp", "project_id": "1234"}]},
        source="test",
    )
    assert minimal.plugins[0].backend_settings() == GcpSecretsConfig(  # type: ignore[union-attr]
        project_id="1234"
    )


def test_upstream_config_table_loads_with_its_examples() -> None:
    """Upstream has no example file for the ``Gcp`` backend: its docs/config.md table (a vector)
    lists the keys with an example each. Every key with its example loads; the required one
    is required here too."""
    text = vector("kbs", "docs-config.md").read_text()
    table = text.split('When `storage_backend_type = "Gcp"`:', 1)[1].split("\n\n", 2)[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()[2:]  # past the header and its rule
    ]
    examples = {row[0].strip("`"): row[4].strip("`") for row in rows}
    assert set(examples) == {"project_id", "endpoint_url"}
    config = parse_config(
        {"plugins": [{"name": "resource", "storage_backend_type": "Gcp", **examples}]},
        source="upstream docs/config.md",
    )
    settings = config.plugins[0].backend_settings()  # type: ignore[union-attr]
    assert settings == GcpSecretsConfig.model_validate(examples)
    required = {row[0].strip("`") for row in rows if row[3] == "Yes"}
    assert required == {"project_id"}
    for key in required:
        with pytest.raises(ValidationError, match=key):
            GcpSecretsConfig.model_validate({k: v for k, v in examples.items() if k != key})


def test_missing_project_id_or_unknown_key_is_refused_at_load_time() -> None:
    with pytest.raises(ConfigError, match="project_id"):
        parse_config(
            {"plugins": [{"name": "resource", "storage_backend_type": "gcp"}]}, source="test"
        )
    with pytest.raises(ConfigError, match="credentials_file"):
        parse_config(
            {
                "plugins": [
                    {
                        "name": "resource",
                        "storage_backend_type": "gcp",
                        "project_id": "p",
                        "credentials_file": "/k.json",
                    }
                ]
            },
            source="test",
        )


def test_kbs_releases_a_gcp_secret_and_refuses_writes(gcp: GcpStandIn) -> None:
    """Configured the upstream way, through the KBS HTTP API with a guest's attestation."""
    name = _name()
    gcp.state.add_secret(name, b"\x00gcp\xff")
    plugin = {
        "name": "resource",
        "storage_backend_type": "Gcp",
        "project_id": PROJECT,
        "endpoint_url": gcp.server.url,
    }
    with TestClient(create_app(kbs_config(plugins=[plugin]))) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://testserver", http=client)
        assert guest.get_resource(f"default/key/{name}") == b"\x00gcp\xff"
        with pytest.raises(KbsRejectedError) as missing:
            guest.get_resource(f"default/key/{_name()}")
        assert missing.value.http_status == ResourceNotFoundError.status
        refused = client.post("/kbs/v0/resource/default/key/new", content=b"x")
        assert refused.status_code == UnsupportedOperationError.status
        assert "read-only" in refused.json()["detail"]

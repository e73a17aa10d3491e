"""The AWS Secrets Manager backend: the production boto3 client against moto's server, a STAND-IN
for AWS run as a separate process over real HTTP (tests/standins/aws_secrets.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.config import ResourcePluginConfig, parse_config
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
from keybroker.storage.aws_secrets import AwsSecretsConfig, AwsSecretsSecretBackend
from keybroker.storage.provider import memory_provider
from keybroker.storage.secret_registry import SECRET_BACKENDS, BuildContext
from ports import free_port
from standins.aws_secrets import REGION, MotoServer, Throttler, aws_env
from standins.server import ServedApp

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(autouse=True)
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials from the standard chain's first source, the environment; no region there."""
    for name, value in aws_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _backend(endpoint_url: str, **changes: Any) -> AwsSecretsSecretBackend:
    settings: dict[str, Any] = {
        "region": REGION,
        "endpoint_url": endpoint_url,
        "timeout": 2,
        "max_attempts": 2,
        **changes,
    }
    return AwsSecretsSecretBackend(AwsSecretsConfig.model_validate(settings))


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def test_string_secret_by_tag_repository_and_type_ignored(moto: MotoServer, tmp_path: Path) -> None:
    name = _name()
    moto.admin(tmp_path).create_secret(Name=name, SecretString="s3cr3t ünïcode")
    backend = _backend(moto.url)
    for path in (f"default/any/{name}", f"other/kind/{name}"):
        assert asyncio.run(backend.read(ResourcePath.parse(path))) == "s3cr3t ünïcode".encode()


def test_binary_secret_of_every_byte(moto: MotoServer, tmp_path: Path) -> None:
    name = _name()
    moto.admin(tmp_path).create_secret(Name=name, SecretBinary=bytes(range(256)) * 4)
    backend = _backend(moto.url)
    assert asyncio.run(backend.read(ResourcePath("a", "b", name))) == bytes(range(256)) * 4


def test_current_version_is_released(moto: MotoServer, tmp_path: Path) -> None:
    name = _name()
    admin = moto.admin(tmp_path)
    admin.create_secret(Name=name, SecretString="first")
    admin.put_secret_value(SecretId=name, SecretString="rotated")
    assert asyncio.run(_backend(moto.url).read(ResourcePath("a", "b", name))) == b"rotated"


def test_missing_secret_is_not_found(moto: MotoServer) -> None:
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(_backend(moto.url).read(ResourcePath("a", "b", _name())))


def test_concurrent_reads(moto: MotoServer, tmp_path: Path) -> None:
    names = [_name() for _ in range(6)]
    admin = moto.admin(tmp_path)
    for name in names:
        admin.create_secret(Name=name, SecretString=name * 3)
    backend = _backend(moto.url)

    async def scenario() -> list[bytes]:
        return list(await asyncio.gather(*(backend.read(ResourcePath("r", "t", n)) for n in names)))

    assert asyncio.run(scenario()) == [(name * 3).encode() for name in names]


def test_write_and_delete_are_refused_cleanly(moto: MotoServer) -> None:
    backend = _backend(moto.url)
    path = ResourcePath("a", "b", _name())
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.write(path, b"x"))
    with pytest.raises(UnsupportedOperationError, match="read-only"):
        asyncio.run(backend.delete(path))
    with pytest.raises(ResourceNotFoundError):  # nothing reached AWS
        asyncio.run(backend.read(path))


def test_stopped_service_is_unavailable(tmp_path: Path) -> None:
    server = MotoServer(tmp_path / "moto.log")
    with server:
        name = _name()
        server.admin(tmp_path).create_secret(Name=name, SecretString="v")
        backend = _backend(server.url, timeout=1)
        assert asyncio.run(backend.read(ResourcePath("a", "b", name))) == b"v"
    with pytest.raises(ServiceUnavailableError, match="unreachable"):
        asyncio.run(backend.read(ResourcePath("a", "b", name)))


def test_wrong_port_is_unavailable() -> None:
    backend = _backend(f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(ServiceUnavailableError, match="retry later"):
        asyncio.run(backend.read(ResourcePath("a", "b", "anything")))


def test_throttled_service_is_unavailable_after_bounded_retries() -> None:
    throttler = Throttler()
    server = ServedApp(throttler.app())
    server.start()
    try:
        backend = _backend(server.url, max_attempts=3)
        with pytest.raises(ServiceUnavailableError, match="ThrottlingException"):
            asyncio.run(backend.read(ResourcePath("a", "b", "busy")))
    finally:
        server.stop()
    assert throttler.calls == 3  # retried, but no more than max_attempts


def test_service_that_never_answers_is_unavailable() -> None:
    release = asyncio.Event()

    async def hang(request: Request) -> Response:
        await asyncio.wait_for(release.wait(), 30)
        return Response(b"{}")

    server = ServedApp(Starlette(routes=[Route("/", hang, methods=["POST"])]))
    server.start()
    try:
        backend = _backend(server.url, timeout=0.5, max_attempts=1)
        with pytest.raises(ServiceUnavailableError, match="retry later"):
            asyncio.run(backend.read(ResourcePath("a", "b", "slow")))
    finally:
        server.stop()


def _answering(status: int, code: str) -> ServedApp:
    """A STAND-IN endpoint answering every call with the AWS JSON error ``code``."""

    async def refuse(request: Request) -> Response:
        return Response(
            b'{"__type":"%s","message":"stand-in refusal"}' % code.encode(),
            status_code=status,
            headers={"x-amzn-ErrorType": code},
            media_type="application/x-amz-json-1.1",
        )

    server = ServedApp(Starlette(routes=[Route("/", refuse, methods=["POST"])]))
    server.start()
    return server


def test_server_error_is_unavailable() -> None:
    server = _answering(500, "InternalServiceError")
    try:
        with pytest.raises(ServiceUnavailableError, match="InternalServiceError"):
            asyncio.run(_backend(server.url, max_attempts=1).read(ResourcePath("a", "b", "x")))
    finally:
        server.stop()


@pytest.mark.parametrize(
    "code", ["AccessDeniedException", "InvalidRequestException", "DecryptionFailure"]
)
def test_other_refusals_are_storage_errors_naming_the_code(code: str) -> None:
    """Not "not found" and not "retry later": the operator must fix something."""
    server = _answering(400, code)
    try:
        with pytest.raises(StorageError, match=code) as refused:
            asyncio.run(_backend(server.url).read(ResourcePath("a", "b", "x")))
        assert not isinstance(refused.value, ResourceNotFoundError | ServiceUnavailableError)
        assert "stand-in refusal" not in str(refused.value)  # AWS's message: log only
    finally:
        server.stop()


def test_no_credentials_is_a_storage_error(
    moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials"):
        asyncio.run(_backend(moto.url).read(ResourcePath("a", "b", "x")))


def test_no_region_anywhere_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="region"):
        AwsSecretsSecretBackend(AwsSecretsConfig())


def test_region_from_the_environment_is_used(moto: MotoServer, tmp_path: Path) -> None:
    """AWS_REGION is mapped into the plugin's `region` when the configuration is loaded."""
    name = _name()
    moto.admin(tmp_path).create_secret(Name=name, SecretString="from env region")
    plugin = {"name": "resource", "storage_backend_type": "AWS", "endpoint_url": moto.url}
    config = parse_config({"plugins": [plugin]}, environ={"AWS_REGION": REGION})
    settings = config.plugins[0].backend_settings()  # type: ignore[union-attr]
    assert settings == AwsSecretsConfig(region=REGION, endpoint_url=moto.url)
    backend = SECRET_BACKENDS["aws"].build(settings, BuildContext(memory_provider().get))
    assert asyncio.run(backend.read(ResourcePath("a", "b", name))) == b"from env region"


def test_region_in_the_file_wins_over_the_environment() -> None:
    plugins = [
        {"name": "resource", "type": "aws", "region": "eu-west-3"},  # the seed-era spelling
    ]
    config = parse_config({"plugins": plugins}, environ={"AWS_REGION": REGION})
    assert config.plugins[0].backend_settings() == AwsSecretsConfig(region="eu-west-3")  # type: ignore[union-attr]
    # another backend takes no region from the environment
    kv = {"name": "resource", "storage_backend_type": "kvstorage"}
    assert parse_config({"plugins": [kv]}, environ={"AWS_REGION": REGION}).plugins == [
        ResourcePluginConfig(name="resource", storage_backend_type="kvstorage")
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint_url", "ftp://example.com"),
        ("endpoint_url", "https://user@example.com"),
        ("endpoint_url", "https://example.com/path"),
        ("region", "us east 1"),
        ("max_attempts", 0),
        ("max_attempts", 11),
        ("timeout", 0),
    ],
)
def test_bad_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        AwsSecretsConfig.model_validate({field: value})


def test_upstream_documented_config_loads() -> None:
    """Upstream's docs/config.md form: ``storage_backend_type = "Aws"`` with its two keys."""
    config = parse_config(
        {
            "plugins": [
                {
                    "name": "resource",
                    "storage_backend_type": "Aws",
                    "region": "us-west-2",
                    "endpoint_url": "https://secretsmanager-fips.us-west-2.amazonaws.com",
                }
            ]
        },
        source="test",
    )
    plugin = config.plugins[0]
    assert plugin.backend_kind() == "aws"  # type: ignore[union-attr]
    assert plugin.backend_settings() == AwsSecretsConfig(  # type: ignore[union-attr]
        region="us-west-2", endpoint_url="https://secretsmanager-fips.us-west-2.amazonaws.com"
    )
    minimal = parse_config(
        {"plugins": [{"name": "resource", "storage_backend_type": "aws"}]}, source="test"
    )
    assert minimal.plugins[0].backend_settings() == AwsSecretsConfig()  # type: ignore[union-attr]


def test_unknown_key_is_refused_at_load_time() -> None:
    with pytest.raises(ConfigError, match="access_key"):
        parse_config(
            {"plugins": [{"name": "resource", "storage_backend_type": "aws", "access_key": "x"}]},
            source="test",
        )


def test_kbs_releases_an_aws_secret_and_refuses_writes(moto: MotoServer, tmp_path: Path) -> None:
    """Configured the upstream way, through the KBS HTTP API with a guest's attestation."""
    name = _name()
    moto.admin(tmp_path).create_secret(Name=name, SecretBinary=b"\x00aws\xff")
    plugin = {
        "name": "resource",
        "storage_backend_type": "Aws",
        "region": REGION,
        "endpoint_url": moto.url,
    }
    with TestClient(create_app(kbs_config(plugins=[plugin]))) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://testserver", http=client)
        assert guest.get_resource(f"default/key/{name}") == b"\x00aws\xff"
        with pytest.raises(KbsRejectedError) as missing:
            guest.get_resource(f"default/key/{_name()}")
        assert missing.value.http_status == ResourceNotFoundError.status
        refused = client.post("/kbs/v0/resource/default/key/new", content=b"x")
        assert refused.status_code == UnsupportedOperationError.status
        assert "read-only" in refused.json()["detail"]

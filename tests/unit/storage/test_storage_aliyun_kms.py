"""The Aliyun KMS secret backend against the KMS-instance stand-in over real HTTPS."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import (
    ConfigError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
    UnsupportedOperationError,
)
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.kbs.tls import self_signed_certificate
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.aliyun_kms import (
    AliyunKmsConfig,
    AliyunKmsSecretBackend,
    _decode,
    _encode,
)
from secret_backend_aliyun import KEY_ID, aliyun_backend, client_config, kms_stand_in
from standins.server import ServedApp

MIB = 1024 * 1024


def test_text_secret_by_tag_repository_and_type_ignored(tmp_path: Path) -> None:
    with aliyun_backend(tmp_path) as (backend, stand_in):
        stand_in.put_text("db-password", "s3cr3t ünïcode")
        for path in ("default/any/db-password", "other/kind/db-password"):
            assert asyncio.run(backend.read(ResourcePath.parse(path))) == "s3cr3t ünïcode".encode()


def test_binary_secret_of_every_byte_and_one_mebibyte(tmp_path: Path) -> None:
    large = (bytes(range(256)) * (MIB // 256))[:MIB]
    with aliyun_backend(tmp_path) as (backend, stand_in):
        stand_in.put_binary("bytes", bytes(range(256)))
        stand_in.put_binary("large", large)
        assert asyncio.run(backend.read(ResourcePath.parse("a/b/bytes"))) == bytes(range(256))
        assert asyncio.run(backend.read(ResourcePath.parse("a/b/large"))) == large


def test_missing_secret_is_not_found(tmp_path: Path) -> None:
    with (
        aliyun_backend(tmp_path) as (backend, _stand_in),
        pytest.raises(ResourceNotFoundError, match="resource not found: a/b/nothing"),
    ):
        asyncio.run(backend.read(ResourcePath.parse("a/b/nothing")))


def test_concurrent_reads(tmp_path: Path) -> None:
    with aliyun_backend(tmp_path) as (backend, stand_in):
        for i in range(10):
            stand_in.put_text(f"s{i}", f"value {i}")

        async def scenario() -> list[bytes]:
            return await asyncio.gather(
                *(backend.read(ResourcePath.parse(f"r/t/s{i % 10}")) for i in range(40))
            )

        assert asyncio.run(scenario()) == [f"value {i % 10}".encode() for i in range(40)]


def test_write_and_delete_are_refused_cleanly(tmp_path: Path) -> None:
    """Upstream's worker crashed here (todo!()); ours answers a clear error."""
    with aliyun_backend(tmp_path) as (backend, stand_in):
        path = ResourcePath.parse("a/b/c")
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            asyncio.run(backend.write(path, b"x"))
        with pytest.raises(UnsupportedOperationError, match="read-only"):
            asyncio.run(backend.delete(path))
        assert stand_in.requests == 0


def test_forged_signature_is_rejected(tmp_path: Path) -> None:
    """A client key the instance does not know under this KeyId: the signature fails."""
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        config = client_config(server, stand_in, ca_pem)
        stand_in.client_keys[KEY_ID] = rsa.generate_private_key(65537, 2048).public_key()
        stand_in.put_text("t", "never released")
        backend = AliyunKmsSecretBackend.from_config(config)
        with pytest.raises(StorageError, match=r"Rejected\.Unauthenticated") as refused:
            asyncio.run(backend.read(ResourcePath.parse("a/b/t")))
        assert "never released" not in refused.value.detail
        assert "does not verify" not in refused.value.detail  # KMS's own words stay in the log


def test_wrong_client_key_password_stops_start_up(tmp_path: Path) -> None:
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        config = client_config(server, stand_in, ca_pem)
        wrong = config.model_copy(update={"password": "not-it"})
        with pytest.raises(ConfigError, match="wrong password"):
            AliyunKmsSecretBackend.from_config(wrong)


def test_malformed_client_key_is_named() -> None:
    _key, ca = self_signed_certificate(["127.0.0.1"])
    config = AliyunKmsConfig(
        client_key=json.dumps({"KeyId": "x"}),
        kms_instance_id="kst",
        password="p",
        cert_pem=ca.decode(),
    )
    with pytest.raises(ConfigError, match="ClientKey JSON with KeyId and PrivateKeyData"):
        AliyunKmsSecretBackend.from_config(config)


def test_wrong_ca_fails_closed(tmp_path: Path) -> None:
    _key, other_ca = self_signed_certificate(["127.0.0.1"])
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        config = client_config(server, stand_in, ca_pem, cert_pem=other_ca.decode())
        stand_in.put_text("t", "never released")
        with pytest.raises(StorageError, match="TLS verification of Aliyun KMS"):
            asyncio.run(
                AliyunKmsSecretBackend.from_config(config).read(ResourcePath.parse("a/b/t"))
            )
        assert stand_in.requests == 0


def test_gateway_down_is_unavailable(tmp_path: Path) -> None:
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        backend = AliyunKmsSecretBackend.from_config(client_config(server, stand_in, ca_pem))
        stand_in.put_text("t", "value")
        server.stop()
        with pytest.raises(ServiceUnavailableError, match="unreachable"):
            asyncio.run(backend.read(ResourcePath.parse("a/b/t")))
        server.start()
        assert asyncio.run(backend.read(ResourcePath.parse("a/b/t"))) == b"value"


def test_gateway_that_never_answers_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    """A listener that accepts connections and never speaks (a hung gateway)."""
    with (
        kms_stand_in(tmp_path) as (server, stand_in, ca_pem),
        socket.create_server(("127.0.0.1", 0)) as silent,
    ):
        port = silent.getsockname()[1]
        config = client_config(server, stand_in, ca_pem, endpoint=f"127.0.0.1:{port}", timeout=0.5)
        backend = AliyunKmsSecretBackend.from_config(config)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match=r"did not answer within 0\.5 s"):
            asyncio.run(backend.read(ResourcePath.parse("a/b/t")))
        # the message names the 0.5 s timeout that fired; the bound only rules out a hang
        assert time.monotonic() - started < 10


def test_throttled_gateway_is_unavailable(tmp_path: Path) -> None:
    with aliyun_backend(tmp_path) as (backend, stand_in):
        stand_in.put_text("t", "value")
        stand_in.throttled = True
        with pytest.raises(ServiceUnavailableError, match=r"Rejected\.Throttling"):
            asyncio.run(backend.read(ResourcePath.parse("a/b/t")))
        stand_in.throttled = False
        assert asyncio.run(backend.read(ResourcePath.parse("a/b/t"))) == b"value"


def test_request_dated_outside_the_fifteen_minute_window_is_refused(tmp_path: Path) -> None:
    """The signed Date bounds replays: a gateway whose clock is an hour ahead refuses."""
    with aliyun_backend(tmp_path) as (backend, stand_in):
        stand_in.put_text("t", "never released")
        stand_in.now = lambda: time.time() + 3600
        with pytest.raises(StorageError, match="RequestTimeTooSkewed"):
            asyncio.run(backend.read(ResourcePath.parse("a/b/t")))


def test_a_404_without_a_kms_error_is_not_a_missing_secret(tmp_path: Path) -> None:
    """Something other than a KMS gateway at the endpoint (a misrouted proxy): fail loudly
    rather than report every secret as absent."""
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        config = client_config(server, stand_in, ca_pem)
        not_kms = ServedApp(
            Starlette(), certfile=tmp_path / "kms.crt", keyfile=tmp_path / "kms.key"
        )
        not_kms.start()
        try:
            backend = AliyunKmsSecretBackend.from_config(
                config.model_copy(update={"endpoint": f"127.0.0.1:{not_kms.port}"})
            )
            with pytest.raises(StorageError, match="HTTP 404 without a KMS error"):
                asyncio.run(backend.read(ResourcePath.parse("a/b/t")))
        finally:
            not_kms.stop()


def test_oversized_answer_is_refused_while_reading(tmp_path: Path) -> None:
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        backend = AliyunKmsSecretBackend(client_config(server, stand_in, ca_pem), max_bytes=1024)
        stand_in.put_binary("small", b"x" * 1024)
        stand_in.put_binary("huge", b"x" * (128 * 1024))
        assert asyncio.run(backend.read(ResourcePath.parse("a/b/small"))) == b"x" * 1024
        with pytest.raises(StorageError, match="answered with more than"):
            asyncio.run(backend.read(ResourcePath.parse("a/b/huge")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint", "https://kst-a.cryptoservice.kms.aliyuncs.com"),
        ("endpoint", "attacker.example/kst-a.cryptoservice.kms.aliyuncs.com"),
        ("endpoint", "user@kst-a.cryptoservice.kms.aliyuncs.com"),
        ("kms_instance_id", "attacker.example/x"),
        ("kms_instance_id", ""),
    ],
)
def test_endpoint_and_instance_id_are_host_names_only(field: str, value: str) -> None:
    settings = {
        "client_key": "{}",
        "kms_instance_id": "kst-a",
        "password": "p",
        "cert_pem": "pem",
        field: value,
    }
    with pytest.raises(ValidationError, match=field):
        AliyunKmsConfig.model_validate(settings)


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        config = client_config(server, stand_in, ca_pem)
        assert config.password not in repr(config)
        assert "PrivateKeyData" not in repr(config)


def test_wire_codec_round_trip() -> None:
    encoded = _encode({1: "name", 3: base64.b64encode(b"\x00").decode()})
    assert _decode(encoded) == {1: "name", 3: "AA=="}
    with pytest.raises(StorageError, match="truncated"):
        _decode(encoded[:-1])


def test_wire_codec_skips_fixed_width_fields() -> None:
    """A newer gateway may add fields of other types: they are skipped, as protobuf does."""
    fixed64 = bytes([7 << 3 | 1]) + bytes(8)
    fixed32 = bytes([8 << 3 | 5]) + bytes(4)
    assert _decode(fixed64 + _encode({3: "data"}) + fixed32) == {3: "data"}
    with pytest.raises(StorageError, match="truncated"):
        _decode(fixed32[:-1])


def test_kbs_releases_a_kms_secret_and_refuses_writes(tmp_path: Path) -> None:
    """Configured the upstream way (``type = "Aliyun"`` and its keys), through the HTTP API."""
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        settings = client_config(server, stand_in, ca_pem).model_dump()
        stand_in.put_binary("wrapped-key", b"\x00kms\xff")
        plugin = {"name": "resource", "type": "Aliyun", **settings}
        with TestClient(create_app(kbs_config(plugins=[plugin]))) as client:
            admin = AdminClient("http://testserver", http=client)
            admin.set_resource_policy(builtin_policy("allow_all"))
            guest = KbsClient("http://testserver", http=client)
            assert guest.get_resource("default/key/wrapped-key") == b"\x00kms\xff"
            refused = client.post("/kbs/v0/resource/default/key/new", content=b"x")
            assert refused.status_code == UnsupportedOperationError.status
            assert "read-only" in refused.json()["detail"]

"""TLS: upstream's profile configs build real server contexts; modern refuses TLS 1.2."""

from __future__ import annotations

import socket
import ssl
import threading
import tomllib
from pathlib import Path

import pytest

from conftest import vector
from keybroker.cli.kbs import main as kbs_main
from keybroker.config import parse_config
from keybroker.errors import ConfigError
from keybroker.kbs.tls import self_signed_certificate, server_context


@pytest.fixture
def key_pair(tmp_path: Path) -> tuple[Path, Path]:
    key_pem, cert_pem = self_signed_certificate(["localhost", "127.0.0.1"])
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    return tmp_path / "key.pem", tmp_path / "cert.pem"


def _profile(name: str, key_pair: tuple[Path, Path]) -> ssl.SSLContext:
    document = tomllib.loads(vector("kbs", "configs", name).read_text())
    document["http_server"]["private_key"] = str(key_pair[0])
    document["http_server"]["certificate"] = str(key_pair[1])
    return server_context(parse_config(document).http_server)


@pytest.mark.parametrize(
    ("name", "minimum", "maximum"),
    [
        ("tls-profile-old.toml", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
        ("tls-profile-intermediate.toml", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
        ("tls-profile-modern.toml", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
        ("tls-profile-custom.toml", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
        ("tls-profile-custom-pqc.toml", ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
    ],
)
def test_upstream_tls_profiles_build(
    name: str, minimum: ssl.TLSVersion, maximum: ssl.TLSVersion, key_pair: tuple[Path, Path]
) -> None:
    context = _profile(name, key_pair)
    assert (context.minimum_version, context.maximum_version) == (minimum, maximum)


def test_unavailable_groups_are_a_logged_fallback(
    key_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _profile("tls-profile-custom-pqc.toml", key_pair)
    assert "X25519MLKEM768" in caplog.text and "post-quantum" in caplog.text
    assert "TLS 1.3 suites" in caplog.text


def test_tls12_only_client_fails_against_modern(key_pair: tuple[Path, Path]) -> None:
    context = _profile("tls-profile-modern.toml", key_pair)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        connection, _ = listener.accept()
        try:
            context.wrap_socket(connection, server_side=True).close()
        except (ssl.SSLError, OSError):
            connection.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(key_pair[1]))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        client.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(5)
    listener.close()


def test_https_needs_key_and_certificate() -> None:
    with pytest.raises(ConfigError, match="private_key and certificate"):
        server_context(parse_config({"http_server": {}}).http_server)


def test_min_above_max_rejected(key_pair: tuple[Path, Path]) -> None:
    http = parse_config(
        {
            "http_server": {
                "private_key": str(key_pair[0]),
                "certificate": str(key_pair[1]),
                "tls_profile": "custom",
                "tls_min_version": "1.3",
                "tls_max_version": "1.2",
            }
        }
    ).http_server
    with pytest.raises(ConfigError, match="above"):
        server_context(http)


def test_self_signed_cert_command(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    assert kbs_main(["self-signed-cert", "--key-out", str(key), "--cert-out", str(cert)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    http = parse_config(
        {"http_server": {"private_key": str(key), "certificate": str(cert)}}
    ).http_server
    assert server_context(http).minimum_version == ssl.TLSVersion.TLSv1_2
    assert kbs_main(["self-signed-cert", "--key-out", str(key), "--cert-out", str(cert)]) == 1

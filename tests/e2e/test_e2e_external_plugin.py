"""The ``external`` plugin against a real plugin process (examples/external_plugin/echo_plugin.py)
over gRPC: plaintext, TLS and mTLS; ValidateAuth deciding the admin rule, NeedsEncryption the
sealing; a plugin down, slow, refusing or answering a huge body; upstream's configs load."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from starlette.testclient import TestClient

from admin_tokens import mint, write_public_pem
from conftest import FakeClock, kbs_config, vector
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.config import load_config, parse_config
from keybroker.errors import ConfigError
from keybroker.kbs.app import create_app
from keybroker.plugins.external import MAX_ANSWER_BYTES
from pki import Issued, issue, write
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "external_plugin" / "echo_plugin.py"
UPSTREAM_CONFIGS = [
    "external-plugin.toml",
    "external-plugin-tls.toml",
    "external-plugin-attest.toml",
    "external-plugin-resource.toml",
    "external-plugin-resource-tls.toml",
]
LOOPBACK = ("127.0.0.1", 50000)
# The policy data of a plugin request: plugin name, path after it (backend first), query.
POLICY = """package policy
import rego.v1
default allow := false
allow if {
    data.plugin == "external"
    data["resource-path"][0] == "echo"
    data["resource-path"][1] != "forbidden"
}
"""
LOCALHOST_SAN = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


class PluginProcess:
    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self._process = subprocess.Popen(
            [sys.executable, str(PLUGIN), "--port", str(port), "--slow-seconds", "30", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        assert "listening" in line, line

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = issue("plugin test CA")
    server = issue(
        "plugin",
        ca,
        ca=False,
        extensions=[
            (
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    client = issue(
        "kbs",
        ca,
        ca=False,
        extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    other_ca = issue("another CA")

    def key(path: Path, issued: Issued) -> Path:
        path.write_bytes(issued.key_pem())
        return path

    return {
        "ca": write(tmp_path / "ca.pem", ca),
        "other_ca": write(tmp_path / "other-ca.pem", other_ca),
        "server_cert": write(tmp_path / "server.pem", server),
        "server_key": key(tmp_path / "server.key", server),
        "client_cert": write(tmp_path / "client.pem", client),
        "client_key": key(tmp_path / "client.key", client),
    }


def _kbs(backend: Mapping[str, object]) -> TestClient:
    config = kbs_config(plugins=[{"name": "external", "backends": [{"name": "echo", **backend}]}])
    return TestClient(create_app(config, clock=FakeClock()), client=LOOPBACK)


def _attested(client: TestClient) -> KbsClient:
    AdminClient("http://testserver", http=client).set_resource_policy(POLICY)
    guest = KbsClient("http://testserver", http=client)
    guest.attest()  # the session cookie stays in the test client
    return guest


@pytest.fixture
def plain_plugin() -> Iterator[PluginProcess]:
    plugin = PluginProcess(free_port())
    yield plugin
    plugin.stop()


def _plain_backend(plugin: PluginProcess, **extra: object) -> dict[str, object]:
    return {"endpoint": f"http://127.0.0.1:{plugin.port}", "timeout_ms": 5000, **extra}


def test_plaintext_request_is_forwarded_with_path_query_and_body(
    plain_plugin: PluginProcess,
) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        _attested(client)
        reply = client.post("/kbs/v0/external/echo/echo/a/b?x=1", content=b"hello")
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.content) == {
        "method": "POST",
        "path": ["echo", "a", "b"],
        "query": {"x": "1"},
        "body": "hello",
    }


def test_guest_without_attestation_is_refused(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        reply = client.get("/kbs/v0/external/echo/echo")
    assert reply.status_code == 401, reply.text


def test_needs_encryption_seals_the_answer_to_the_tee_key(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        guest = _attested(client)
        reply = client.get("/kbs/v0/external/echo/sealed/x")
    assert reply.status_code == 200, reply.text
    jwe = reply.json()
    assert "ciphertext" in jwe and b"sealed" not in reply.content
    assert json.loads(guest.tee_key.decrypt(jwe))["path"] == ["sealed", "x"]


def test_validate_auth_puts_the_request_behind_admin_authorization(
    plain_plugin: PluginProcess, tmp_path: Path
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = write_public_pem(key, tmp_path / "admin.pem")
    provider = {"issuer": "admin1-issuer", "public_key_uri": str(public)}
    acl = {"role": "admin", "allowed_endpoints": "^/kbs/v0/external/.*$"}
    backend = {"name": "echo", **_plain_backend(plain_plugin)}
    config = kbs_config(
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {"bearer_jwt": {"identity_providers": [provider]}},
            "authorization": {"regex_acl": {"acls": [acl]}},
        },
        plugins=[{"name": "external", "backends": [backend]}],
    )
    admin = {"authorization": f"Bearer {mint(key)}"}
    with TestClient(create_app(config, clock=FakeClock()), client=LOOPBACK) as client:
        anonymous = client.get("/kbs/v0/external/echo/admin/x")
        as_admin = client.get("/kbs/v0/external/echo/admin/x", headers=admin)
        forged = client.get(
            "/kbs/v0/external/echo/admin/x",
            headers={"authorization": f"Bearer {mint(ed25519.Ed25519PrivateKey.generate())}"},
        )
    assert anonymous.status_code == 401, anonymous.text
    assert forged.status_code == 401, forged.text
    assert as_admin.status_code == 200, as_admin.text
    assert json.loads(as_admin.content)["path"] == ["admin", "x"]  # plain: admin answers unsealed


def test_resource_policy_denying_answers_403_without_calling_handle(
    plain_plugin: PluginProcess,
) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        _attested(client)
        reply = client.get("/kbs/v0/external/echo/forbidden")
    assert reply.status_code == 403, reply.text


def test_plugin_refusal_status_answers_401(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        _attested(client)
        reply = client.get("/kbs/v0/external/echo/refuse")
    assert reply.status_code == 401, reply.text
    assert reply.text != "no"  # the plugin's own body is not echoed


def test_plugin_exception_answers_503(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        _attested(client)
        reply = client.get("/kbs/v0/external/echo/fail")
    assert reply.status_code == 503, reply.text
    assert "failed (gRPC UNKNOWN)" in reply.json()["detail"]


def test_unknown_backend_answers_404(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        reply = client.get("/kbs/v0/external/nobody/echo")
    assert reply.status_code == 404, reply.text


def test_plugin_down_answers_503() -> None:
    with _kbs({"endpoint": f"http://127.0.0.1:{free_port()}", "timeout_ms": 5000}) as client:
        reply = client.get("/kbs/v0/external/echo/echo")
    assert reply.status_code == 503, reply.text
    assert "unreachable" in reply.json()["detail"]


def test_slow_plugin_answers_503_at_the_deadline(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin, timeout_ms=300)) as client:
        _attested(client)
        reply = client.get("/kbs/v0/external/echo/slow")
    assert reply.status_code == 503, reply.text
    assert "no answer within 0.3 s" in reply.json()["detail"]


def test_huge_answer_is_refused(plain_plugin: PluginProcess) -> None:
    with _kbs(_plain_backend(plain_plugin)) as client:
        _attested(client)
        reply = client.get("/kbs/v0/external/echo/huge")
    assert reply.status_code == 503, reply.text
    assert f"larger than {MAX_ANSWER_BYTES} bytes" in reply.json()["detail"]
    assert len(reply.content) < 4096


def _tls_plugin(pki: dict[str, Path]) -> PluginProcess:
    return PluginProcess(
        free_port(), "--cert", str(pki["server_cert"]), "--key", str(pki["server_key"])
    )


def test_tls_plugin_is_reached_through_the_test_ca(pki: dict[str, Path]) -> None:
    plugin = PluginProcess(
        free_port(), "--cert", str(pki["server_cert"]), "--key", str(pki["server_key"])
    )
    try:
        backend = {"endpoint": f"https://127.0.0.1:{plugin.port}", "ca_cert_path": str(pki["ca"])}
        with _kbs(backend) as client:
            _attested(client)
            reply = client.get("/kbs/v0/external/echo/echo/tls")
    finally:
        plugin.stop()
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.content)["path"] == ["echo", "tls"]


def test_tls_plugin_with_a_certificate_from_another_ca_is_refused(pki: dict[str, Path]) -> None:
    plugin = PluginProcess(
        free_port(), "--cert", str(pki["server_cert"]), "--key", str(pki["server_key"])
    )
    try:
        backend = {
            "endpoint": f"https://127.0.0.1:{plugin.port}",
            "ca_cert_path": str(pki["other_ca"]),
        }
        with _kbs(backend) as client:
            reply = client.get("/kbs/v0/external/echo/echo")
    finally:
        plugin.stop()
    assert reply.status_code == 503, reply.text


def _mtls_plugin(pki: dict[str, Path]) -> PluginProcess:
    return PluginProcess(
        free_port(),
        "--cert",
        str(pki["server_cert"]),
        "--key",
        str(pki["server_key"]),
        "--client-ca",
        str(pki["ca"]),
    )


def test_mtls_plugin_accepts_the_kbs_client_certificate(pki: dict[str, Path]) -> None:
    plugin = _mtls_plugin(pki)
    try:
        backend = {
            "endpoint": f"https://127.0.0.1:{plugin.port}",
            "ca_cert_path": str(pki["ca"]),
            "client_cert_path": str(pki["client_cert"]),
            "client_key_path": str(pki["client_key"]),
        }
        with _kbs(backend) as client:
            _attested(client)
            reply = client.get("/kbs/v0/external/echo/echo/mtls")
    finally:
        plugin.stop()
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.content)["path"] == ["echo", "mtls"]


def test_mtls_plugin_refuses_a_kbs_without_client_certificate(pki: dict[str, Path]) -> None:
    plugin = _mtls_plugin(pki)
    try:
        backend = {"endpoint": f"https://127.0.0.1:{plugin.port}", "ca_cert_path": str(pki["ca"])}
        with _kbs(backend) as client:
            reply = client.get("/kbs/v0/external/echo/echo")
    finally:
        plugin.stop()
    assert reply.status_code == 503, reply.text


@pytest.mark.parametrize("name", UPSTREAM_CONFIGS)
def test_upstream_external_plugin_config_loads(name: str) -> None:
    config = load_config(vector("kbs", "test-config", name))
    (plugin,) = config.plugins
    assert plugin.name == "external"


def test_upstream_integration_config_with_explicit_tls_mode_loads() -> None:
    document = tomllib.loads(vector("kbs", "test-config", "external-plugin-test.toml").read_text())
    # its [admin] is the legacy `type = ...` form, refused on its own (docs/configuration.md)
    document["admin"] = {"authorization_mode": "InsecureAllowAll"}
    config = parse_config(document)
    assert [plugin.name for plugin in config.plugins] == ["sample", "external"]


def test_https_backend_without_ca_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="ca_cert_path"):
        kbs_config(
            plugins=[{"name": "external", "backends": [{"name": "a", "endpoint": "https://h:1"}]}]
        )


def test_duplicate_backend_names_are_refused_at_load() -> None:
    backend = {"name": "a", "endpoint": "http://h:1"}
    with pytest.raises(ConfigError, match="duplicate"):
        kbs_config(plugins=[{"name": "external", "backends": [backend, backend]}])


def test_missing_ca_file_stops_start_up(tmp_path: Path) -> None:
    backend = {"endpoint": "https://127.0.0.1:1", "ca_cert_path": str(tmp_path / "absent.pem")}
    with pytest.raises(ConfigError, match="cannot read ca_cert_path"), _kbs(backend):
        pass

"""The ``nebula-ca`` plugin: a real ``kbs`` process, a guest attesting with the SDK, and
Debian's ``nebula-cert`` signing and then checking the node certificate the guest receives."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from kbs_process import kbs_client, open_kbs_config, running_kbs
from keybroker.client.rcar import KbsClient
from ports import free_port
from system_tools import require

pytestmark = pytest.mark.e2e

CREDENTIAL = "/kbs/v0/nebula-ca/credential"


def _config(tmp_path: Path, port: int, work_dir: Path) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[[plugins]]
name = "nebula-ca"
work_dir = "{work_dir}"

[plugins.self_signed_ca]
name = "Test mesh CA"
duration = "100h"
""",
        )
    )
    return config


def _nebula_cert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require("nebula-cert", "nebula")), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _guest(url: str) -> tuple[KbsClient, dict[str, str]]:
    client = KbsClient(url)
    return client, {"Authorization": f"Bearer {client.attest()}"}


def _credential(url: str, params: dict[str, str]) -> dict[str, bytes]:
    client, headers = _guest(url)
    try:
        reply = httpx.get(f"{url}{CREDENTIAL}", params=params, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        sealed = reply.json()
        assert "ciphertext" in sealed and "node_key" not in reply.text  # a JWE, not plain
        document = json.loads(client.tee_key.decrypt(sealed))
    finally:
        client.close()
    # upstream's serde writes Vec<u8> as an array of byte values
    return {key: bytes(document[key]) for key in ("node_crt", "node_key", "ca_crt")}


# Credentials for names starting "pod-" only: the policy sees the plugin and the query.
POLICY = """package policy

import rego.v1

default allow := false

allow if {
    data.plugin == "nebula-ca"
    data["resource-path"] == ["credential"]
    startswith(data.query.name, "pod-")
}
"""


def _allow_pods(url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.rego"
    policy.write_text(POLICY)
    allowed = kbs_client(
        "--url", url, "config", "set-resource-policy", "--policy-file", str(policy)
    )
    assert allowed.returncode == 0, allowed.stderr


def test_an_attested_guest_gets_a_credential_nebula_cert_verifies(tmp_path: Path) -> None:
    port, work_dir = free_port(), tmp_path / "nebula-ca"
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(_config(tmp_path, port, work_dir))], tmp_path, url):
        _allow_pods(url, tmp_path)
        credential = _credential(
            url,
            {
                "name": "pod-a",
                "ip": "10.9.8.7/21",
                "duration": "10h",
                "groups": "server,ssh",
                "subnets": "10.20.0.0/16",
            },
        )
        assert not list(work_dir.glob("credential-*"))  # the per-request directory is gone
    assert credential["ca_crt"] == (work_dir / "ca" / "ca.crt").read_bytes()
    assert credential["node_key"].startswith(b"-----BEGIN NEBULA X25519 PRIVATE KEY-----")
    (tmp_path / "ca.crt").write_bytes(credential["ca_crt"])
    (tmp_path / "node.crt").write_bytes(credential["node_crt"])
    verified = _nebula_cert(
        "verify", "-ca", str(tmp_path / "ca.crt"), "-crt", str(tmp_path / "node.crt")
    )
    assert verified.returncode == 0, verified.stderr
    printed = _nebula_cert("print", "-json", "-path", str(tmp_path / "node.crt"))
    assert printed.returncode == 0, printed.stderr
    details = json.loads(printed.stdout)["details"]
    assert details["name"] == "pod-a"
    assert details["ips"] == ["10.9.8.7/21"]
    assert details["groups"] == ["server", "ssh"]
    assert details["subnets"] == ["10.20.0.0/16"]
    assert "PRIVATE KEY" not in (tmp_path / "kbs.log").read_text()


def test_an_imported_ca_signs_the_credentials(tmp_path: Path) -> None:
    work_dir = tmp_path / "nebula-ca"
    (work_dir / "ca").mkdir(parents=True)
    created = _nebula_cert(
        "ca",
        "-name",
        "Imported CA",
        "-out-crt",
        str(work_dir / "ca" / "ca.crt"),
        "-out-key",
        str(work_dir / "ca" / "ca.key"),
    )
    assert created.returncode == 0, created.stderr
    imported = (work_dir / "ca" / "ca.crt").read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(_config(tmp_path, port, work_dir))], tmp_path, url):
        _allow_pods(url, tmp_path)
        credential = _credential(url, {"name": "pod-b", "ip": "10.9.8.8/21"})
    assert credential["ca_crt"] == imported  # reused, not replaced by a new self-signed CA
    (tmp_path / "node.crt").write_bytes(credential["node_crt"])
    (tmp_path / "ca.crt").write_bytes(imported)
    verified = _nebula_cert(
        "verify", "-ca", str(tmp_path / "ca.crt"), "-crt", str(tmp_path / "node.crt")
    )
    assert verified.returncode == 0, verified.stderr


def test_bad_requests_are_refused_and_the_resource_policy_is_enforced(tmp_path: Path) -> None:
    port, work_dir = free_port(), tmp_path / "nebula-ca"
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(_config(tmp_path, port, work_dir))], tmp_path, url):
        _allow_pods(url, tmp_path)
        client, headers = _guest(url)
        try:
            for params in (
                {"name": "pod-c", "ip": "10.9.8.300/21"},  # not an IPv4 address
                {"name": "pod-c", "ip": "10.9.8.7"},  # no network prefix
                {"name": "pod-c", "ip": "10.9.8.7/21", "subnets": "10.0.0.0/99"},
                {"name": "p" * 254, "ip": "10.9.8.7/21"},  # oversized name
            ):
                reply = httpx.get(f"{url}{CREDENTIAL}", params=params, headers=headers)
                assert reply.status_code == 400, (params, reply.text)
            assert httpx.get(f"{url}/kbs/v0/nebula-ca/ca", headers=headers).status_code == 404
            assert (
                httpx.post(f"{url}{CREDENTIAL}?name=a&ip=10.0.0.1/8", headers=headers).status_code
                == 405
            )

            # a well-formed request the resource policy refuses
            other = {"name": "laptop", "ip": "10.9.8.7/21"}
            reply = httpx.get(f"{url}{CREDENTIAL}", params=other, headers=headers)
            assert reply.status_code == 403, reply.text
            assert "PolicyDeny" in reply.text
            good = {"name": "pod-c", "ip": "10.9.8.7/21"}
            denied = kbs_client("--url", url, "config", "set-resource-policy", "--deny-all")
            assert denied.returncode == 0, denied.stderr
            reply = httpx.get(f"{url}{CREDENTIAL}", params=good, headers=headers)
            assert reply.status_code == 403, reply.text
            # and without a token at all
            assert httpx.get(f"{url}{CREDENTIAL}", params=good).status_code == 401
        finally:
            client.close()

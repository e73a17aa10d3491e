"""An operator with ``kbs-client config`` against two real ``kbs`` replicas sharing PostgreSQL:
tenant resource policies (set through one replica, enforced by the other), a tenant admin
confined by the regex ACL, and reading back, listing and deleting attestation policies and
reference values."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from databases import fresh_postgres_database
from kbs_process import kbs_client, running_kbs
from keybroker.attestation.policy import builtin_attestation_policy
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

TENANT_A_ACL = r"^/kbs/v0/(resource/tenant-a/[^/]+/[^/]+|resource-policy/tenant-a(/[^/]+)?)$"
CUSTOM_POLICY = 'package policy\ndefault trust_claims := {"executables": 77}\n'


@dataclass
class Replicas:
    urls: list[str]
    workdir: Path
    home: dict[str, str]
    tenant_a_token: Path

    def cli(
        self, replica: int, *args: str, token: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``kbs-client --url <replica> config [--admin-token-file] <args>``."""
        chosen = ["--admin-token-file", str(token)] if token else []
        return kbs_client("--url", self.urls[replica], "config", *chosen, *args, env=self.home)

    def guest(self, replica: int, path: str) -> subprocess.CompletedProcess[str]:
        return kbs_client("--url", self.urls[replica], "get-resource", "--path", path)


def _config(workdir: Path, port: int, db: str, signer: Path, admin_key: Path) -> Path:
    config = workdir / f"kbs-{port}.toml"
    config.write_text(
        f"""[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[admin]
authorization_mode = "AuthenticatedAuthorization"
[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "ops", public_key_uri = "{admin_key}" }}]
[admin.authorization.regex_acl]
acls = [
    {{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }},
    {{ role = "tenant-a-admin", allowed_endpoints = '{TENANT_A_ACL}' }},
]

[attestation_service]
type = "coco_as_builtin"
[attestation_service.attestation_token_broker.signer]
key_path = "{signer}"

[storage_backend]
storage_type = "Postgres"
[storage_backend.backends.postgres]
db = "{db}"
host = "127.0.0.1"
port = 5432

[[plugins]]
name = "resource"
type = "KvStorage"

[audit]
path = "{workdir / f"audit-{port}.log"}"
fsync = "never"
"""
    )
    return config


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("policy-admin")
    home = {"HOME": str(workdir)}
    assert kbs_client("admin", "keygen", env=home).returncode == 0
    key, public = workdir / ".trustee" / "admin-key.pem", workdir / ".trustee" / "admin-key.pub.pem"
    for role, out in (("admin", "admin-token"), ("tenant-a-admin", "tenant-a-token")):
        minted = kbs_client(
            "admin", "token", "--key", str(key), "--role", role, "--issuer", "ops",
            "--out", str(workdir / ".trustee" / out), env=home,
        )  # fmt: skip
        assert minted.returncode == 0, minted.stderr
    signer = workdir / "token-signer.pem"
    signer.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer.chmod(0o600)
    with ExitStack() as stack:
        db = stack.enter_context(fresh_postgres_database())
        urls = []
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = _config(workdir, port, db, signer, public)
            stack.enter_context(
                running_kbs(["-c", str(config)], workdir, url, log_name=f"kbs-{port}.log")
            )
            urls.append(url)
        yield Replicas(urls, workdir, home, workdir / ".trustee" / "tenant-a-token")


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("kbs-client: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_tenant_policies_from_the_cli_across_replicas(replicas: Replicas) -> None:
    secret = replicas.workdir / "secret"
    secret.write_bytes(b"tenant-a secret")
    for path in ("tenant-a/key/one", "default/key/one"):
        _ok(replicas.cli(0, "set-resource", "--path", path, "--resource-file", str(secret)))
    _ok(replicas.cli(0, "set-resource-policy", "--allow-all", "--prefix", "tenant-a"))
    assert _ok(replicas.cli(1, "get-resource-policy", "--prefix", "tenant-a")) == builtin_policy(
        "allow_all"
    )
    assert _ok(replicas.cli(1, "get-resource-policy")) == builtin_policy("default")
    assert _ok(replicas.cli(1, "list-resource-policies")).split() == [
        "resource-policy",
        "tenant-a",
    ]
    # tenant-a's policy releases to this sample guest; the global default policy does not
    released = _ok(replicas.guest(1, "tenant-a/key/one"))
    assert base64.b64decode(released) == b"tenant-a secret"
    _refused(replicas.guest(1, "default/key/one"), "denied by policy")
    # a more specific prefix, set through one replica, decides at once on the other
    _ok(replicas.cli(1, "set-resource-policy", "--deny-all", "--prefix", "tenant-a/key"))
    _refused(replicas.guest(0, "tenant-a/key/one"), "denied by policy")
    deleted = replicas.cli(0, "delete-resource-policy", "--prefix", "tenant-a/key")
    assert "the next matching policy applies" in deleted.stderr
    assert base64.b64decode(_ok(replicas.guest(1, "tenant-a/key/one"))) == b"tenant-a secret"
    _refused(replicas.cli(0, "get-resource-policy", "--prefix", "tenant-a/key"), "404")
    _refused(replicas.cli(0, "set-resource-policy", "--allow-all", "--prefix", "a/../b"))


def test_tenant_admin_is_confined_to_its_prefix(replicas: Replicas) -> None:
    token = replicas.tenant_a_token
    secret = replicas.workdir / "mine"
    secret.write_bytes(b"mine")
    allowed: list[tuple[str, ...]] = [
        ("set-resource", "--path", "tenant-a/key/two", "--resource-file", str(secret)),
        ("set-resource-policy", "--allow-all", "--prefix", "tenant-a"),
        ("get-resource-policy", "--prefix", "tenant-a"),
    ]
    for args in allowed:
        _ok(replicas.cli(0, *args, token=token))
    refused: list[tuple[str, ...]] = [
        ("set-resource", "--path", "tenant-b/key/two", "--resource-file", str(secret)),
        ("set-resource-policy", "--allow-all", "--prefix", "tenant-b"),
        ("get-resource-policy", "--prefix", "tenant-b"),
        ("delete-resource-policy", "--prefix", "tenant-b"),
        ("set-resource-policy", "--allow-all"),
        ("list-resource-policies",),
        ("list-attestation-policies",),
    ]
    for args in refused:
        _refused(replicas.cli(1, *args, token=token), "role tenant-a-admin not allowed")


def test_attestation_policies_and_reference_values_from_the_cli(replicas: Replicas) -> None:
    policy_file = replicas.workdir / "custom.rego"
    policy_file.write_text(CUSTOM_POLICY)
    assert "default_cpu" in _ok(replicas.cli(0, "list-attestation-policies")).split()
    _ok(
        replicas.cli(
            0, "set-attestation-policy", "--id", "custom", "--policy-file", str(policy_file)
        )
    )
    assert "custom" in _ok(replicas.cli(1, "list-attestation-policies")).split()
    assert _ok(replicas.cli(1, "get-attestation-policy", "--id", "custom")) == CUSTOM_POLICY
    deleted = replicas.cli(1, "delete-attestation-policy", "--id", "custom")
    assert _ok(deleted) == "" and "attestation policy custom deleted" in deleted.stderr
    _refused(replicas.cli(0, "get-attestation-policy", "--id", "custom"), "no attestation policy")
    _ok(replicas.cli(0, "set-attestation-policy", "--policy-file", str(policy_file)))  # default_cpu
    restored = replicas.cli(0, "delete-attestation-policy", "--id", "default_cpu")
    assert "the shipped default applies again" in restored.stderr
    shipped = builtin_attestation_policy("default_cpu")
    assert _ok(replicas.cli(1, "get-attestation-policy", "--id", "default_cpu")) == shipped
    _refused(replicas.cli(0, "get-attestation-policy", "--id", "../x"), "invalid attestation")

    _ok(replicas.cli(0, "set-sample-reference-value", "svn", "1"))
    _ok(replicas.cli(0, "set-sample-reference-value", "launch_digest", "abc"))
    assert _ok(replicas.cli(1, "list-reference-values")).split() == ["launch_digest", "svn"]
    _ok(replicas.cli(1, "delete-reference-value", "--id", "svn"))
    assert _ok(replicas.cli(0, "list-reference-values")).split() == ["launch_digest"]
    _refused(replicas.cli(0, "delete-reference-value", "--id", "svn"), "no reference value")

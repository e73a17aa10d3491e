"""Upstream's passport e2e with real processes: KBS1 (HTTPS, CA-signed token signer, admin JWT)
attests; KBS2 (plain HTTP, no attestation service, trusting the CA) releases to the token."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kbs_process import kbs_client, running_kbs, self_signed_cert
from pki import issue, write
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"\x00passport-protected\xff"


def test_passport_over_https(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    self_signed_cert(tmp_path, "tls")
    assert kbs_client("admin", "keygen", env=home).returncode == 0
    assert (
        kbs_client(
            "admin",
            "token",
            "--key",
            str(tmp_path / ".trustee" / "admin-key.pem"),
            "--role",
            "admin",
            "--issuer",
            "ops",
            env=home,
        ).returncode
        == 0
    )
    ca = issue("passport CA")
    signer = issue("kbs1 token signer", ca, ca=False)
    (tmp_path / "signer.key").write_bytes(signer.key_pem())
    (tmp_path / "signer.key").chmod(0o600)  # kbs refuses a private key others can read
    write(tmp_path / "signer-chain.pem", signer, ca)
    write(tmp_path / "ca.pem", ca)
    rsa_key = rsa.generate_private_key(65537, 2048)
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "secret").write_bytes(SECRET)

    admin_public_key = tmp_path / ".trustee" / "admin-key.pub.pem"
    port1, port2 = free_port(), free_port()
    kbs1_url, kbs2_url = f"https://127.0.0.1:{port1}", f"http://127.0.0.1:{port2}"
    (tmp_path / "kbs1.toml").write_text(f"""
[http_server]
sockets = ["127.0.0.1:{port1}"]
private_key = "{tmp_path / "tls.key"}"
certificate = "{tmp_path / "tls.pem"}"

[attestation_service]
type = "coco_as_builtin"

[attestation_service.attestation_token_broker]
signer = {{ key_path = "{tmp_path / "signer.key"}", cert_path = "{tmp_path / "signer-chain.pem"}" }}

[admin]
authorization_mode = "AuthenticatedAuthorization"

[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "ops", public_key_uri = "{admin_public_key}" }}]

[admin.authorization.regex_acl]
acls = [{{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }}]

[audit]
path = "{tmp_path / "kbs1-audit.log"}"
""")
    (tmp_path / "kbs2.toml").write_text(f"""
[http_server]
sockets = ["127.0.0.1:{port2}"]
insecure_http = true

[attestation_service]
type = "none"

[attestation_token]
trusted_certs_paths = ["{tmp_path / "ca.pem"}"]

[admin]
authorization_mode = "InsecureAllowAll"

[audit]
path = "{tmp_path / "kbs2-audit.log"}"
""")
    tls = str(tmp_path / "tls.pem")
    with (
        running_kbs(
            ["-c", str(tmp_path / "kbs1.toml")], tmp_path, kbs1_url, verify=tls, log_name="kbs1.log"
        ),
        running_kbs(["-c", str(tmp_path / "kbs2.toml")], tmp_path, kbs2_url, log_name="kbs2.log"),
    ):
        # an admin call on KBS1 needs the admin JWT (found in ~/.trustee/admin-token)
        policy = kbs_client(
            "--url",
            kbs1_url,
            "--cert-file",
            tls,
            "config",
            "set-resource-policy",
            "--default",
            env=home,
        )
        assert policy.returncode == 0, policy.stderr

        attested = kbs_client(
            "--url",
            kbs1_url,
            "--cert-file",
            tls,
            "attest",
            "--tee-key-file",
            str(tmp_path / "rsa.pem"),
            env=home,
        )
        assert attested.returncode == 0, attested.stderr
        (tmp_path / "token").write_text(attested.stdout)

        for args in (
            [
                "set-resource",
                "--path",
                "default/key/one",
                "--resource-file",
                str(tmp_path / "secret"),
            ],
            ["set-resource-policy", "--allow-all"],
        ):
            assert kbs_client("--url", kbs2_url, "config", *args, env=home).returncode == 0
        got = kbs_client(
            "--url",
            kbs2_url,
            "get-resource",
            "--path",
            "default/key/one",
            "--attestation-token",
            str(tmp_path / "token"),
            "--tee-key-file",
            str(tmp_path / "rsa.pem"),
            env=home,
        )
        assert got.returncode == 0, got.stderr
        assert base64.b64decode(got.stdout) == SECRET

        assert (
            httpx.post(
                f"{kbs2_url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"}
            ).status_code
            == 404
        )
        # on HTTPS the session cookie is Secure, HttpOnly, SameSite=Strict, and has no Path (as
        # upstream: it defaults to the request's directory, so a proxy's prefix keeps working)
        reply = httpx.post(
            f"{kbs1_url}/kbs/v0/auth",
            verify=ssl.create_default_context(cafile=tls),
            json={"version": "0.4.0", "tee": "sample"},
        )
        cookie = reply.headers["set-cookie"].lower()
        assert all(part in cookie for part in ("secure", "httponly", "samesite=strict"))
        assert "path=" not in cookie
        # and the HTTPS listener does not speak plain HTTP, so the cookie cannot leak there
        with pytest.raises(httpx.HTTPError):
            httpx.get(
                f"http://127.0.0.1:{port1}/kbs/v0/resource/default/key/one",
                cookies={"kbs-session-id": reply.cookies["kbs-session-id"]},
                timeout=5,
            )

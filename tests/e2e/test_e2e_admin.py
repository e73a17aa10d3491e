"""The operator's path to an authenticated admin API: keygen, config, token, role ACLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbs_process import kbs_client, running_kbs
from ports import free_port

pytestmark = pytest.mark.e2e


def test_operator_keygen_token_and_acls(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert kbs_client("admin", "keygen", env=home).returncode == 0
    public_key = tmp_path / ".trustee" / "admin-key.pub.pem"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs.toml"
    config.write_text(
        f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[admin]
authorization_mode = "AuthenticatedAuthorization"

[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "ops", public_key_uri = "{public_key}" }}]

[admin.authorization.regex_acl]
acls = [
    {{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }},
    {{ role = "policy-editor", allowed_endpoints = "^/kbs/v0/resource-policy$" }},
]
"""
    )
    (tmp_path / "secret").write_bytes(b"s")
    key = str(tmp_path / ".trustee" / "admin-key.pem")
    with running_kbs(["-c", str(config)], tmp_path, url):
        anonymous = kbs_client(
            "--url", url, "config", "set-resource-policy", "--allow-all", env=home
        )
        assert anonymous.returncode == 1 and "401" in anonymous.stderr

        minted = kbs_client(
            "admin", "token", "--key", key, "--role", "admin", "--issuer", "ops", env=home
        )
        assert minted.returncode == 0 and minted.stdout == ""  # never printed unless asked
        ok = kbs_client(
            "--url",
            url,
            "config",
            "set-resource",
            "--path",
            "a/b/c",
            "--resource-file",
            str(tmp_path / "secret"),
            env=home,
        )
        assert ok.returncode == 0, ok.stderr

        editor = tmp_path / "editor-token"
        assert (
            kbs_client(
                "admin",
                "token",
                "--key",
                key,
                "--role",
                "policy-editor",
                "--issuer",
                "ops",
                "--out",
                str(editor),
                env=home,
            ).returncode
            == 0
        )
        as_editor = {**home, "KBS_ADMIN_TOKEN_FILE": str(editor)}
        denied = kbs_client(
            "--url",
            url,
            "config",
            "set-resource",
            "--path",
            "a/b/c",
            "--resource-file",
            str(tmp_path / "secret"),
            env=as_editor,
        )
        assert denied.returncode == 1 and "role policy-editor not allowed" in denied.stderr
        allowed = kbs_client(
            "--url", url, "config", "set-resource-policy", "--deny-all", env=as_editor
        )
        assert allowed.returncode == 0, allowed.stderr

        wrong_issuer = kbs_client(
            "admin", "token", "--key", key, "--role", "admin", "--out", "-", env=home
        )
        assert wrong_issuer.stdout.count(".") == 2  # printed because asked with --out -
        (tmp_path / "bad").write_text(wrong_issuer.stdout)
        refused = kbs_client(
            "--url",
            url,
            "config",
            "--admin-token-file",
            str(tmp_path / "bad"),
            "set-resource-policy",
            "--deny-all",
            env=home,
        )
        assert refused.returncode == 1 and "cannot verify token" in refused.stderr

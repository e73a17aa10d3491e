"""``kbs-client`` as a new operator meets it: a missing command is named with the choices, TLS
mistakes come with what to try, a refused admin call says where the token was looked for,
and ``| head`` ends quietly. Real ``kbs`` processes on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kbs_process import BIN, kbs_client, open_kbs_config, running_kbs, self_signed_cert
from ports import free_port

pytestmark = pytest.mark.e2e


def test_config_without_a_command_lists_the_commands(tmp_path: Path) -> None:
    done = kbs_client("config", cwd=tmp_path)
    assert done.returncode == 2
    assert "admin_command" not in done.stderr
    listed = done.stderr[done.stderr.index("{") + 1 : done.stderr.index("}")].split(",")
    assert listed[0] == "set-resource"
    assert {"evaluate-policy", "audit-log", "recent-attestations"} <= set(listed)


def test_tls_mistakes_suggest_the_ca_file_or_the_other_scheme(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "tls", "127.0.0.1")
    https_port, http_port = free_port(), free_port()
    (tmp_path / "https.toml").write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{https_port}"]\n'
        f'certificate = "{cert}"\nprivate_key = "{key}"\n\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n'
    )
    (tmp_path / "http.toml").write_text(open_kbs_config(http_port, ""))
    https_url, http_url = f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}"
    with (
        running_kbs(["-c", str(tmp_path / "https.toml")], tmp_path, https_url, verify=str(cert)),
        running_kbs(["-c", str(tmp_path / "http.toml")], tmp_path, http_url, log_name="h.log"),
    ):
        untrusted = kbs_client("--url", https_url, "attest", cwd=tmp_path)
        assert untrusted.returncode == 1 and "--cert-file" in untrusted.stderr
        plain_as_tls = kbs_client("--url", f"http://127.0.0.1:{https_port}", "attest")
        assert plain_as_tls.returncode == 1 and "is it https://?" in plain_as_tls.stderr
        tls_as_plain = kbs_client("--url", f"https://127.0.0.1:{http_port}", "attest")
        assert tls_as_plain.returncode == 1 and "plain http://" in tls_as_plain.stderr
        trusted = kbs_client("--url", https_url, "--cert-file", str(cert), "attest")
        assert trusted.returncode == 0, trusted.stderr


def test_an_admin_call_without_a_token_says_where_it_looked(tmp_path: Path) -> None:
    port = free_port()
    public_key = tmp_path / "admin.pub.pem"
    public_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "kbs.toml").write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n\n'
        '[admin]\nauthorization_mode = "AuthenticatedAuthorization"\n\n'
        "[admin.authentication.bearer_jwt]\n"
        f'identity_providers = [{{ issuer = "ops", public_key_uri = "{public_key}" }}]\n\n'
        "[admin.authorization.regex_acl]\n"
        'acls = [{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }]\n'
    )
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url):
        done = kbs_client(
            "--url",
            url,
            "config",
            "delete-resource",
            "--path",
            "a/b/c",
            env={"HOME": str(tmp_path)},
        )
    assert done.returncode == 1
    assert "--admin-token-file" in done.stderr and "~/.trustee/admin-token" in done.stderr


def test_piping_a_large_resource_into_head_ends_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "kbs.toml").write_text(
        open_kbs_config(port, '[attestation_service]\ntype = "coco_as_builtin"\n')
    )
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "big").write_bytes(b"x" * (2 * 1024 * 1024))
    with running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url):
        for args in (
            ["set-resource", "--path", "default/big/one", "--resource-file", str(tmp_path / "big")],
            ["set-resource-policy", "--allow-all"],
        ):
            assert kbs_client("--url", url, "config", *args).returncode == 0
        # kbs-client ... | head -c 16, without a shell
        client = subprocess.Popen(
            [str(BIN / "kbs-client"), "--url", url, "get-resource", "--path", "default/big/one"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert client.stdout is not None and client.stderr is not None
        head = subprocess.run(
            ["head", "-c", "16"], stdin=client.stdout, capture_output=True, timeout=120, check=True
        )
        client.stdout.close()  # only head reads it; once head has gone, writes break the pipe
        errors = client.stderr.read().decode()
        assert client.wait(timeout=120) == 141
    assert len(head.stdout) == 16
    assert "Traceback" not in errors and "BrokenPipeError" not in errors

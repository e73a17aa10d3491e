"""Secrets in AWS Secrets Manager: a real ``kbs`` process, ``kbs-client`` as the guest, and
moto's server as a STAND-IN for AWS (a separate process over HTTP; tests/standins/aws_secrets.py).

The KBS gets its AWS credentials the standard way (environment variables) and nothing about AWS
but upstream's two keys in its config file.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kbs_process import kbs_client, open_kbs_config, running_kbs
from ports import free_port
from standins.aws_secrets import REGION, MotoServer, aws_env

pytestmark = pytest.mark.e2e

BINARY = b"\x00aws-held secret\xff" * 20
STRING = "string secret: ünïcode"


def _config(tmp_path: Path, port: int, endpoint_url: str) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[[plugins]]
name = "resource"
storage_backend_type = "Aws"
region = "{REGION}"
endpoint_url = "{endpoint_url}"
timeout = 1
max_attempts = 2
""",
        )
    )
    return config


def _get(url: str, path: str) -> tuple[int, str, str]:
    done = kbs_client("--url", url, "get-resource", "--path", path)
    return done.returncode, done.stdout, done.stderr


def test_guest_release_missing_and_unreachable(tmp_path: Path) -> None:
    moto = MotoServer(tmp_path / "moto.log")
    moto.start()
    try:
        admin = moto.admin(tmp_path)
        admin.create_secret(Name="wrapped-key", SecretBinary=BINARY)
        admin.create_secret(Name="db-password", SecretString=STRING)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = aws_env(tmp_path)
        with running_kbs(["-c", str(_config(tmp_path, port, moto.url))], tmp_path, url, env=env):
            allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
            assert allow.returncode == 0, allow.stderr

            code, out, err = _get(url, "default/key/wrapped-key")
            assert code == 0, err
            assert base64.b64decode(out.strip()) == BINARY
            # the repository and type are ignored, as upstream: only the tag names the secret
            code, out, err = _get(url, "other/kind/db-password")
            assert code == 0, err
            assert base64.b64decode(out.strip()) == STRING.encode()

            code, _, err = _get(url, "default/key/absent")
            assert code == 1 and "404" in err

            stored = kbs_client(
                "--url",
                url,
                "config",
                "set-resource",
                "--path",
                "default/key/new",
                "--resource-file",
                str(_config(tmp_path, port, moto.url)),
            )
            assert stored.returncode == 1 and "405" in stored.stderr

            moto.stop()  # AWS unreachable
            code, _, err = _get(url, "default/key/wrapped-key")
            assert code == 1 and "503" in err
    finally:
        moto.stop()

    log = (tmp_path / "kbs.log").read_text()
    assert "aws-held secret" not in log and "ünïcode" not in log
    assert env["AWS_SECRET_ACCESS_KEY"] not in log

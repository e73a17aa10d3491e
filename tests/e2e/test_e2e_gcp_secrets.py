"""Secrets in GCP Secret Manager: a real ``kbs`` process, ``kbs-client`` as the guest, and the
Secret Manager and OAuth token endpoint STAND-IN over real HTTP (tests/standins/gcp_secrets.py).

The KBS gets its Google credentials the standard way (``GOOGLE_APPLICATION_CREDENTIALS`` naming a
service-account key file that this test generates) and nothing about GCP but upstream's two keys
in its config file.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kbs_process import kbs_client, open_kbs_config, running_kbs
from ports import free_port
from standins.gcp_secrets import PROJECT, GcpStandIn, ServiceAccount, adc_env, gcp_stand_in

pytestmark = pytest.mark.e2e

BINARY = b"\x00gcp-held secret\xff" * 20
STRING = "string secret: ünïcode"


def _config(tmp_path: Path, port: int, endpoint_url: str) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[[plugins]]
name = "resource"
storage_backend_type = "Gcp"
project_id = "{PROJECT}"
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


def _env(gcp: GcpStandIn, tmp_path: Path, account: ServiceAccount) -> dict[str, str]:
    return adc_env(account.key_file(tmp_path / "sa.json", gcp.token_uri), tmp_path)


def test_guest_release_missing_throttled_expired_and_unreachable(tmp_path: Path) -> None:
    with gcp_stand_in() as gcp:
        gcp.state.add_secret("wrapped-key", BINARY)
        gcp.state.add_secret("db-password", STRING.encode())
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = _env(gcp, tmp_path, gcp.account)
        config = _config(tmp_path, port, gcp.server.url)
        with running_kbs(["-c", str(config)], tmp_path, url, env=env):
            allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
            assert allow.returncode == 0, allow.stderr

            code, out, err = _get(url, "default/key/wrapped-key")
            assert code == 0, err
            assert base64.b64decode(out.strip()) == BINARY
            # the repository and type are ignored, as upstream: only the tag names the secret
            code, out, err = _get(url, "other/kind/db-password")
            assert code == 0, err
            assert base64.b64decode(out.strip()) == STRING.encode()
            assert gcp.state.token_calls == 1  # one token, cached across requests

            code, _, err = _get(url, "default/key/absent")
            assert code == 1 and "404" in err

            gcp.state.expire_access_tokens()  # the KBS's cached token expires at Google
            code, out, err = _get(url, "default/key/wrapped-key")
            assert code == 0, err
            assert base64.b64decode(out.strip()) == BINARY
            assert gcp.state.token_calls == 2 and gcp.state.unauthenticated == 1

            gcp.state.throttle = True
            code, _, err = _get(url, "default/key/wrapped-key")
            assert code == 1 and "503" in err
            gcp.state.throttle = False

            stored = kbs_client(
                "--url",
                url,
                "config",
                "set-resource",
                "--path",
                "default/key/new",
                "--resource-file",
                str(config),
            )
            assert stored.returncode == 1 and "405" in stored.stderr

            gcp.server.stop()  # Google unreachable
            code, _, err = _get(url, "default/key/wrapped-key")
            assert code == 1 and "503" in err
        tokens = list(gcp.state.access_tokens)

    log = (tmp_path / "kbs.log").read_text()
    assert "gcp-held secret" not in log and "ünïcode" not in log
    assert tokens and not any(token in log for token in tokens)
    assert "PRIVATE KEY" not in log


def test_wrong_service_account_key_is_unavailable(tmp_path: Path) -> None:
    """The token endpoint refuses the KBS's key (rotated away, or never this account's)."""
    with gcp_stand_in() as gcp:
        gcp.state.add_secret("wrapped-key", BINARY)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        impostor = ServiceAccount(gcp.account.email)
        env = _env(gcp, tmp_path, impostor)
        with running_kbs(
            ["-c", str(_config(tmp_path, port, gcp.server.url))], tmp_path, url, env=env
        ):
            allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
            assert allow.returncode == 0, allow.stderr
            code, out, err = _get(url, "default/key/wrapped-key")
            assert code == 1 and "503" in err
            assert "gcp-held secret" not in out
        assert gcp.state.token_calls >= 1 and gcp.state.access_calls == 0

    log = (tmp_path / "kbs.log").read_text()
    assert "invalid_grant" in log  # the operator is told why
    assert "gcp-held secret" not in log and "PRIVATE KEY" not in log

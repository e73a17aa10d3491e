"""Secrets kept in an HSM (SoftHSM2): a real ``kbs`` process, ``kbs-client`` as the user.

The test session initializes its own SoftHSM token (tests/softhsm.py); the KBS runs with the
resource plugin on the ``pkcs11`` backend and upstream's ``pkcs11`` plugin beside it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pkcs11
import pytest

from kbs_process import kbs_client, open_kbs_config, running_kbs
from ports import free_port
from softhsm import LABEL, SoftHsm

pytestmark = pytest.mark.e2e

SECRET = b"\x00hsm-held secret\xff" * 40


def _config(tmp_path: Path, port: int, softhsm: SoftHsm) -> Path:
    config = tmp_path / "kbs-config.toml"
    hsm = f'module = "{softhsm.module}"\nslot_index = 0\npin = "{softhsm.pin}"'
    config.write_text(
        open_kbs_config(
            port,
            f"""[[plugins]]
name = "resource"
storage_backend_type = "pkcs11"
{hsm}

[[plugins]]
name = "pkcs11"
{hsm}
""",
        )
    )
    config.chmod(0o600)  # it holds the PIN
    return config


def test_secrets_round_trip_through_the_http_api(tmp_path: Path, softhsm: SoftHsm) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(SECRET)
    with running_kbs(
        ["-c", str(_config(tmp_path, port, softhsm))], tmp_path, url, env=softhsm.env()
    ):
        stored = kbs_client(
            "--url",
            url,
            "config",
            "set-resource",
            "--path",
            "hsm/keys/one",
            "--resource-file",
            str(secret_file),
        )
        assert stored.returncode == 0, stored.stderr
        allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
        assert allow.returncode == 0, allow.stderr
        got = kbs_client("--url", url, "get-resource", "--path", "hsm/keys/one")
        assert got.returncode == 0, got.stderr
        assert base64.b64decode(got.stdout.strip()) == SECRET

        # upstream's plugin path reaches the same token
        plugin = httpx.post(f"{url}/kbs/v0/pkcs11/resource/hsm/keys/two", content=b"two")
        assert plugin.status_code == 200, plugin.text
        assert httpx.post(f"{url}/kbs/v0/pkcs11/wrap-key", content=b"x").status_code == 404

        missing = kbs_client("--url", url, "get-resource", "--path", "hsm/keys/absent")
        assert missing.returncode == 1 and "404" in missing.stderr

    log = (tmp_path / "kbs.log").read_text()
    assert softhsm.pin not in log and SECRET.decode("latin-1") not in log

    # the secrets are objects on the token, labelled with their paths
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=LABEL)
    try:
        session = token.open(user_pin=softhsm.pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        session = token.open()
    with session:
        labels = {
            str(item[pkcs11.Attribute.LABEL])
            for item in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        }
    assert {"hsm/keys/one", "hsm/keys/two"} <= labels

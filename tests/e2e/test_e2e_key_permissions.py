"""``kbs`` refuses to start with a private key file other users can read, unless told."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kbs_process import kbs, running_kbs, self_signed_cert
from ports import free_port

pytestmark = pytest.mark.e2e


def _tls_config(tmp_path: Path, port: int, *, top: str = "", signer: bool = False) -> Path:
    self_signed_cert(tmp_path, "tls", "127.0.0.1")
    broker = ""
    if signer:
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (tmp_path / "signer.key").write_bytes(key)
        (tmp_path / "signer.key").chmod(0o600)
        broker = (
            '[attestation_service]\ntype = "coco_as_builtin"\n\n'
            "[attestation_service.attestation_token_broker]\n"
            f'signer = {{ key_path = "{tmp_path / "signer.key"}" }}\n'
        )
    config = tmp_path / "kbs.toml"
    config.write_text(
        f"{top}\n"
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\n'
        f'private_key = "{tmp_path / "tls.key"}"\ncertificate = "{tmp_path / "tls.pem"}"\n\n'
        f'[admin]\nauthorization_mode = "DenyAll"\n\n{broker}'
    )
    return config


@pytest.mark.parametrize("key", ["tls.key", "signer.key"])
def test_world_readable_private_key_is_refused_at_start_up(tmp_path: Path, key: str) -> None:
    config = _tls_config(tmp_path, free_port(), signer=True)
    (tmp_path / key).chmod(0o644)
    started = kbs("-c", str(config))
    assert started.returncode == 1
    assert started.stderr.startswith("kbs: error: ")
    assert f"{tmp_path / key} is accessible to other users (mode 0644)" in started.stderr
    assert "insecure_key_permissions = true" in started.stderr
    assert "Traceback" not in started.stderr


def test_world_readable_private_key_starts_with_the_insecure_setting(tmp_path: Path) -> None:
    port = free_port()
    config = _tls_config(tmp_path, port, top="insecure_key_permissions = true")
    (tmp_path / "tls.key").chmod(0o604)
    url = f"https://127.0.0.1:{port}"
    with running_kbs(["-c", str(config)], tmp_path, url, verify=str(tmp_path / "tls.pem")):
        pass
    assert "insecure_key_permissions = true" in (tmp_path / "kbs.log").read_text()


def test_group_readable_private_key_starts_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    config = _tls_config(tmp_path, port)
    (tmp_path / "tls.key").chmod(0o640)
    url = f"https://127.0.0.1:{port}"
    with running_kbs(["-c", str(config)], tmp_path, url, verify=str(tmp_path / "tls.pem")):
        pass
    assert "is accessible to its group (mode 0640)" in (tmp_path / "kbs.log").read_text()

"""``grpc-as`` and ``restful-as`` refuse private keys other users can read, as ``kbs`` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.cli.grpc_as import build_service, restful_main
from keybroker.cli.grpc_as import main as grpc_as_main
from keybroker.config import load_as_config

COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "grpc-as": grpc_as_main,
    "restful-as": restful_main,
}


def _key(path: Path, mode: int) -> Path:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def _config(tmp_path: Path, signer: Path, top: str = "") -> Path:
    config = tmp_path / "as.toml"
    config.write_text(f'{top}\n[attestation_token_broker]\nsigner = {{ key_path = "{signer}" }}\n')
    return config


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_world_readable_signer_key_is_refused_by_the_attestation_service(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = _key(tmp_path / "signer.key", 0o644)
    assert COMMANDS[command](["-c", str(_config(tmp_path, signer)), "-s", "127.0.0.1:1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"{command}: error: ")
    assert f"{signer} is accessible to other users (mode 0644)" in error


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_world_readable_tls_key_is_refused_by_the_attestation_service(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = _key(tmp_path / "signer.key", 0o600)
    tls_key = _key(tmp_path / "tls.key", 0o604)
    arguments = ["-c", str(_config(tmp_path, signer)), "-s", "127.0.0.1:1"]
    arguments += ["-t", str(tmp_path / "tls.pem"), "-k", str(tls_key)]
    assert COMMANDS[command](arguments) == 1
    assert f"{tls_key} is accessible to other users (mode 0604)" in capsys.readouterr().err


def test_insecure_key_permissions_lets_the_service_be_built(tmp_path: Path) -> None:
    signer = _key(tmp_path / "signer.key", 0o644)
    config = load_as_config(_config(tmp_path, signer, top="insecure_key_permissions = true"))
    assert build_service(config).signer.jwks()["keys"]

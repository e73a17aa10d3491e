"""A Vault stand-in served on loopback, and the production backend pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keybroker.kbs.tls import self_signed_certificate
from keybroker.storage.vault import VaultConfig, VaultSecretBackend
from standins.vault import RunningStandIn, VaultStandIn


@contextmanager
def vault_stand_in(tmp_path: Path, *, tls: bool = False) -> Iterator[RunningStandIn]:
    certfile = keyfile = None
    if tls:
        key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
        keyfile, certfile = tmp_path / "vault.key", tmp_path / "vault.crt"
        keyfile.write_bytes(key_pem)
        certfile.write_bytes(cert_pem)
    server = RunningStandIn(VaultStandIn(), certfile=certfile, keyfile=keyfile)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def vault_backend(tmp_path: Path, kv_version: int) -> Iterator[VaultSecretBackend]:
    with vault_stand_in(tmp_path) as server:
        config = VaultConfig(
            vault_url=server.url,
            token=server.stand_in.root_token,
            mount_path="secret" if kv_version == 1 else "kv2",
            kv_version=kv_version,  # type: ignore[arg-type]
        )
        yield VaultSecretBackend.from_config(config)

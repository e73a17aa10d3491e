"""An Aliyun KMS stand-in on loopback HTTPS, and the production backend pointed at it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from keybroker.kbs.tls import self_signed_certificate
from keybroker.storage.aliyun_kms import (
    AliyunKmsConfig,
    AliyunKmsSecretBackend,
    client_key_document,
)
from standins.aliyun_kms import KmsStandIn
from standins.server import ServedApp

KEY_ID = "KAAP.standin-0001"


@contextmanager
def kms_stand_in(tmp_path: Path) -> Iterator[tuple[ServedApp, KmsStandIn, bytes]]:
    """(server, stand-in state, instance CA PEM)."""
    key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
    (tmp_path / "kms.key").write_bytes(key_pem)
    (tmp_path / "kms.crt").write_bytes(cert_pem)
    stand_in = KmsStandIn()
    server = ServedApp(stand_in.app(), certfile=tmp_path / "kms.crt", keyfile=tmp_path / "kms.key")
    server.start()
    try:
        yield server, stand_in, cert_pem
    finally:
        server.stop()


def client_config(
    server: ServedApp, stand_in: KmsStandIn, ca_pem: bytes, **changes: object
) -> AliyunKmsConfig:
    """A fresh client key, registered with the stand-in, and the config that uses it."""
    key = rsa.generate_private_key(65537, 2048)
    stand_in.client_keys[KEY_ID] = key.public_key()
    password = os.urandom(8).hex()
    settings: dict[str, object] = {
        "client_key": client_key_document(key, KEY_ID, password),
        "kms_instance_id": "kst-standin",
        "password": password,
        "cert_pem": ca_pem.decode(),
        "endpoint": f"127.0.0.1:{server.port}",
        "timeout": 2,
        **changes,
    }
    return AliyunKmsConfig.model_validate(settings)


@contextmanager
def aliyun_backend(tmp_path: Path) -> Iterator[tuple[AliyunKmsSecretBackend, KmsStandIn]]:
    with kms_stand_in(tmp_path) as (server, stand_in, ca_pem):
        yield AliyunKmsSecretBackend.from_config(client_config(server, stand_in, ca_pem)), stand_in

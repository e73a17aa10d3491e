"""A Vault stand-in served on loopback, and the production backend pointed at it.

With ``tls=True`` the stand-in serves HTTPS with a certificate for 127.0.0.1 issued by a test CA
of its own: ``vault-ca.crt`` in ``tmp_path`` is the CA to trust, ``vault.crt``/``vault.key`` the
server's pair. ``client_ca`` (a :class:`pki.Issued` CA) makes it require client certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.storage.vault import VaultConfig, VaultSecretBackend
from pki import Issued, issue
from standins.vault import RunningStandIn, VaultStandIn


def issue_leaf(name: str, issuer: Issued, *, server: bool) -> Issued:
    """An end-entity certificate for ``name`` (an IP address when it parses as one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alternative = x509.DNSName(name)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(key, cert)


@contextmanager
def vault_stand_in(
    tmp_path: Path, *, tls: bool = False, client_ca: Issued | None = None
) -> Iterator[RunningStandIn]:
    certfile = keyfile = client_ca_file = None
    if tls:
        ca = issue("Vault stand-in test CA")
        leaf = issue_leaf("127.0.0.1", ca, server=True)
        (tmp_path / "vault-ca.crt").write_bytes(ca.pem())
        keyfile, certfile = tmp_path / "vault.key", tmp_path / "vault.crt"
        keyfile.write_bytes(leaf.key_pem())
        certfile.write_bytes(leaf.pem())
    if client_ca is not None:
        client_ca_file = tmp_path / "client-ca.crt"
        client_ca_file.write_bytes(client_ca.pem())
    server = RunningStandIn(
        VaultStandIn(), certfile=certfile, keyfile=keyfile, client_ca=client_ca_file
    )
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
        backend = VaultSecretBackend.from_config(config)
        try:
            yield backend
        finally:
            backend.close()

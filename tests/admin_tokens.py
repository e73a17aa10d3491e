"""Test helpers: admin key pairs, minted admin JWTs, and a local HTTPS server with a test CA."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from keybroker.protocol.jws import jwk_of, sign_jwt

NOW = 1_800_000_000


def write_public_pem(
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, path: Path
) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def mint(
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    *,
    kid: str | None = None,
    **claims: object,
) -> str:
    """An admin JWT; a claim given as None is left out."""
    body: dict[str, object] = {"exp": NOW + 600, "role": "admin", "iss": "admin1-issuer"}
    body.update(claims)
    payload = {name: value for name, value in body.items() if value is not None}
    return sign_jwt(payload, key, header={"kid": kid} if kid else None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, object]) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hs256_token(secret: bytes, claims: dict[str, object]) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(mac)}"


def jwks_document(key: ec.EllipticCurvePrivateKey, kid: str) -> bytes:
    return json.dumps({"keys": [{**jwk_of(key.public_key()), "kid": kid}]}).encode()


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=2))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@contextmanager
def https_server(tmp_path: Path, documents: dict[str, bytes]) -> Iterator[tuple[str, Path]]:
    """Serve ``documents`` (path -> body) over HTTPS on loopback; yield (base URL, CA file)."""
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("keybroker test CA", ca_key, None)
    leaf = _certificate("127.0.0.1", server_key, ("keybroker test CA", ca_key))
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "srv.pem", tmp_path / "srv.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = documents.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca_file
    finally:
        server.shutdown()
        server.server_close()

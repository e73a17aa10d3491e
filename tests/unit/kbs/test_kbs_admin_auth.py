"""Admin security: bearer-JWT identity providers and role ACLs, through the real HTTP API."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from starlette.testclient import TestClient

from admin_tokens import NOW, hs256_token, https_server, jwks_document, mint, unsigned_token
from admin_tokens import write_public_pem as pem
from conftest import FakeClock, kbs_config
from keybroker.config import KbsConfig
from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.kbs.admin_auth import https_fetch
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy

POLICY = base64.urlsafe_b64encode(builtin_policy("allow_all").encode()).decode().rstrip("=")
OPERATIONS = {
    "set resource policy": ("/kbs/v0/resource-policy", {"policy": POLICY}),
    "set attestation policy": (
        "/kbs/v0/attestation-policy",
        {"type": "rego", "policy_id": "x", "policy": POLICY},
    ),
    "set resource": ("/kbs/v0/resource/a/b/c", None),
}


def _admin_config(
    tmp_path: Path,
    admin_key: ed25519.Ed25519PrivateKey,
    *,
    acls: list[dict[str, str]] | None = None,
    **idp: object,
) -> KbsConfig:
    return kbs_config(
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {
                "bearer_jwt": {
                    "identity_providers": [
                        {
                            "issuer": "admin1-issuer",
                            "public_key_uri": str(pem(admin_key, tmp_path / "admin1.pem")),
                            **idp,
                        }
                    ]
                }
            },
            "authorization": {
                "regex_acl": {
                    "acls": acls
                    or [
                        {"role": "admin", "allowed_endpoints": "^/kbs/v0/.+$"},
                        {"role": "reader", "allowed_endpoints": "^/kbs/v0/resource-policy$"},
                    ]
                }
            },
        }
    )


@pytest.fixture
def admin_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def client(tmp_path: Path, admin_key: ed25519.Ed25519PrivateKey) -> Iterator[TestClient]:
    app = create_app(_admin_config(tmp_path, admin_key), clock=FakeClock(NOW))
    with TestClient(app) as test_client:
        yield test_client


def _post(client: TestClient, operation: str, token: str | None) -> tuple[int, str]:
    path, body = OPERATIONS[operation]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is None:
        reply = client.post(path, content=b"secret", headers=headers)
    else:
        reply = client.post(path, json=body, headers=headers)
    detail = reply.json().get("detail", "") if reply.content else ""
    return reply.status_code, detail


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_admin_matrix(
    tmp_path: Path, client: TestClient, admin_key: ed25519.Ed25519PrivateKey, operation: str
) -> None:
    assert _post(client, operation, mint(admin_key))[0] == 200
    other_key = ed25519.Ed25519PrivateKey.generate()
    status, detail = _post(client, operation, mint(other_key))
    assert status == 401 and "cannot verify token with any of the issuers" in detail
    status, detail = _post(client, operation, mint(admin_key, role="reader"))
    if operation == "set resource policy":
        assert status == 200  # the reader role may set exactly this endpoint
    else:
        assert status == 403 and "role reader not allowed" in detail
    with TestClient(create_app(kbs_config(admin={"authorization_mode": "DenyAll"}))) as deny:
        status, detail = _post(deny, operation, mint(admin_key))
        assert status == 403 and "DenyAll" in detail


def test_missing_bearer_token_is_401(client: TestClient) -> None:
    assert _post(client, "set resource", None)[0] == 401


def test_alg_none_rejected(client: TestClient) -> None:
    token = unsigned_token({"exp": NOW + 600, "role": "admin", "iss": "admin1-issuer"})
    assert _post(client, "set resource", token)[0] == 401


def test_hs256_signed_with_public_key_rejected(
    client: TestClient, admin_key: ed25519.Ed25519PrivateKey
) -> None:
    public_bytes = admin_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hs256_token(public_bytes, {"exp": NOW + 600, "role": "admin", "iss": "admin1-issuer"})
    assert _post(client, "set resource", token)[0] == 401


def test_expired_token_rejected_beyond_leeway(
    client: TestClient, admin_key: ed25519.Ed25519PrivateKey
) -> None:
    assert _post(client, "set resource", mint(admin_key, exp=NOW - 30))[0] == 200  # leeway
    status, detail = _post(client, "set resource", mint(admin_key, exp=NOW - 61))
    assert status == 401 and "expired" in detail


def test_token_without_exp_rejected(
    client: TestClient, admin_key: ed25519.Ed25519PrivateKey
) -> None:
    status, detail = _post(client, "set resource", mint(admin_key, exp=None))
    assert status == 401 and "no exp" in detail


def test_token_without_role_rejected(
    client: TestClient, admin_key: ed25519.Ed25519PrivateKey
) -> None:
    status, detail = _post(client, "set resource", mint(admin_key, role=None))
    assert status == 401 and "role" in detail


def test_wrong_issuer_rejected(client: TestClient, admin_key: ed25519.Ed25519PrivateKey) -> None:
    status, detail = _post(client, "set resource", mint(admin_key, iss="someone-else"))
    assert status == 401 and "issuer" in detail


def test_wrong_audience_rejected(tmp_path: Path, admin_key: ed25519.Ed25519PrivateKey) -> None:
    config = _admin_config(tmp_path, admin_key, audience="kbs-prod")
    with TestClient(create_app(config, clock=FakeClock(NOW))) as client:
        assert _post(client, "set resource", mint(admin_key, aud="kbs-prod"))[0] == 200
        assert _post(client, "set resource", mint(admin_key, aud=["x", "kbs-prod"]))[0] == 200
        status, detail = _post(client, "set resource", mint(admin_key, aud="kbs-test"))
        assert status == 401 and "audience" in detail


def test_kid_not_in_jwks_rejected(tmp_path: Path) -> None:
    signer = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(jwks_document(signer, "key-1"))
    config = _jwks_config(str(jwks))
    with TestClient(create_app(config, clock=FakeClock(NOW))) as client:
        assert _post(client, "set resource", mint(signer, kid="key-1"))[0] == 200
        status, detail = _post(client, "set resource", mint(signer, kid="key-2"))
        assert status == 401 and "key-2" in detail


def _jwks_config(uri: str) -> KbsConfig:
    return kbs_config(
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {
                "bearer_jwt": {
                    "identity_providers": [{"issuer": "admin1-issuer", "jwk_set_uri": uri}]
                }
            },
            "authorization": {
                "regex_acl": {"acls": [{"role": "admin", "allowed_endpoints": "^/kbs/v0/.+$"}]}
            },
        }
    )


def test_jwks_over_https_and_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signer = ec.generate_private_key(ec.SECP256R1())
    documents: dict[str, bytes] = {"/keys": jwks_document(signer, "k1")}
    with https_server(tmp_path, documents) as (base, ca_file):
        documents["/.well-known/openid-configuration"] = json.dumps(
            {"issuer": base, "jwks_uri": f"{base}/keys"}
        ).encode()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        for uri in (f"{base}/keys", f"{base}/.well-known/openid-configuration"):
            config = _jwks_config(uri)
            clock = FakeClock(NOW)
            with TestClient(create_app(config, clock=clock)) as client:
                assert _post(client, "set resource", mint(signer, kid="k1")) == (200, "")
                # a rotated key is picked up when a token names a kid the cache lacks, but
                # unknown kids do not make the KBS re-fetch more than once per interval
                rotated = ec.generate_private_key(ec.SECP256R1())
                documents["/keys"] = jwks_document(rotated, "k2")
                assert _post(client, "set resource", mint(rotated, kid="k2"))[0] == 401
                clock.advance(31)
                assert _post(client, "set resource", mint(rotated, kid="k2"))[0] == 200
                documents["/keys"] = jwks_document(signer, "k1")


def test_issuer_url_without_a_key_set_is_followed_to_its_discovery_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As upstream: a URL that holds no JWK set (an issuer's home page, such as Intel Trust
    Authority's portal URL in upstream's configs) names an issuer; its keys are found through
    ``<url>/.well-known/openid-configuration``."""
    signer = ec.generate_private_key(ec.SECP256R1())
    documents: dict[str, bytes] = {"/portal": b"<html>not a key set</html>"}
    with https_server(tmp_path, documents) as (base, ca_file):
        documents["/portal/.well-known/openid-configuration"] = json.dumps(
            {"issuer": base, "jwks_uri": f"{base}/certs"}
        ).encode()
        documents["/certs"] = jwks_document(signer, "k1")
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        with TestClient(create_app(_jwks_config(f"{base}/portal"), clock=FakeClock(NOW))) as client:
            assert _post(client, "set resource", mint(signer, kid="k1")) == (200, "")
        documents["/portal/.well-known/openid-configuration"] = b"{}"
        with TestClient(create_app(_jwks_config(f"{base}/portal"), clock=FakeClock(NOW))) as client:
            status, detail = _post(client, "set resource", mint(signer, kid="k1"))
        assert status == 503 and "has no jwks_uri" in detail


def test_identity_provider_down_is_a_clear_error_within_timeout(tmp_path: Path) -> None:
    with https_server(tmp_path, {}) as (base, _):
        dead = base  # the server stops when the block ends
    config = _jwks_config(f"{dead}/keys")
    start = time.monotonic()
    with TestClient(create_app(config, clock=FakeClock(NOW))) as client:
        status, detail = _post(
            client, "set resource", mint(ec.generate_private_key(ec.SECP256R1()), kid="k")
        )
    assert status == 503 and "cannot fetch" in detail
    assert time.monotonic() - start < 60  # no hang; generous for a loaded 2-core machine


def test_acl_pattern_matching_too_much_rejected_at_startup(
    tmp_path: Path, admin_key: ed25519.Ed25519PrivateKey
) -> None:
    for pattern, message in [
        ("^/kbs/v0/resource/.+$|^/.*$", "outside the KBS API"),
        ("^/kbs.*$", "outside the KBS API"),
        ("/kbs/v0/.+", r"must start with \^/kbs"),
        ("^/kbs/v0/(unclosed$", "not a valid regex"),
    ]:
        config = _admin_config(
            tmp_path, admin_key, acls=[{"role": "a", "allowed_endpoints": pattern}]
        )
        with pytest.raises(ConfigError, match=message):
            create_app(config)


def test_configuration_mistakes_stop_startup(tmp_path: Path) -> None:
    no_idp = kbs_config(
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {"bearer_jwt": {}},
            "authorization": {"regex_acl": {}},
        }
    )
    with pytest.raises(ConfigError, match="at least one"):
        create_app(no_idp)
    with pytest.raises(ConfigError, match="cannot read key material"):
        create_app(_jwks_config(str(tmp_path / "absent.json")))
    with pytest.raises(ConfigError, match="legacy"):
        kbs_config(admin={"auth_public_key": "/etc/kbs/admin.pem"})


def test_fetch_failure_is_service_unavailable() -> None:
    with pytest.raises(ServiceUnavailableError, match="cannot fetch"):
        asyncio.run(https_fetch("https://127.0.0.1:9/keys"))


class _SlowDocuments(dict[str, bytes]):
    """The identity provider's documents; once ``slow``, served only when the test releases
    them."""

    def __init__(self, documents: dict[str, bytes]) -> None:
        super().__init__(documents)
        self.slow = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, key: str, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        if self.slow:
            self.entered.set()
            self.release.wait(timeout=30)  # a generous no-hang bound
        return super().get(key, default)


def test_slow_identity_provider_does_not_block_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a JWKS fetch hangs on the provider, the KBS keeps answering other requests."""
    signer, rotated = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    documents = _SlowDocuments({"/keys": jwks_document(signer, "k1")})
    with https_server(tmp_path, documents) as (base, ca_file):
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        clock = FakeClock(NOW)
        with TestClient(create_app(_jwks_config(f"{base}/keys"), clock=clock)) as client:
            # the provider rotates its key and turns slow: a token naming the new kid makes
            # the KBS fetch the set again while serving the request
            documents["/keys"] = jwks_document(rotated, "k2")
            documents.slow = True
            clock.advance(31)
            admin: list[tuple[int, str]] = []
            request = threading.Thread(
                target=lambda: admin.append(_post(client, "set resource", mint(rotated, kid="k2")))
            )
            request.start()
            try:
                assert documents.entered.wait(timeout=60)  # the fetch reached the provider
                health = client.get("/healthz")
                answered_during_fetch = not admin
            finally:
                documents.release.set()
                request.join(timeout=60)
    assert health.status_code == 200
    assert answered_during_fetch
    assert admin == [(200, "")]

"""Background-check flow through the real app: attest, policy, JWE release, admin modes."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from starlette.testclient import TestClient

from conftest import Kbs, kbs_config
from json_shapes import at, obj
from keybroker.client.admin import AdminClient
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.errors import ConfigError, KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.kbs.server import INSTANCE_ENV, instance_id
from keybroker.protocol.jws import decode_unverified

SECRET = bytes(range(256)) + b"the secret"


def _guest(kbs: Kbs, key: TeeKey | None = None) -> KbsClient:
    return KbsClient("http://testserver", http=kbs.client, tee_key=key)


def _admin(kbs: Kbs) -> AdminClient:
    return AdminClient("http://testserver", http=kbs.client)


def test_default_policy_denies_sample_guest(kbs: Kbs) -> None:
    _admin(kbs).set_resource("default/key/one", SECRET)
    with pytest.raises(KbsRejectedError) as denied:
        _guest(kbs).get_resource("default/key/one")
    assert denied.value.http_status == 403
    assert denied.value.remote_type.endswith("/PolicyDeny")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), id="ec-p521"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa-oaep-256"),
    ],
)
def test_allow_all_releases_exact_bytes(kbs: Kbs, key: object) -> None:
    _admin(kbs).set_resource("default/key/one", SECRET)
    _admin(kbs).set_resource_policy(builtin_policy("allow_all"))
    tee_key = TeeKey(key())  # type: ignore[operator]
    assert _guest(kbs, tee_key).get_resource("default/key/one") == SECRET


def test_released_jwe_decrypts_with_independent_library(kbs: Kbs) -> None:
    _admin(kbs).set_resource("default/key/one", SECRET)
    _admin(kbs).set_resource_policy(builtin_policy("allow_all"))
    private = ec.generate_private_key(ec.SECP256R1())
    guest = _guest(kbs, TeeKey(private))
    guest.attest()
    reply = kbs.client.get("/kbs/v0/resource/default/key/one")
    assert reply.status_code == 200
    document = reply.json()
    assert sorted(document) == ["ciphertext", "encrypted_key", "iv", "protected", "tag"]
    header = json.loads(base64.urlsafe_b64decode(document["protected"] + "=="))
    assert list(header) == ["alg", "enc", "epk"]
    assert list(header["epk"]) == ["crv", "kty", "x", "y"]
    token = jw_jwe.JWE()
    token.deserialize(json.dumps(document), key=jw_jwk.JWK.from_pyca(private))
    assert token.payload == SECRET


def test_token_carries_runtime_data_claims(kbs: Kbs) -> None:
    guest = _guest(kbs)
    token = guest.attest()
    header, claims = decode_unverified(token)
    assert header["alg"] == "ES256" and "jwk" in header
    cpu0 = obj(at(claims, "submods", "cpu0"))
    evidence = cpu0["ear.veraison.annotated-evidence"]
    assert at(evidence, "runtime_data_claims", "tee-pubkey") == guest.tee_key.public_jwk()
    assert "nonce" in obj(at(evidence, "runtime_data_claims"))
    assert at(evidence, "sample", "svn") == "1"
    assert cpu0["ear.status"] == "contraindicated"  # no reference values exist yet
    assert claims["exp"] == claims["iat"] + 300  # type: ignore[operator]


def test_missing_resource_is_404(kbs: Kbs) -> None:
    _admin(kbs).set_resource_policy(builtin_policy("allow_all"))
    with pytest.raises(KbsRejectedError) as missing:
        _guest(kbs).get_resource("default/key/absent")
    assert missing.value.http_status == 404


def test_delete_resource(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource_policy(builtin_policy("allow_all"))
    admin.set_resource("default/key/one", SECRET)
    admin.delete_resource("default/key/one")
    with pytest.raises(KbsRejectedError) as gone:
        _guest(kbs).get_resource("default/key/one")
    assert gone.value.http_status == 404
    with pytest.raises(KbsRejectedError) as again:
        admin.delete_resource("default/key/one")
    assert again.value.http_status == 404


def test_resource_request_without_token_is_401(kbs: Kbs) -> None:
    reply = kbs.client.get("/kbs/v0/resource/default/key/one")
    assert reply.status_code == 401
    assert reply.json()["type"].endswith("/TokenNotFound")


def test_forged_bearer_token_is_401(kbs: Kbs) -> None:
    other = KbsClient("http://testserver", http=kbs.client)
    token = other.attest()
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    kbs.client.cookies.clear()
    reply = kbs.client.get(
        "/kbs/v0/resource/default/key/one", headers={"Authorization": f"Bearer {forged}"}
    )
    assert reply.status_code == 401


def test_resource_policy_listing_and_bad_policy(kbs: Kbs) -> None:
    assert _admin(kbs).list_resource_policies() == ["resource-policy"]
    bad = base64.urlsafe_b64encode(b"package policy\nallow if {").decode().rstrip("=")
    reply = kbs.client.post("/kbs/v0/resource-policy", json={"policy": bad})
    assert reply.status_code == 400
    assert reply.json()["type"].endswith("/ParsePolicyError")


def test_padded_base64_policy_accepted(kbs: Kbs) -> None:
    padded = base64.urlsafe_b64encode(builtin_policy("deny_all").encode()).decode()
    assert kbs.client.post("/kbs/v0/resource-policy", json={"policy": padded}).status_code == 200


def test_deny_all_admin_refuses_writes(clock: object) -> None:
    config = kbs_config(admin={"authorization_mode": "DenyAll"})
    with TestClient(create_app(config)) as client:
        reply = client.post("/kbs/v0/resource/default/key/one", content=b"x")
        assert reply.status_code == 403
        assert "DenyAll" in reply.json()["detail"]
        assert client.post("/kbs/v0/resource-policy", json={"policy": ""}).status_code == 403


def test_healthz(kbs: Kbs) -> None:
    response = kbs.client.get("/healthz")
    assert response.text == "ok"
    assert response.headers["Keybroker-Instance"] == "in-process"


def test_instance_id_is_the_environment_s_or_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INSTANCE_ENV, raising=False)
    first, second = instance_id(), instance_id()
    assert re.fullmatch(r"[0-9a-f]{16}", first) and first != second
    monkeypatch.setenv(INSTANCE_ENV, "kbs-0.pod_a")
    assert instance_id() == "kbs-0.pod_a"


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "-leading", "new\nline", "tab\there"])
def test_malformed_instance_id_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    """It goes into a response header: nothing that could split or forge one."""
    monkeypatch.setenv(INSTANCE_ENV, bad)
    with pytest.raises(ConfigError, match="KBS_INSTANCE_ID must be"):
        instance_id()


def test_unknown_plugin_is_404(kbs: Kbs) -> None:
    reply = kbs.client.get("/kbs/v0/no-such-plugin/x")
    assert reply.status_code == 404
    assert reply.json()["type"].endswith("/PluginNotFound")


def test_sample_plugin_is_admin_only() -> None:
    config = kbs_config(
        admin={"authorization_mode": "DenyAll"},
        plugins=[{"name": "sample", "item": "value1"}, {"name": "resource"}],
    )
    with TestClient(create_app(config)) as client:
        assert client.get("/kbs/v0/sample/anything").status_code == 403
    with TestClient(create_app(kbs_config(plugins=[{"name": "sample", "item": "v"}]))) as client:
        reply = client.get("/kbs/v0/sample/anything")
        assert reply.status_code == 200 and reply.text == "sample plugin response"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_sample_plugin_answers_as_upstream_for_every_method(method: str) -> None:
    with TestClient(create_app(kbs_config(plugins=[{"name": "sample", "item": "v"}]))) as client:
        reply = client.request(method, "/kbs/v0/sample/a/b", content=b"ignored")
    assert reply.status_code == 200
    assert reply.content == b"sample plugin response"  # not a JWE: the answer is not sealed
    assert reply.headers["content-type"].startswith("text/plain")


def test_sample_plugin_without_item_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="item"):
        kbs_config(plugins=[{"name": "sample"}])

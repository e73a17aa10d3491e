"""``[attestation_service] type = "intel_ta"``: the KBS app against the ITA stand-in over HTTPS.

The KBS's production client (``keybroker.attestation.intel_ta``) talks real HTTP to the
stand-in; the guest is the SDK's ``KbsClient`` with a recorded-quote attester. Each attack on
the token ITA answers gets its own test.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.testclient import TestClient

from conftest import kbs_config
from json_shapes import at, obj
from keybroker.client.admin import AdminClient
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.errors import ConfigError, KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.protocol.canonical import jcs
from keybroker.protocol.jws import decode_unverified, jwk_of, public_key_from_jwk
from keybroker.protocol.models import Tee
from ports import free_port
from recorded_quotes import RecordedQuoteAttester
from standins.ita import ItaEndpoints, ItaStandIn, running_ita_standin

SECRET = b"released after Intel Trust Authority said so"
RESOURCE = "default/key/ita"


@dataclass
class Ita:
    stand_in: ItaStandIn
    endpoints: ItaEndpoints


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ita]:
    stand_in = ItaStandIn()
    with running_ita_standin(tmp_path_factory.mktemp("ita"), stand_in) as endpoints:
        yield Ita(stand_in, endpoints)


@pytest.fixture
def ita(served: Ita, monkeypatch: pytest.MonkeyPatch) -> Ita:
    """The served stand-in with its knobs reset, trusted through ``SSL_CERT_FILE``."""
    stand_in = served.stand_in
    stand_in.tamper, stand_in.sign_with, stand_in.unsigned = None, None, False
    stand_in.delay, stand_in.fail_with, stand_in.algorithm = 0.0, None, "PS384"
    stand_in.policies.clear()
    stand_in.requests.clear()
    stand_in.api_keys_seen.clear()
    monkeypatch.setenv("SSL_CERT_FILE", str(served.endpoints.ca_path))
    return served


@contextmanager
def _app(ita: Ita, **settings: Any) -> Iterator[TestClient]:
    endpoints = ita.endpoints
    service = {
        "type": "intel_ta",
        "base_url": endpoints.base_url,
        "api_key": endpoints.api_key,
        # as upstream's configs: the portal URL, its key set found by discovery
        "certs_file": endpoints.base_url,
        **settings,
    }
    config = kbs_config(
        attestation_service=service,
        attestation_token={"trusted_jwk_sets": [endpoints.base_url]},
    )
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_resource(RESOURCE, SECRET)
        yield client


def _guest(client: TestClient, tee: Tee = Tee.TDX, key: TeeKey | None = None) -> KbsClient:
    return KbsClient(
        "http://testserver", http=client, attester=RecordedQuoteAttester(tee), tee_key=key
    )


def _refusal(client: TestClient, tee: Tee = Tee.TDX) -> KbsRejectedError:
    with pytest.raises(KbsRejectedError) as refused:
        _guest(client, tee).attest()
    return refused.value


# --- the flow ---------------------------------------------------------------------------------


def test_ita_background_check_releases_to_a_tdx_guest(ita: Ita) -> None:
    with _app(ita) as client:
        guest = _guest(client)
        assert guest.get_resource(RESOURCE) == SECRET
    header, claims = decode_unverified(guest.token or "")
    assert header["alg"] == "PS384" and header["kid"] == ita.stand_in.kid
    bound = obj(at(claims, "tdx", "attester_runtime_data"))
    assert bound["tee-pubkey"] == guest.tee_key.public_jwk()
    # what went to ITA: upstream's body, the runtime data as the JCS bytes the quote hashes
    (sent,) = ita.stand_in.requests
    assert sent["policy_ids"] == [] and sent["policy_must_match"] is False
    assert set(sent) == {"policy_ids", "policy_must_match", "tdx"}
    assert base64.b64decode(sent["tdx"]["runtime_data"]) == jcs(bound)
    assert ita.stand_in.api_keys_seen == [ita.endpoints.api_key]


def test_ita_sgx_guest_key_is_found_under_sgx(ita: Ita) -> None:
    with _app(ita) as client:
        guest = _guest(client, Tee.SGX)
        assert guest.get_resource(RESOURCE) == SECRET
    _, claims = decode_unverified(guest.token or "")
    assert "sgx" in claims and "tdx" not in claims


def test_ita_rs256_token_is_accepted(ita: Ita) -> None:
    ita.stand_in.algorithm = "RS256"
    with _app(ita) as client:
        assert _guest(client).get_resource(RESOURCE) == SECRET


def test_ita_hash_negotiation_follows_the_tee(ita: Ita) -> None:
    def auth(client: TestClient, tee: str, offered: list[str]) -> tuple[int, object]:
        body = {
            "version": "0.4.0",
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": offered},
        }
        response = client.post("/kbs/v0/auth", json=body)
        return response.status_code, response.json().get("extra-params")

    with _app(ita) as client:
        assert auth(client, "tdx", ["sha256", "sha384", "sha512"]) == (
            200,
            {"selected-hash-algorithm": "sha512"},
        )
        assert auth(client, "sgx", ["sha384", "sha256"]) == (
            200,
            {"selected-hash-algorithm": "sha256"},
        )
        assert auth(client, "az-tdx-vtpm", ["sha256"])[0] == 200
        assert auth(client, "tdx", ["sha256", "sha384"])[0] == 401
        assert auth(client, "snp", ["sha384"])[0] == 401


def test_ita_policy_ids_are_sent_and_must_match(ita: Ita) -> None:
    ita.stand_in.policies["policy-good"] = lambda claims: True
    with _app(ita, policy_ids=["policy-good"]) as client:
        guest = _guest(client)
        assert guest.get_resource(RESOURCE) == SECRET
    assert ita.stand_in.requests[0]["policy_ids"] == ["policy-good"]
    assert ita.stand_in.requests[0]["policy_must_match"] is True
    _, claims = decode_unverified(guest.token or "")
    assert at(claims, "policy_ids_matched", 0, "id") == "policy-good"


# --- attacks on the token ITA answers ---------------------------------------------------------


def test_ita_token_for_another_nonce_is_refused(ita: Ita) -> None:
    """Regression (the trustee#151 class): upstream never compares the token's runtime data
    with the session, so a token ITA issued for another session would be accepted."""

    def other_session(header: dict[str, Any], claims: dict[str, Any]) -> None:
        claims["tdx"]["attester_runtime_data"]["nonce"] = base64.b64encode(b"\1" * 32).decode()

    ita.stand_in.tamper = other_session
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "another nonce" in refused.detail


def test_ita_token_for_another_tee_pubkey_is_refused(ita: Ita) -> None:
    def other_key(header: dict[str, Any], claims: dict[str, Any]) -> None:
        claims["tdx"]["attester_runtime_data"]["tee-pubkey"] = TeeKey.generate().public_jwk()

    ita.stand_in.tamper = other_key
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "another tee-pubkey" in refused.detail


def test_ita_token_without_runtime_data_is_refused(ita: Ita) -> None:
    ita.stand_in.tamper = lambda header, claims: claims["tdx"].pop("attester_runtime_data")
    with _app(ita) as client:
        assert "tdx.attester_runtime_data" in _refusal(client).detail


def test_ita_expired_token_is_refused(ita: Ita) -> None:
    def expired(header: dict[str, Any], claims: dict[str, Any]) -> None:
        claims["exp"] = claims["iat"] - 10

    ita.stand_in.tamper = expired
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "expired" in refused.detail


def test_ita_token_without_expiry_is_refused(ita: Ita) -> None:
    ita.stand_in.tamper = lambda header, claims: claims.pop("exp")
    with _app(ita) as client:
        assert "no expiry" in _refusal(client).detail


def test_ita_token_with_unknown_kid_is_refused(ita: Ita) -> None:
    ita.stand_in.tamper = lambda header, claims: header.update(kid="not-an-ita-key")
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "not accepted" in refused.detail


def test_ita_token_signed_by_a_key_outside_the_jwks_is_refused(ita: Ita) -> None:
    ita.stand_in.sign_with = rsa.generate_private_key(65537, 3072)  # kid still ITA's
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "signature does not verify" in refused.detail


def test_ita_token_with_its_own_header_jwk_is_refused(ita: Ita) -> None:
    """Upstream's ITA path verifies with a key the token carries; here only the JWK set counts."""
    attacker = rsa.generate_private_key(65537, 3072)
    ita.stand_in.sign_with = attacker
    ita.stand_in.tamper = lambda header, claims: header.update(jwk=jwk_of(attacker.public_key()))
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "its own signer key" in refused.detail


def test_ita_alg_none_token_is_refused(ita: Ita) -> None:
    ita.stand_in.unsigned = True
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "'none'" in refused.detail


def test_ita_policy_id_mismatch_is_refused_by_ita(ita: Ita) -> None:
    ita.stand_in.policies["policy-strict"] = lambda claims: False
    with _app(ita, policy_ids=["policy-strict"]) as client:
        refused = _refusal(client)
    assert refused.http_status == 401
    assert "HTTP 400" in refused.detail and "does not match policy_ids" in refused.detail


def test_ita_token_reporting_unmatched_policies_is_refused(ita: Ita) -> None:
    """ITA issues a token despite unmatched policies when not asked to enforce them; the KBS
    still refuses it unless allow_unmatched_policy."""
    ita.stand_in.tamper = lambda header, claims: claims.update(
        policy_ids_unmatched=[{"id": "policy-strict", "version": "v1"}]
    )
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401 and "policy-strict" in refused.detail


def test_ita_unmatched_policy_is_accepted_when_allowed(ita: Ita) -> None:
    ita.stand_in.policies["policy-strict"] = lambda claims: False
    with _app(ita, policy_ids=["policy-strict"], allow_unmatched_policy=True) as client:
        guest = _guest(client)
        assert guest.get_resource(RESOURCE) == SECRET
    assert ita.stand_in.requests[0]["policy_must_match"] is False


# --- failures of ITA itself -------------------------------------------------------------------


def test_ita_unreachable_is_503(ita: Ita) -> None:
    with _app(ita, base_url=f"https://127.0.0.1:{free_port()}") as client:
        refused = _refusal(client)
    assert refused.http_status == 503 and "unreachable" in refused.detail


def test_ita_slower_than_request_timeout_is_503(ita: Ita) -> None:
    ita.stand_in.delay = 5.0
    with _app(ita, request_timeout=0.3) as client:
        refused = _refusal(client)
    assert refused.http_status == 503 and "timed out" in refused.detail


def test_ita_4xx_is_401_with_its_error(ita: Ita) -> None:
    ita.stand_in.fail_with = (400, "invalid quote: unsupported TEE TCB")
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 401
    assert "HTTP 400: invalid quote: unsupported TEE TCB" in refused.detail


@pytest.mark.parametrize("status", [502, 429, 302])
def test_ita_5xx_rate_limit_or_redirect_is_503(ita: Ita, status: int) -> None:
    ita.stand_in.fail_with = (status, "not the guest's fault")
    with _app(ita) as client:
        refused = _refusal(client)
    assert refused.http_status == 503 and f"answered HTTP {status}" in refused.detail


def test_ita_api_key_never_in_logs_or_responses(ita: Ita, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_key = "wrong-" + ita.endpoints.api_key
    seen: list[str] = []
    with _app(ita, api_key=wrong_key) as client:
        refused = _refusal(client)  # ITA answers 401 to a wrong key
        assert refused.http_status == 401 and "HTTP 401" in refused.detail
        seen.append(refused.detail)
    ita.stand_in.fail_with = (503, "maintenance")
    with _app(ita) as client:
        response = client.post(
            "/kbs/v0/auth", json={"version": "0.4.0", "tee": "tdx", "extra-params": {}}
        )
        seen.append(response.text + str(response.headers))
        seen.append(_refusal(client).detail)
    ita.stand_in.fail_with = None
    with _app(ita) as client:
        assert _guest(client).get_resource(RESOURCE) == SECRET
    assert ita.stand_in.api_keys_seen[0] == wrong_key  # the key did go to ITA, in its header
    for secret in (wrong_key, ita.endpoints.api_key):
        assert secret not in caplog.text
        assert all(secret not in text for text in seen)


def test_ita_base_url_must_be_https(ita: Ita) -> None:
    for url in ("example.io", f"http://127.0.0.1:{free_port()}"):
        with (
            pytest.raises(ConfigError, match="base_url must be an https:// URL"),
            _app(ita, base_url=url),
        ):
            pass


def test_ita_standin_serves_its_documented_nonce_and_key_endpoints(ita: Ita) -> None:
    """The stand-in's own API, as ITA documents it (the KBS does not use the nonce endpoint:
    upstream makes the nonce locally)."""
    verify = ssl.create_default_context(cafile=ita.endpoints.ca_path)
    headers = {"x-api-key": ita.endpoints.api_key, "Accept": "application/json"}
    with httpx.Client(base_url=ita.endpoints.base_url, verify=verify) as http:
        assert (
            http.get("/appraisal/v2/nonce", headers={"Accept": "application/json"}).status_code
            == 401
        )
        nonce = http.get("/appraisal/v2/nonce", headers=headers).json()
        (jwk,) = http.get("/certs").json()["keys"]
        discovery = http.get("/.well-known/openid-configuration").json()
    assert discovery["jwks_uri"] == ita.endpoints.jwks_url and jwk["kid"] == ita.stand_in.kid
    key = public_key_from_jwk(jwk)
    assert isinstance(key, rsa.RSAPublicKey)
    signed = base64.b64decode(nonce["val"]) + base64.b64decode(nonce["iat"])
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    key.verify(base64.b64decode(nonce["signature"]), signed, pss, hashes.SHA384())

"""Named attack tests against the RCAR handshake and the resource endpoint.

Each asserts the exact status and problem type, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any
from urllib.parse import unquote

import pytest
from starlette.testclient import TestClient

from conftest import Kbs, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.kbs.app import create_app, kbs_state
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.models import Tee

AUTH = {"version": "0.4.0", "tee": "sample", "extra-params": {}}


def _auth(client: TestClient) -> str:
    reply = client.post("/kbs/v0/auth", json=AUTH)
    assert reply.status_code == 200, reply.text
    assert reply.json()["extra-params"] == {"selected-hash-algorithm": "sha384"}
    nonce = reply.json()["nonce"]
    assert isinstance(nonce, str) and len(base64.b64decode(nonce)) == 32
    return nonce


def _attestation(
    nonce: str, key: TeeKey, *, bound_nonce: str | None = None, bound_key: TeeKey | None = None
) -> dict[str, Any]:
    """A sample Attestation; the evidence may bind another nonce or key than the one sent."""
    digest = runtime_data_digest(
        runtime_data(bound_nonce or nonce, (bound_key or key).public_jwk(), ""),
        HashAlgorithm.SHA384,
    )
    return {
        "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
        "tee-evidence": {
            "primary_evidence": SampleAttester().evidence(digest),
            "additional_evidence": "",
        },
    }


def _problem(reply: Any, status: int, variant: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["type"] == f"https://github.com/confidential-containers/kbs/errors/{variant}"
    return str(body["detail"])


def test_honest_handshake_succeeds(kbs: Kbs) -> None:
    key = TeeKey.generate()
    nonce = _auth(kbs.client)
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, key))
    assert reply.status_code == 200 and reply.json()["token"].count(".") == 2


def test_a_token_this_kbs_signed_is_remembered_at_attest_and_still_expires(kbs: Kbs) -> None:
    tokens = kbs_state(kbs.client.app).services.tokens
    key = TeeKey.generate()
    nonce = _auth(kbs.client)
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, key))
    token = reply.json()["token"]
    assert tokens.remembered() == 1  # before any GET: no signature check for its own token
    claims = tokens.recall(token)
    assert claims is not None and claims["submods"]  # the token's own claims
    kbs.clock.advance(24 * 3600)  # past the token's lifetime: recalled or not, refused
    kbs.client.cookies.clear()
    bearer = {"Authorization": f"Bearer {token}"}
    reply = kbs.client.get("/kbs/v0/resource/default/key/one", headers=bearer)
    assert "expired" in _problem(reply, 401, "TokenVerifierError")


def test_nonce_from_another_session_rejected(kbs: Kbs) -> None:
    other = TestClient(kbs.client.app)
    stolen_nonce = _auth(other)
    _auth(kbs.client)
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(stolen_nonce, TeeKey.generate()))
    assert "nonce" in _problem(reply, 401, "AttestationError")


def test_attest_without_cookie_rejected(kbs: Kbs) -> None:
    nonce = _auth(kbs.client)
    kbs.client.cookies.clear()
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, TeeKey.generate()))
    assert "cookie" in _problem(reply, 401, "AttestationError")


def test_forged_session_cookie_rejected(kbs: Kbs) -> None:
    nonce = _auth(kbs.client)
    kbs.client.cookies.set("kbs-session-id", "0" * 32, path="/kbs/v0")
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, TeeKey.generate()))
    _problem(reply, 401, "AttestationError")


def test_expired_session_rejected(kbs: Kbs) -> None:
    nonce = _auth(kbs.client)
    kbs.clock.advance(5 * 60 + 1)
    reply = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, TeeKey.generate()))
    assert "expired" in _problem(reply, 401, "AttestationError")


def test_expired_attested_session_no_longer_releases(kbs: Kbs) -> None:
    AdminClient("http://testserver", http=kbs.client).set_resource("a/b/c", b"x")
    AdminClient("http://testserver", http=kbs.client).set_resource_policy(
        builtin_policy("allow_all")
    )
    guest = KbsClient("http://testserver", http=kbs.client)
    guest.attest()
    assert kbs.client.get("/kbs/v0/resource/a/b/c").status_code == 200
    kbs.clock.advance(5 * 60 + 1)
    _problem(kbs.client.get("/kbs/v0/resource/a/b/c"), 401, "TokenNotFound")


def test_nonce_replay_on_same_session_rejected(kbs: Kbs) -> None:
    key = TeeKey.generate()
    nonce = _auth(kbs.client)
    attestation = _attestation(nonce, key)
    assert kbs.client.post("/kbs/v0/attest", json=attestation).status_code == 200
    replay = kbs.client.post("/kbs/v0/attest", json=attestation)
    _problem(replay, 401, "AttestationError")


def test_failed_attempt_consumes_nonce(kbs: Kbs) -> None:
    key = TeeKey.generate()
    nonce = _auth(kbs.client)
    wrong = _attestation(nonce, key, bound_nonce=base64.b64encode(b"x" * 32).decode())
    _problem(kbs.client.post("/kbs/v0/attest", json=wrong), 401, "AttestationError")
    retry = kbs.client.post("/kbs/v0/attest", json=_attestation(nonce, key))
    _problem(retry, 401, "AttestationError")


def test_tee_pubkey_swapped_after_attestation_rejected(kbs: Kbs) -> None:
    """Evidence bound to key A, Attestation message carrying attacker key B."""
    honest, attacker = TeeKey.generate(), TeeKey.generate()
    nonce = _auth(kbs.client)
    swapped = _attestation(nonce, attacker, bound_key=honest)
    detail = _problem(kbs.client.post("/kbs/v0/attest", json=swapped), 401, "AttestationError")
    assert "report_data" in detail


def test_report_data_mismatch_rejected(kbs: Kbs) -> None:
    key = TeeKey.generate()
    nonce = _auth(kbs.client)
    attestation = _attestation(nonce, key)
    attestation["tee-evidence"]["primary_evidence"]["report_data"] = base64.b64encode(
        b"\0" * 48
    ).decode()
    _problem(kbs.client.post("/kbs/v0/attest", json=attestation), 401, "AttestationError")


def test_protocol_version_mismatch_rejected(kbs: Kbs) -> None:
    reply = kbs.client.post("/kbs/v0/auth", json={**AUTH, "version": "0.3.0"})
    assert "KBS Client Protocol Version Mismatch" in _problem(reply, 401, "AttestationError")


def test_unknown_tee_rejected(kbs: Kbs) -> None:
    reply = kbs.client.post("/kbs/v0/auth", json={**AUTH, "tee": "quantum-enclave"})
    _problem(reply, 400, "MalformedRequest")


def test_known_tee_without_verifier_rejected(kbs: Kbs) -> None:
    # a TEE this service has no verifier for (every TEE has one in a full build)
    kbs_state(kbs.client.app).services.attestation._verifiers.pop(Tee.CCA)  # type: ignore[union-attr]
    reply = kbs.client.post("/kbs/v0/auth", json={**AUTH, "tee": "cca"})
    assert "not supported" in _problem(reply, 401, "AttestationError")


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"version": 4}', b""],
    ids=["broken", "array", "wrong-type", "empty"],
)
def test_malformed_json_rejected(kbs: Kbs, body: bytes) -> None:
    reply = kbs.client.post("/kbs/v0/auth", content=body)
    _problem(reply, 400, "MalformedRequest")


def test_malformed_attestation_rejected(kbs: Kbs) -> None:
    _auth(kbs.client)
    reply = kbs.client.post("/kbs/v0/attest", content=b'{"runtime-data": 1}')
    _problem(reply, 400, "MalformedRequest")


def test_missing_extra_params_accepted(kbs: Kbs) -> None:
    reply = kbs.client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
    assert reply.status_code == 200


def test_unsupported_hash_algorithms_rejected(kbs: Kbs) -> None:
    body = {**AUTH, "extra-params": {"supported-hash-algorithms": ["md5"]}}
    _problem(kbs.client.post("/kbs/v0/auth", json=body), 401, "AttestationError")


def test_weak_tee_pubkey_rejected(kbs: Kbs) -> None:
    nonce = _auth(kbs.client)
    attestation = _attestation(nonce, TeeKey.generate())
    attestation["runtime-data"]["tee-pubkey"] = {"kty": "oct", "k": "AAAA", "alg": "A256KW"}
    _problem(kbs.client.post("/kbs/v0/attest", json=attestation), 400, "MalformedRequest")


@pytest.mark.parametrize(
    "path",
    [
        "/kbs/v0/resource/../key/one",
        "/kbs/v0/resource/default/../../etc",
        "/kbs/v0/resource/.hidden/key/one",
        "/kbs/v0/resource/default/key",
        "/kbs/v0/resource/default/key/one/two",
        "/kbs/v0/resource/default%2Fkey/one",
        "/kbs/v0/resource/default/key%2fone/x",
        "/kbs/v0/resource/default/key/%2E%2E",
        "/kbs/v0/resource/default/key/",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_path_traversal_rejected(kbs: Kbs, path: str, method: str) -> None:
    # HTTP clients normalize dot segments; speak ASGI directly to send the raw path.
    status, body = asyncio.run(_raw_request(kbs.client.app, method, path))
    assert status == 404, body
    assert json.loads(body)["type"].endswith("/InvalidRequestPath")


async def _raw_request(app: Any, method: str, raw_path: str) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-length", b"4")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"evil", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def test_oversized_body_rejected(clock: object) -> None:
    config = kbs_config(http_server={"insecure_http": True, "payload_request_size": 1})
    with TestClient(create_app(config)) as client:
        reply = client.post("/kbs/v0/resource/a/b/c", content=b"x" * (1024 * 1024 + 1))
        assert "payload_request_size" in _problem(reply, 413, "PayloadTooLarge")
        chunked = client.post(
            "/kbs/v0/resource/a/b/c", content=iter([b"x" * 600_000, b"y" * 600_000])
        )
        assert "payload_request_size" in _problem(chunked, 413, "PayloadTooLarge")
        assert client.post("/kbs/v0/resource/a/b/c", content=b"x" * 1000).status_code == 200

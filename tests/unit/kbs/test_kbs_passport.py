"""Passport mode: a resource-only KBS that trusts tokens by certificate chain or JWKS."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.testclient import TestClient

from conftest import FakeClock, kbs_config, vector
from keybroker.attestation.signer import TokenSigner
from keybroker.client.admin import AdminClient
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.config import AttestationTokenConfig
from keybroker.errors import ConfigError, KbsRejectedError, TokenVerificationError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.kbs.tokens import TokenVerifier
from keybroker.protocol.jws import jwk_of, public_key_from_jwk, sign_jwt
from keybroker.protocol.x509chain import MAX_CHAIN_LENGTH
from pki import Issued, issue, write

SECRET = b"passport secret"
NOW = 1_800_000_000  # inside the test PKI's validity


def _kbs1(tmp_path: Path, ca: Issued) -> tuple[TestClient, FakeClock]:
    """The attesting KBS, its token signer certified by ``ca``."""
    signer = issue("token-signer", ca, ca=False)
    (tmp_path / "signer.key").write_bytes(signer.key_pem())
    write(tmp_path / "signer-chain.pem", signer, ca)
    clock = FakeClock(NOW)
    config = kbs_config(
        attestation_service={
            "type": "coco_as_builtin",
            "attestation_token_broker": {
                "signer": {
                    "key_path": str(tmp_path / "signer.key"),
                    "cert_path": str(tmp_path / "signer-chain.pem"),
                }
            },
        }
    )
    return TestClient(create_app(config, clock=clock)), clock


def _kbs2(trust: Path, clock: Callable[[], float]) -> TestClient:
    """A resource-only KBS trusting the CA in ``trust``."""
    return TestClient(_kbs2_app(trust, clock))


def _kbs2_app(trust: Path, clock: Callable[[], float]) -> Starlette:
    config = kbs_config(
        attestation_service={"type": "none"},
        attestation_token={"trusted_certs_paths": [str(trust)]},
    )
    return create_app(config, clock=clock)


def _token(kbs1: TestClient, key: TeeKey) -> str:
    return KbsClient("http://kbs1", http=kbs1, tee_key=key).attest()


def test_passport_round_trip_and_404_on_auth(tmp_path: Path) -> None:
    ca = issue("passport CA")
    kbs1, clock = _kbs1(tmp_path, ca)
    key = TeeKey.generate()
    with kbs1, _kbs2(write(tmp_path / "ca.pem", ca), clock) as kbs2:
        token = _token(kbs1, key)
        admin = AdminClient("http://kbs2", http=kbs2)
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://kbs2", http=kbs2, tee_key=key)
        assert guest.get_resource_with_token("default/key/one", token) == SECRET
        assert (
            kbs2.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"}).status_code == 404
        )
        assert kbs2.post("/kbs/v0/attest", json={}).status_code == 404


def test_token_signed_by_untrusted_key_rejected(tmp_path: Path) -> None:
    kbs1, clock = _kbs1(tmp_path, issue("some other CA"))
    with kbs1, _kbs2(write(tmp_path / "ca.pem", issue("passport CA")), clock) as kbs2:
        token = _token(kbs1, TeeKey.generate())
        reply = kbs2.get("/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401
        assert "does not lead to a trusted certificate" in reply.json()["detail"]


def test_token_with_swapped_tee_pubkey_rejected(tmp_path: Path) -> None:
    ca = issue("passport CA")
    kbs1, clock = _kbs1(tmp_path, ca)
    with kbs1, _kbs2(write(tmp_path / "ca.pem", ca), clock) as kbs2:
        token = _token(kbs1, TeeKey.generate())
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        evidence = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
        evidence["runtime_data_claims"]["tee-pubkey"] = TeeKey.generate().public_jwk()
        forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        forged = f"{header}.{forged_payload.decode()}.{signature}"
        reply = kbs2.get("/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {forged}"})
        assert reply.status_code == 401 and "signature" in reply.json()["detail"]


def test_expired_token_rejected(tmp_path: Path) -> None:
    ca = issue("passport CA")
    kbs1, clock = _kbs1(tmp_path, ca)
    with kbs1, _kbs2(write(tmp_path / "ca.pem", ca), clock) as kbs2:
        token = _token(kbs1, TeeKey.generate())
        clock.advance(5 * 60 + 1)
        reply = kbs2.get("/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401 and "expired" in reply.json()["detail"]


def test_alg_none_token_rejected(tmp_path: Path) -> None:
    with _kbs2(write(tmp_path / "ca.pem", issue("passport CA")), FakeClock(NOW)) as kbs2:
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(b'{"exp":9999999999}').rstrip(b"=").decode()
        reply = kbs2.get(
            "/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {header}.{body}."}
        )
        assert reply.status_code == 401


def test_trusted_token_for_policy_denied_tee_is_403(tmp_path: Path) -> None:
    ca = issue("passport CA")
    kbs1, clock = _kbs1(tmp_path, ca)
    key = TeeKey.generate()
    with kbs1, _kbs2(write(tmp_path / "ca.pem", ca), clock) as kbs2:
        AdminClient("http://kbs2", http=kbs2).set_resource("default/key/one", SECRET)
        guest = KbsClient("http://kbs2", http=kbs2, tee_key=key)
        with pytest.raises(KbsRejectedError) as denied:  # default policy: sample TEE denied
            guest.get_resource_with_token("default/key/one", _token(kbs1, key))
        assert denied.value.http_status == 403


def test_resource_only_kbs_without_trust_material_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="could not accept any attestation token"):
        create_app(kbs_config(attestation_service={"type": "none"}))


def test_insecure_header_jwk_checks_the_signature(caplog: pytest.LogCaptureFixture) -> None:
    signer = TokenSigner.ephemeral()
    verifier = TokenVerifier.from_config(
        AttestationTokenConfig(insecure_header_jwk=True), [], clock=lambda: 1.0
    )
    assert "insecure_header_jwk" in caplog.text
    token = signer.sign({"exp": 100})
    assert verifier.verify(token)["exp"] == 100
    head, body, _ = token.split(".")
    with pytest.raises(TokenVerificationError, match="signature"):
        verifier.verify(f"{head}.{body}.{'A' * 86}")


# --- upstream's seven trust scenarios (shared/vectors/kbs/jwk) -------------------------------

SCENARIOS = {"01": True, "02": False, "03": False, "04": False, "05": True, "06": True, "07": True}


@pytest.mark.parametrize(("scenario", "accepted"), sorted(SCENARIOS.items()))
def test_upstream_jwk_trust_scenarios(scenario: str, accepted: bool) -> None:
    folder = vector("kbs", "jwk")
    jwk = json.loads((folder / f"scenario{scenario}-jwk.json").read_text())
    verifier = TokenVerifier.from_config(
        AttestationTokenConfig(trusted_certs_paths=[str(folder / f"scenario{scenario}-trust.pem")]),
        [],
        clock=lambda: float(NOW),
    )
    if accepted:
        assert verifier.trusted_header_key(jwk) == public_key_from_jwk(jwk)
    else:
        with pytest.raises(TokenVerificationError):
            verifier.trusted_header_key(jwk)


def test_token_trusted_by_kid_in_a_jwk_set(tmp_path: Path) -> None:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk_of(issuer_key.public_key()), "kid": "as-1"}]}))
    verifier = TokenVerifier.from_config(
        AttestationTokenConfig(trusted_jwk_sets=[str(jwks)]), [], clock=lambda: 1.0
    )
    token = sign_jwt({"exp": 100, "tee-pubkey": {}}, issuer_key, header={"kid": "as-1"})
    assert verifier.verify(token)["exp"] == 100
    stranger = sign_jwt(
        {"exp": 100}, ec.generate_private_key(ec.SECP256R1()), header={"kid": "as-1"}
    )
    with pytest.raises(TokenVerificationError, match="signature"):
        verifier.verify(stranger)
    unknown = sign_jwt({"exp": 100}, issuer_key, header={"kid": "as-2"})
    with pytest.raises(TokenVerificationError):
        verifier.verify(unknown)


def test_tee_pubkey_found_at_default_and_extra_paths() -> None:
    key = TeeKey.generate().public_jwk()
    default = TokenVerifier([], insecure_header_jwk=True)
    ita_claims = {"tdx": {"attester_runtime_data": {"tee-pubkey": key}}}
    assert default.tee_pubkey(ita_claims).to_jwk() == key  # Intel Trust Authority layout
    custom = TokenVerifier([], insecure_header_jwk=True, extra_teekey_paths=["/custom/guest~1key"])
    assert custom.tee_pubkey({"custom": {"guest/key": key}}).to_jwk() == key
    with pytest.raises(TokenVerificationError, match="no tee-pubkey"):
        default.tee_pubkey({"custom": {"guest/key": key}})


# --- an x5c built to make the certificate path search explode (issue 17) ---------------------


def _same_name_cas_token(count: int) -> str:
    """A token whose x5c is its signer's certificate and ``count`` CAs sharing one name and one
    key, each a valid issuer of every other, none leading to the trusted CA. The token is
    validly signed by the leaf's key: anyone can send it, no trusted key is needed."""
    shared = issue("same-name CA", issuer_name="same-name CA")
    copies = [
        issue("same-name CA", key=shared.key, issuer_name="same-name CA") for _ in range(count - 1)
    ]
    signer = issue("token signer", shared, ca=False)
    x5c = [
        base64.b64encode(c.cert.public_bytes(serialization.Encoding.DER)).decode()
        for c in (signer, shared, *copies)
    ]
    jwk = {**jwk_of(signer.key.public_key()), "x5c": x5c}
    return sign_jwt({"exp": NOW + 600}, signer.key, header={"jwk": jwk})


@pytest.mark.parametrize("count", [MAX_CHAIN_LENGTH, 8])
def test_x5c_of_same_name_cas_is_refused_without_search_blowup(tmp_path: Path, count: int) -> None:
    """Before the fix every ordering of the CAs was tried, on the event loop: 7 CAs took over
    a minute of CPU. The bound only rules out a hang; the search now costs a few checks."""
    token = _same_name_cas_token(count)
    with _kbs2(write(tmp_path / "ca.pem", issue("passport CA")), FakeClock(NOW)) as kbs2:
        started = time.monotonic()
        reply = kbs2.get("/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {token}"})
        elapsed = time.monotonic() - started
    assert reply.status_code == 401, reply.text
    assert "not accepted" in reply.json()["detail"]
    assert elapsed < 10, f"refusing {count} same-name CAs took {elapsed:.1f} s"


class _ParkingClock:
    """The injected clock. Once armed, the first call from a thread other than the event loop's
    (the token verification, when it runs off the loop) parks until released."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.armed = False
        self.parked = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> float:
        if self.armed and threading.get_ident() != self.loop_thread and not self.parked.is_set():
            self.parked.set()
            self.release.wait(30)
        return float(NOW)


def test_x5c_chain_work_runs_off_the_event_loop_and_healthz_answers(tmp_path: Path) -> None:
    """While one request's token is being verified (parked here, as a costly chain would
    keep it), the same worker answers /healthz: verification does not block the loop."""
    clock = _ParkingClock()
    app = _kbs2_app(write(tmp_path / "ca.pem", issue("passport CA")), clock)
    token = _same_name_cas_token(MAX_CHAIN_LENGTH)

    async def scenario() -> tuple[int, int]:
        clock.loop_thread = threading.get_ident()
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://kbs") as client,
        ):
            clock.armed = True
            pending = asyncio.create_task(
                client.get("/kbs/v0/resource/a/b/c", headers={"Authorization": f"Bearer {token}"})
            )
            try:
                parked = await asyncio.to_thread(clock.parked.wait, 20)
                assert parked, "the token was verified on the event loop's thread"
                health = await asyncio.wait_for(client.get("/healthz"), 20)
            finally:
                clock.release.set()
            reply = await pending
        return health.status_code, reply.status_code

    assert asyncio.run(scenario()) == (200, 401)


_UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
_SIGN_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("ca-without-keycertsign", "does not allow keyCertSign"),
        ("pathlen-exceeded", "pathLenConstraint"),
        ("unknown-critical-extension", "critical extension 1.3.6.1.4.1.55555.1"),
    ],
)
def test_x5c_through_a_ca_that_may_not_issue_it_is_refused(attack: str, reason: str) -> None:
    root = issue("passport CA", path_length=0 if attack == "pathlen-exceeded" else None)
    by_attack: dict[str, list[tuple[x509.ExtensionType, bool]]] = {
        "ca-without-keycertsign": [(_SIGN_ONLY, True)],
        "unknown-critical-extension": [(_UNKNOWN, True)],
    }
    extensions = by_attack.get(attack, [])
    intermediate = issue("issuing CA", root, extensions=extensions)
    signer = issue("token signer", intermediate, ca=False)
    x5c = [
        base64.b64encode(c.cert.public_bytes(serialization.Encoding.DER)).decode()
        for c in (signer, intermediate)
    ]
    verifier = TokenVerifier([], trusted_certs=[root.cert], clock=lambda: float(NOW))
    jwk = {**jwk_of(signer.key.public_key()), "x5c": x5c}
    with pytest.raises(TokenVerificationError, match=reason):
        verifier.trusted_header_key(jwk)


def test_over_long_x5c_is_refused_before_parsing() -> None:
    verifier = TokenVerifier([], trusted_certs=[issue("passport CA").cert])
    signer = issue("token signer", ca=False)
    jwk = {**jwk_of(signer.key.public_key()), "x5c": ["not base64!"] * (MAX_CHAIN_LENGTH + 2)}
    with pytest.raises(TokenVerificationError, match=f"at most {MAX_CHAIN_LENGTH + 1}"):
        verifier.trusted_header_key(jwk)


def test_header_jwk_token_with_a_bad_signature_is_refused_before_its_chain() -> None:
    """A forged token is refused for its signature, whatever its x5c: no chain work for it."""
    token = _same_name_cas_token(MAX_CHAIN_LENGTH)
    head, body, _ = token.split(".")
    verifier = TokenVerifier([], trusted_certs=[issue("passport CA").cert], clock=lambda: NOW)
    with pytest.raises(TokenVerificationError, match="signature") as refused:
        verifier.verify(f"{head}.{body}.{'A' * 86}")
    assert "certificate" not in refused.value.detail

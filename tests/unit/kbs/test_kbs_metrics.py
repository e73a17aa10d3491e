"""``GET /metrics``: upstream's metric names, types, buckets and labels, exact counts for a
handshake and a release, the access rule, and what must never reach a label."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from admin_tokens import NOW, mint
from admin_tokens import write_public_pem as pem
from conftest import FakeClock, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.config import KbsConfig
from keybroker.errors import ConfigError, KbsRejectedError
from keybroker.kbs.app import create_app, kbs_state
from keybroker.kbs.metrics import (
    MAX_RESOURCE_LABELS,
    OTHER_RESOURCES,
    PLUGIN_DURATION_BUCKETS,
    REQUEST_DURATION_BUCKETS,
    UNKNOWN_RESOURCE,
    KbsMetrics,
)
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.resource_path import ResourcePath

LOOPBACK = ("127.0.0.1", 50000)
SECRET = b"metrics must never show this"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# name -> type, as upstream's kbs/src/prometheus/mod.rs declares them
UPSTREAM_METRICS = {
    "kbs_http_requests": "counter",
    "kbs_http_request_duration_seconds": "histogram",
    "kbs_http_request_size_bytes": "histogram",
    "kbs_http_response_size_bytes": "histogram",
    "kbs_http_active_connections": "gauge",
    "kbs_auth_requests": "counter",
    "kbs_auth_successes": "counter",
    "kbs_auth_errors": "counter",
    "kbs_attestation_requests": "counter",
    "kbs_attestation_successes": "counter",
    "kbs_attestation_failures": "counter",
    "kbs_attestation_errors": "counter",
    "kbs_resource_reads": "counter",
    "kbs_resource_writes": "counter",
    "kbs_resource_deletes": "counter",
    "kbs_policy_evaluations": "counter",
    "kbs_policy_approvals": "counter",
    "kbs_policy_violations": "counter",
    "kbs_policy_errors": "counter",
    "kbs_plugin_requests": "counter",
    "kbs_plugin_errors": "counter",
    "kbs_plugin_request_duration_seconds": "histogram",
    "kbs_build_info": "gauge",
}


def scrape(client: TestClient) -> str:
    reply = client.get("/metrics")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    text: str = reply.text
    return text


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(kbs_config(), clock=FakeClock()), client=LOOPBACK) as test_client:
        yield test_client


def _guest(client: TestClient) -> KbsClient:
    return KbsClient("http://testserver", http=client)


def _admin(client: TestClient) -> AdminClient:
    return AdminClient("http://testserver", http=client)


def test_every_upstream_metric_is_served_with_its_type(client: TestClient) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape(client))}
    assert {name: families[name].type for name in UPSTREAM_METRICS} == UPSTREAM_METRICS
    labels = {s.name: set(s.labels) for s in families["kbs_build_info"].samples}
    assert labels == {"kbs_build_info": {"version", "git_hash", "build_date"}}
    assert families["kbs_build_info"].samples[0].value == 1.0


def test_histograms_have_upstream_buckets(client: TestClient) -> None:
    _admin(client).set_resource("default/key/one", SECRET)  # one plugin call, for its buckets
    families = {f.name: f for f in text_string_to_metric_families(scrape(client))}

    def bounds(name: str) -> list[float]:
        return [
            float(s.labels["le"])
            for s in families[name].samples
            if s.name == f"{name}_bucket" and s.labels["le"] != "+Inf"
        ]

    assert bounds("kbs_http_request_duration_seconds") == list(REQUEST_DURATION_BUCKETS)
    assert bounds("kbs_http_request_size_bytes") == [32.0, 128.0, 512.0, 2048.0, 8192.0]
    assert bounds("kbs_http_response_size_bytes") == [32.0, 128.0, 512.0, 2048.0, 8192.0]
    assert bounds("kbs_plugin_request_duration_seconds") == list(PLUGIN_DURATION_BUCKETS)


def test_handshake_and_release_are_counted_exactly(client: TestClient) -> None:
    _admin(client).set_resource("default/key/one", SECRET)
    _admin(client).set_resource_policy(builtin_policy("allow_all"))
    assert _guest(client).get_resource("default/key/one") == SECRET
    found = samples(scrape(client))
    assert samples(scrape(client)) == found  # a scrape is not a KBS request: nothing moves
    assert value(found, "kbs_http_requests_total") == 5  # 2 admin, auth, attest, resource
    assert value(found, "kbs_http_request_duration_seconds_count") == 5
    assert value(found, "kbs_http_active_connections") == 0
    assert value(found, "kbs_auth_requests_total") == 1
    assert value(found, "kbs_auth_successes_total") == 1
    assert value(found, "kbs_auth_errors_total") == 0
    assert value(found, "kbs_attestation_requests_total") == 1
    assert value(found, "kbs_attestation_successes_total", tee_type="sample") == 1
    assert value(found, "kbs_attestation_errors_total") == 0
    assert value(found, "kbs_policy_evaluations_total") == 1
    assert value(found, "kbs_policy_approvals_total") == 1
    assert value(found, "kbs_policy_violations_total") == 0
    assert value(found, "kbs_resource_writes_total", resource_path="default/key/one") == 1
    assert value(found, "kbs_resource_reads_total", resource_path="default/key/one") == 1
    assert value(found, "kbs_plugin_requests_total", plugin_name="resource") == 2
    assert value(found, "kbs_plugin_request_duration_seconds_count", plugin_name="resource") == 2
    assert value(found, "kbs_plugin_errors_total", plugin_name="resource") == 0


def test_sizes_go_to_their_own_histograms(client: TestClient) -> None:
    """Upstream records response sizes in the request-size histogram (a bug not copied)."""
    body = b'{"version":"0.4.0","tee":"sample","extra-params":{}}'
    reply = client.post("/kbs/v0/auth", content=body)
    assert reply.status_code == 200
    found = samples(scrape(client))
    assert value(found, "kbs_http_request_size_bytes_count") == 1
    assert value(found, "kbs_http_request_size_bytes_sum") == len(body)
    assert value(found, "kbs_http_response_size_bytes_count") == 1
    assert value(found, "kbs_http_response_size_bytes_sum") == len(reply.content)


def test_policy_denial_counts_a_violation(client: TestClient) -> None:
    _admin(client).set_resource("default/key/one", SECRET)
    with pytest.raises(KbsRejectedError):  # the default policy refuses sample evidence
        _guest(client).get_resource("default/key/one")
    found = samples(scrape(client))
    assert value(found, "kbs_policy_evaluations_total") == 1
    assert value(found, "kbs_policy_violations_total") == 1
    assert value(found, "kbs_policy_approvals_total") == 0
    assert ("kbs_resource_reads_total", frozenset({("resource_path", "default/key/one")})) not in (
        found
    )


def test_refused_evidence_counts_a_failure_of_its_tee(client: TestClient) -> None:
    key = TeeKey.generate()
    nonce = client.post(
        "/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample", "extra-params": {}}
    ).json()["nonce"]
    wrong = runtime_data_digest(runtime_data(nonce, key.public_jwk(), "x"), HashAlgorithm.SHA384)
    reply = client.post(
        "/kbs/v0/attest",
        json={
            "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
            "tee-evidence": {
                "primary_evidence": SampleAttester().evidence(wrong),
                "additional_evidence": "",
            },
        },
    )
    assert reply.status_code == 401
    found = samples(scrape(client))
    assert value(found, "kbs_attestation_requests_total") == 1
    assert value(found, "kbs_attestation_failures_total", tee_type="sample") == 1
    assert value(found, "kbs_attestation_errors_total") == 0
    assert value(found, "kbs_attestation_successes_total", tee_type="sample") == 0


def test_attest_without_session_counts_an_error(client: TestClient) -> None:
    assert client.post("/kbs/v0/attest", json={}).status_code == 401
    found = samples(scrape(client))
    assert value(found, "kbs_attestation_requests_total") == 1
    assert value(found, "kbs_attestation_errors_total") == 1
    assert not [k for k in found if k[0] == "kbs_attestation_failures_total"]


def test_version_mismatch_counts_an_auth_error(client: TestClient) -> None:
    reply = client.post("/kbs/v0/auth", json={"version": "0.3.0", "tee": "sample"})
    assert reply.status_code == 401
    found = samples(scrape(client))
    assert value(found, "kbs_auth_requests_total") == 1
    assert value(found, "kbs_auth_errors_total") == 1
    assert value(found, "kbs_auth_successes_total") == 0


def test_unknown_resource_paths_never_become_labels(client: TestClient) -> None:
    """An attested guest probing paths must not grow the label set (or learn it back)."""
    _admin(client).set_resource_policy(builtin_policy("allow_all"))
    guest = _guest(client)
    for i in range(20):
        with pytest.raises(KbsRejectedError):
            guest.get_resource(f"probe/guess/n{i}")
    text = scrape(client)
    assert "probe" not in text and "guess" not in text
    found = samples(text)
    assert value(found, "kbs_resource_reads_total", resource_path=UNKNOWN_RESOURCE) == 20
    assert value(found, "kbs_plugin_errors_total", plugin_name="resource") == 20


def test_tokens_cookies_and_secrets_never_appear_in_the_scrape(client: TestClient) -> None:
    _admin(client).set_resource("default/key/one", SECRET)
    _admin(client).set_resource_policy(builtin_policy("allow_all"))
    guest = _guest(client)
    token = guest.attest()
    assert guest.get_resource("default/key/one") == SECRET
    # a bearer token and a query string on an unknown plugin: not labels either
    client.get("/kbs/v0/nosuchplugin/x?token=querysecret", headers={"authorization": "Bearer zz"})
    text = scrape(client)
    cookie = client.cookies.get("kbs-session-id")
    assert cookie and cookie not in text
    for part in token.split("."):
        assert part not in text
    assert SECRET.decode() not in text and base64.b64encode(SECRET).decode() not in text
    assert "querysecret" not in text and "nosuchplugin" not in text


def test_resource_labels_are_capped() -> None:
    metrics = KbsMetrics()
    for i in range(MAX_RESOURCE_LABELS + 50):
        metrics.resource("read", ResourcePath("repo", "type", f"tag{i}"))
    found = samples(metrics.render().decode())
    labelled = [k for k in found if k[0] == "kbs_resource_reads_total"]
    assert len(labelled) == MAX_RESOURCE_LABELS + 1
    assert value(found, "kbs_resource_reads_total", resource_path=OTHER_RESOURCES) == 50


def test_two_apps_in_one_process_count_separately() -> None:
    with (
        TestClient(create_app(kbs_config()), client=LOOPBACK) as one,
        TestClient(create_app(kbs_config()), client=LOOPBACK) as two,
    ):
        one.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample", "extra-params": {}})
        assert value(samples(scrape(one)), "kbs_auth_requests_total") == 1
        assert value(samples(scrape(two)), "kbs_auth_requests_total") == 0


# --- who may scrape ------------------------------------------------------------------------


def test_metrics_refused_to_a_remote_client_by_default() -> None:
    with TestClient(create_app(kbs_config()), client=("192.0.2.7", 40000)) as remote:
        reply = remote.get("/metrics")
    assert reply.status_code == 403
    assert "loopback" in reply.json()["detail"]


def test_metrics_off_answers_404_and_records_no_http_metrics() -> None:
    config = kbs_config(metrics={"access": "off"})
    app = create_app(config)
    with TestClient(app, client=LOOPBACK) as local:
        assert local.get("/metrics").status_code == 404
        local.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample", "extra-params": {}})
    found = samples(kbs_state(app).services.metrics.render().decode())
    assert value(found, "kbs_http_requests_total") == 0
    assert value(found, "kbs_http_request_duration_seconds_count") == 0


def test_unknown_metrics_access_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.access"):
        kbs_config(metrics={"access": "everyone"})
    with pytest.raises(ConfigError, match=r"unknown key `metrics\.path`"):
        kbs_config(metrics={"path": "/m"})


def _admin_metrics_config(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> KbsConfig:
    return kbs_config(
        metrics={"access": "admin"},
        admin={
            "authorization_mode": "AuthenticatedAuthorization",
            "authentication": {
                "bearer_jwt": {
                    "identity_providers": [
                        {"issuer": "admin1-issuer", "public_key_uri": str(pem(key, tmp_path / "k"))}
                    ]
                }
            },
            "authorization": {
                "regex_acl": {
                    "acls": [
                        {"role": "scraper", "allowed_endpoints": "^/kbs/v0/metrics$"},
                        {"role": "reader", "allowed_endpoints": "^/kbs/v0/resource-policy$"},
                    ]
                }
            },
        },
    )


def test_metrics_behind_admin_auth(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    config = _admin_metrics_config(tmp_path, key)
    # a remote Prometheus with a scraper token; loopback alone is not enough in this mode
    with TestClient(create_app(config, clock=FakeClock(NOW)), client=("192.0.2.7", 1)) as remote:
        assert remote.get("/metrics").status_code == 401
        scraper = {"authorization": f"Bearer {mint(key, role='scraper')}"}
        assert remote.get("/metrics", headers=scraper).status_code == 200
        reader = {"authorization": f"Bearer {mint(key, role='reader')}"}
        assert remote.get("/metrics", headers=reader).status_code == 403
        other = ed25519.Ed25519PrivateKey.generate()
        forged = {"authorization": f"Bearer {mint(other, role='scraper')}"}
        assert remote.get("/metrics", headers=forged).status_code == 401
    with TestClient(create_app(config, clock=FakeClock(NOW)), client=LOOPBACK) as local:
        assert local.get("/metrics").status_code == 401

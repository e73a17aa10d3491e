"""The benchmark's pieces that compute rather than measure: the ceiling app's reply, the
shares of the ceiling, the servers section's ratios and the granian trial's mapping of
``[http_server]`` (``bench/kbsbench``). How fast anything is, is the benchmark's to say."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from granian.constants import SSLProtocols
from kbsbench.ceiling import REPLY_BYTES, make_app
from kbsbench.granian_server import CEILING_FACTORY, granian, tls_options
from kbsbench.model import scale_out
from kbsbench.shares import add_ceiling_shares, compare_servers, summary_lines
from kbsbench.stacks import WAITING, attribute

from keybroker.config import HttpServerConfig
from keybroker.errors import ConfigError
from keybroker.kbs.app import INSTANCE_HEADER
from keybroker.kbs.server import INSTANCE_ENV


def test_the_ceiling_app_answers_every_path_with_one_200_byte_json_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INSTANCE_ENV, "ceiling-test")
    with TestClient(make_app()) as client:  # the lifespan runs too
        for method, path in [("GET", "/healthz"), ("POST", "/kbs/v0/auth"), ("GET", "/x")]:
            reply = client.request(method, path, content=b"{}" if method == "POST" else None)
            assert reply.status_code == 200
            assert len(reply.content) == REPLY_BYTES == 200
            assert json.loads(reply.content)["ceiling"] == "kbsbench"
            assert reply.headers[INSTANCE_HEADER] == "ceiling-test"


def _row(mode: str, per_second: float, concurrency: int, spread: int = 1) -> dict[str, Any]:
    return {
        "mode": mode,
        "per_second": per_second,
        "concurrency": concurrency,
        "spread": spread,
        "p99_ms": 10.0,
    }


def _results() -> dict[str, Any]:
    ceiling = [
        {"replicas": 1, "workers": 2, **_row("healthz", 1000.0, 64)},
        {"replicas": 1, "workers": 1, **_row("healthz", 600.0, 64)},
        {"replicas": 2, "workers": 1, **_row("healthz", 800.0, 64)},
    ]
    kbs_rows = {
        "get": _row("get", 100.0, 64),
        "bearer": _row("bearer", 200.0, 64),
        "spread": {"handshake": _row("handshake", 10.0, 64, 2), "get": _row("get", 50.0, 64, 2)},
    }
    return {
        "ceiling": {"reply_bytes": 200, "rows": ceiling},
        "handshakes": {
            "workers": 2,
            "store": "memory",
            "levels": {"64": _row("handshake", 20.0, 64)},
            "healthz": _row("healthz", 800.0, 64),
            **kbs_rows,
        },
        "upstream": {
            "workers": 2,
            "store": "upstream",
            "handshake": _row("handshake", 5.0, 64),
            **json.loads(json.dumps(kbs_rows)),
        },
        "scaling": {
            "rows": [
                {"replicas": 1, "workers": 1, "store": "memory", "metrics": "on"}
                | _row("handshake", 30.0, 64),
                {"replicas": 2, "workers": 1, "store": "redis+postgres", "metrics": "on"}
                | _row("handshake", 40.0, 64),
            ]
        },
    }


def test_a_handshake_counts_three_requests_against_the_ceiling_of_its_own_stack() -> None:
    results = _results()
    ratios = {r["name"]: r for r in add_ceiling_shares(results)}
    hs = results["handshakes"]
    assert hs["levels"]["64"]["requests_per_second"] == 60.0
    assert hs["levels"]["64"]["ceiling_share"] == 0.06  # 3 x 20 of 1,000
    assert hs["get"]["ceiling_share"] == 0.1 and hs["bearer"]["ceiling_share"] == 0.2
    assert hs["healthz"]["ceiling_share"] == 0.8
    assert hs["spread"]["handshake"]["ceiling_share"] == 0.03
    assert results["upstream"]["handshake"]["ceiling_share"] == 0.015
    # each scaling row against the ceiling of its own replicas and workers
    scaling = results["scaling"]["rows"]
    assert scaling[0]["ceiling_share"] == 0.15  # 90 of 600: one worker
    assert scaling[1]["ceiling_share"] == 0.15  # 120 of 800: two replicas behind nginx
    assert ratios["upstream get spread"]["spread"] == 2
    assert ratios["scaling 2x1 redis+postgres metrics on"]["ceiling_per_second"] == 800.0
    assert len(ratios) == 6 + 5 + 2  # memory, upstream and scaling rows: each one once


def test_the_summary_prints_each_kind_of_request_with_its_share() -> None:
    results = _results()
    add_ceiling_shares(results)
    text = "\n".join(summary_lines(results))
    assert "1 replica x 2 workers, 64 guests" in text
    assert "Keybroker /healthz" in text and "80.0%" in text
    assert "upstream config: full handshake" in text and "1.5%" in text


def test_a_row_without_a_ceiling_of_its_stack_is_an_error_not_a_guess() -> None:
    results = _results()
    results["ceiling"]["rows"] = results["ceiling"]["rows"][:1]  # no one-worker ceiling
    with pytest.raises(KeyError):
        add_ceiling_shares(results)


_HANDLER = (
    'process 1:"kbs";Server.run (uvicorn/server.py:86);'
    "HttpMetricsMiddleware.__call__ (keybroker/kbs/metrics.py:303);_kbs (keybroker/kbs/app.py:216);"
    "ReleaseService._release (keybroker/kbs/release.py:140)"
)


def test_a_stack_is_the_outermost_part_it_names_and_waiting_threads_count_apart() -> None:
    collapsed = "\n".join(
        [
            # the audit record's JSON is the audit record's, not the handler's
            f"{_HANDLER};AuditLog.record (keybroker/kbs/audit.py:554);dumps (json/a.py:238) 7",
            f"{_HANDLER};seal (keybroker/protocol/jwe.py:80) 5",
            f"{_HANDLER};_read_body (keybroker/kbs/app.py:302) 3",
            # the metrics middleware wraps every request; its own counting is metrics
            "Server.run (uvicorn/server.py:86);HttpMetricsMiddleware.__call__ (keybroker/kbs/"
            "metrics.py:303);inc (prometheus_client/values.py:115) 2",
            "Server.run (uvicorn/server.py:86);data_received (uvicorn/protocols/http/h.py:1) 4",
            "thread 9;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 50",
            "thread 9;_worker (concurrent/futures/thread.py:83);append_many (keybroker/kbs/audit.py"
            ":360);FileSink._write (keybroker/kbs/audit.py:356) 20",
            "not a stack line",
        ]
    )
    parts = attribute(collapsed)
    assert parts == {
        "audit record": 7,
        "seal: ECDH and AES-GCM (JWE)": 5,
        "handler: parse, dispatch, respond": 3,
        "metrics (prometheus_client)": 2,
        "HTTP server (uvicorn, httptools, starlette)": 4,
        WAITING: 70,
    }


def test_the_scale_out_model_names_what_saturates_first() -> None:
    # 8 ms per handshake in the KBS: 250/s per 2-core replica; Redis at 0.5 ms (one thread)
    # allows 2,000/s; PostgreSQL at 0.4 ms on 2 cores allows 5,000/s
    model = scale_out({"kbs": 8.0, "redis": 0.5, "postgres": 0.4}, cores=2, replicas=[1, 4, 16])
    assert model["per_replica"] == 250.0
    assert model["limits"] == {"redis": 2000.0, "postgres": 5000.0}
    assert [(r["handshakes_per_second"], r["saturates"]) for r in model["rows"]] == [
        (250.0, "kbs replicas"),
        (1000.0, "kbs replicas"),
        (2000.0, "redis"),
    ]


def _https(**fields: str) -> HttpServerConfig:
    keys = {"private_key": "/k.pem", "certificate": "/c.pem"}
    return HttpServerConfig.model_validate({"sockets": ["127.0.0.1:8443"], **keys, **fields})


@pytest.mark.parametrize(
    ("fields", "minimum"),
    [
        ({}, SSLProtocols.tls12),  # intermediate, the default
        ({"tls_profile": "modern"}, SSLProtocols.tls13),
        ({"tls_profile": "custom", "tls_min_version": "1.3"}, SSLProtocols.tls13),
        ({"tls_profile": "custom", "tls_max_version": "1.3"}, SSLProtocols.tls12),
    ],
)
def test_the_granian_trial_serves_each_profile_from_its_minimum_version(
    fields: dict[str, str], minimum: SSLProtocols
) -> None:
    options = tls_options(_https(**fields))
    assert options == {
        "ssl_cert": Path("/c.pem"),
        "ssl_key": Path("/k.pem"),
        "ssl_protocol_min": minimum,
    }


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"tls_profile": "old"}, "no CBC suites"),
        ({"tls_profile": "custom", "tls_max_version": "1.2"}, "cannot cap TLS at 1.2"),
        ({"tls_ciphers": "ECDHE-RSA-AES128-GCM-SHA256"}, "cannot choose TLS 1.2 suites"),
    ],
)
def test_the_granian_trial_refuses_tls_settings_it_cannot_apply(
    fields: dict[str, str], refusal: str
) -> None:
    with pytest.raises(ConfigError, match=refusal):
        tls_options(_https(**fields))


def test_the_granian_trial_falls_back_on_tls13_suites_and_groups_as_kbs_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fields = {"tls_ciphers": "TLS_AES_256_GCM_SHA384", "tls_groups": "X25519MLKEM768"}
    assert tls_options(_https(**fields))["ssl_protocol_min"] == SSLProtocols.tls12
    assert "rustls's defaults are used" in caplog.text


def test_the_granian_trial_refuses_a_port_in_use_instead_of_sharing_it() -> None:
    """granian binds with SO_REUSEPORT: without the plain bind first, a second server on the
    port would start and take half of its connections."""
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        http = HttpServerConfig(sockets=[f"127.0.0.1:{port}"], insecure_http=True)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            granian(CEILING_FACTORY, http, workers=1)
    finally:
        held.close()


def test_each_server_is_compared_against_its_own_ceiling_and_granian_over_uvicorn() -> None:
    ceilings = {"uvicorn": _row("healthz", 1000.0, 64), "granian": _row("healthz", 2000.0, 64)}
    rows = {"uvicorn": _row("handshake", 50.0, 64), "granian": _row("handshake", 40.0, 64)}
    rows["granian"]["p99_ms"] = 15.0
    compared = compare_servers(rows, ceilings)
    assert compared["uvicorn"]["ceiling_share"] == 0.15  # 3 x 50 of 1,000
    assert compared["granian"]["ceiling_share"] == 0.06  # 3 x 40 of 2,000: its own ceiling
    assert compared["ratio"] == 0.8 and compared["p99_ratio"] == 1.5

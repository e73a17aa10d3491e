"""The benchmark's pieces that compute rather than measure: the ceiling app's reply and the
shares of the ceiling (``bench/kbsbench``). How fast anything is, is the benchmark's to say."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from kbsbench.ceiling import REPLY_BYTES, make_app
from kbsbench.model import scale_out
from kbsbench.shares import add_ceiling_shares, summary_lines
from kbsbench.stacks import WAITING, attribute

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

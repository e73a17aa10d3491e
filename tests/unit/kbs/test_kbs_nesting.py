"""Documents nested deeper than any parser's stack: a 400 naming the document, and one audit
failure record, never a 500 (``RecursionError``) that the audit log misses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.errors import BadRequestError
from keybroker.kbs.app import create_app
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.untrusted_json import MAX_DEPTH, parse_json, parse_toml

LEVELS = 100_000
DEEP_JSON = "[" * LEVELS + "]" * LEVELS


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _attest(log: Path, *, additional: str = "", init_data: dict[str, str] | None = None) -> Any:
    with TestClient(create_app(kbs_config(audit={"path": str(log)}))) as client:
        auth = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
        nonce = auth.json()["nonce"]
        key = TeeKey.generate()
        digest = runtime_data_digest(
            runtime_data(nonce, key.public_jwk(), additional), HashAlgorithm.SHA384
        )
        body: dict[str, Any] = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": key.public_jwk()},
            "tee-evidence": {
                "primary_evidence": SampleAttester().evidence(digest),
                "additional_evidence": additional,
            },
        }
        if init_data is not None:
            body["init-data"] = init_data
        return client.post("/kbs/v0/attest", json=body)


def _assert_refused_and_audited(reply: Any, log: Path, what: str) -> None:
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"].endswith("/MalformedRequest")
    assert f"{what} is nested more than {MAX_DEPTH} levels deep" in reply.json()["detail"]
    (record,) = _records(log)
    assert record["action"] == "attest" and record["decision"] == "failure"
    assert "nested" in record["reason"]


def test_deeply_nested_additional_evidence_is_400_and_audited(tmp_path: Path) -> None:
    reply = _attest(tmp_path / "audit.log", additional='{"sample": ' + DEEP_JSON + "}")
    _assert_refused_and_audited(reply, tmp_path / "audit.log", "additional_evidence")


@pytest.mark.parametrize(
    ("format_", "body"),
    [
        ("json", '{"version": "0.1.0", "data": ' + DEEP_JSON + "}"),
        ("toml", "version = '0.1.0'\nalgorithm = 'sha384'\nx = " + DEEP_JSON),
        ("toml", "x = " + "{a = " * 2000 + "1" + "}" * 2000),
    ],
    ids=["json", "toml-arrays", "toml-inline-tables"],
)
def test_deeply_nested_init_data_is_400_and_audited(
    tmp_path: Path, format_: str, body: str
) -> None:
    reply = _attest(tmp_path / "audit.log", init_data={"format": format_, "body": body})
    _assert_refused_and_audited(reply, tmp_path / "audit.log", "init-data")


def test_moderately_nested_documents_pass_at_the_limit() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(at_limit, what="x") is not None
    with pytest.raises(BadRequestError, match="nested more than"):
        parse_json("[" + at_limit + "]", what="x")
    nested_table = parse_toml("a = " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), what="x")
    assert "a" in nested_table
    with pytest.raises(BadRequestError, match="not valid toml"):
        parse_toml("a = [", what="x")

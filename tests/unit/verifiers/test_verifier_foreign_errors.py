"""A verifier's foreign exception (a library's message) reaches the log, never the client."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest

from conftest import Kbs
from keybroker.client.keys import TeeKey
from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.base import TeeClaims, Verifier

INTERNAL = "internal state at /opt/keybroker/parser.py line 42"


class _Broken(Verifier):
    tee: ClassVar[Tee] = Tee.SAMPLE

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        raise ValueError(INTERNAL)


def test_foreign_exception_text_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(EvidenceError) as raised:
        _Broken().verify({}, expected_report_data=None, expected_init_data=None)
    assert INTERNAL not in raised.value.detail
    assert raised.value.detail == (
        "sample evidence could not be verified: it is malformed or unsupported "
        "(details in the KBS log)"
    )
    assert INTERNAL in caplog.text


def test_foreign_exception_text_is_not_returned_to_the_client(
    kbs: Kbs, caplog: pytest.LogCaptureFixture
) -> None:
    """Non-ASCII ``report_data`` makes ``base64.b64decode`` raise its own ValueError."""
    reply = kbs.client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
    nonce = reply.json()["nonce"]
    attestation = {
        "runtime-data": {"nonce": nonce, "tee-pubkey": TeeKey.generate().public_jwk()},
        "tee-evidence": {"primary_evidence": {"svn": "1", "report_data": "\u00e9"}},
    }
    with caplog.at_level(logging.WARNING):
        reply = kbs.client.post("/kbs/v0/attest", json=attestation)
    assert reply.status_code == 401, reply.text
    assert "ASCII" not in reply.text
    assert "could not be verified" in reply.json()["detail"]
    assert "ASCII" in caplog.text  # the operator still learns what went wrong

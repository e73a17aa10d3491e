"""How audit records name a guest: by TEE, a hash of its TEE key and a hash of its token, never
the token itself; remembered by token, bounded."""

from __future__ import annotations

import pytest

from keybroker.client.keys import TeeKey
from keybroker.kbs import auditing
from keybroker.kbs.auditing import guest_subject, token_id
from keybroker.protocol.models import JsonValue


def _claims(tee: str = "sample") -> dict[str, JsonValue]:
    key: dict[str, JsonValue] = {**TeeKey.generate().public_jwk()}
    evidence: dict[str, JsonValue] = {tee: {"svn": "1"}, "runtime_data_claims": {"tee-pubkey": key}}
    return {"submods": {"cpu0": {"ear.veraison.annotated-evidence": evidence}}}


def test_a_guest_is_named_by_tee_key_hash_and_token_hash_never_the_token() -> None:
    token = "header.payload-of-a-guest.signature"
    subject = guest_subject(_claims(), token)
    assert (subject.kind, subject.tee) == ("guest", "sample")
    assert subject.token_id == token_id(token) and token not in repr(subject)
    assert subject.tee_pubkey_sha256 is not None and len(subject.tee_pubkey_sha256) == 64


def test_a_token_s_subject_is_remembered_and_another_token_gets_its_own() -> None:
    claims = _claims()
    first = guest_subject(claims, "token-one.a.b")
    assert guest_subject(claims, "token-one.a.b") is first
    other = guest_subject(_claims("tdx"), "token-two.a.b")
    assert other.tee == "tdx" and other.token_id != first.token_id


def test_remembered_subjects_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auditing, "SUBJECTS_REMEMBERED", 3)
    for index in range(8):
        guest_subject(_claims(), f"token-{index}.a.b")
    assert len(auditing._subjects) == 3

"""Naming the actors of audit records, without secrets: admins by role and issuer, guests by
TEE, a hash of their TEE key and a hash of their token."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict

from keybroker.kbs.admin_auth import AdminIdentity
from keybroker.kbs.audit import Subject
from keybroker.kbs.tokens import pointer
from keybroker.protocol.canonical import jcs
from keybroker.protocol.models import JsonValue, Tee

_NOT_TEE = {"report_data", "runtime_data_claims", "init_data", "init_data_claims"}
_TEES = {tee.value for tee in Tee}

SUBJECTS_REMEMBERED = 4096  # guests named recently, by token id (see guest_subject)
_subjects: OrderedDict[str, Subject] = OrderedDict()
_subjects_lock = threading.Lock()


def new_request_id() -> str:
    """A fresh id for one request's audit record."""
    return uuid.uuid4().hex


def admin_subject(identity: AdminIdentity) -> Subject:
    return Subject(
        kind="admin", role=identity.role, issuer=identity.issuer, subject=identity.subject
    )


def guest_subject(claims: dict[str, JsonValue], token: str) -> Subject:
    """The guest a verified token names. Remembered by token (a bounded LRU): a session's
    every GET names the same guest, and the claims of a verified token never change."""
    name = token_id(token)
    with _subjects_lock:
        known = _subjects.get(name)
        if known is not None:
            _subjects.move_to_end(name)
            return known
    subject = _guest_subject(claims, name)
    with _subjects_lock:
        _subjects[name] = subject
        while len(_subjects) > SUBJECTS_REMEMBERED:
            _subjects.popitem(last=False)
    return subject


def _guest_subject(claims: dict[str, JsonValue], name: str) -> Subject:
    evidence = pointer(claims, "/submods/cpu0/ear.veraison.annotated-evidence")
    tee = None
    if isinstance(evidence, dict):
        tee = next((k for k in evidence if k not in _NOT_TEE and k in Tee._value2member_map_), None)
    key = pointer(
        claims, "/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey"
    )
    section = _ita_section(claims) if evidence is None else None
    if section is not None:  # an Intel Trust Authority token
        tee = section
        key = pointer(claims, f"/{section}/attester_runtime_data/tee-pubkey") or pointer(
            claims, f"/{section}/attester_user_data/tee-pubkey"
        )
    return Subject(
        kind="guest",
        tee=tee,
        tee_pubkey_sha256=hashlib.sha256(jcs(key)).hexdigest() if key is not None else None,
        token_id=name,
    )


def attestation_outcome(claims: dict[str, JsonValue]) -> str:
    """What the attestation service concluded, for the audit record of an ``/attest``."""
    status = pointer(claims, "/submods/cpu0/ear.status")
    section = _ita_section(claims) if status is None else None
    if section is not None:
        return (
            f"intel trust authority {section} {pointer(claims, f'/{section}/attester_tcb_status')}"
        )
    return f"cpu0 {status}"


def _ita_section(claims: dict[str, JsonValue]) -> str | None:
    return next((name for name in ("tdx", "sgx") if isinstance(claims.get(name), dict)), None)


def token_id(token: str) -> str:
    """A stable name for a token that does not reveal it."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]

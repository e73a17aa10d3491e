"""RCAR sessions: ``/auth`` opens one, ``/attest`` turns it into an attested one holding a token.

Sessions live in the key-value store (namespace ``kbs_protocol_session``), never in process
memory, so a handshake whose requests land on different workers or replicas still works.

Replay defences:

- the nonce is 32 random bytes, bound to one session id (the cookie);
- the first ``/attest`` on a session atomically claims it (``set`` with ``overwrite=False``),
  so a nonce serves at most one attestation attempt: a replayed or concurrent second attempt
  is refused whatever the outcome of the first;
- every read checks the expiry with the injected clock, independent of the store's TTL.

Flood defence: with an ``UnattestedSessions`` index (``keybroker.kbs.limits``), opening a
session past the cap on unattested sessions deletes the oldest unattested ones; a guest whose
session was shed is told at ``/attest`` to start again.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

from keybroker.errors import AttestationError, StorageError
from keybroker.kbs.limits import UnattestedSessions
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.models import Tee
from keybroker.storage.base import KeyValueStorage

SESSION_NAMESPACE = "kbs_protocol_session"
SESSION_COOKIE = "kbs-session-id"
NONCE_BYTES = 32


class SessionStatus(StrEnum):
    AUTHED = "authed"
    ATTESTED = "attested"


@dataclass(frozen=True)
class Session:
    id: str
    tee: Tee
    nonce: str
    hash_algorithm: HashAlgorithm
    expires_at: float
    status: SessionStatus = SessionStatus.AUTHED
    token: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Session:
        try:
            data = json.loads(raw)
            return cls(
                id=str(data["id"]),
                tee=Tee(data["tee"]),
                nonce=str(data["nonce"]),
                hash_algorithm=HashAlgorithm(data["hash_algorithm"]),
                expires_at=float(data["expires_at"]),
                status=SessionStatus(data["status"]),
                token=data.get("token"),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"a stored session record is corrupt: {e}") from None


def _valid_session_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class SessionStore:
    def __init__(
        self,
        storage: KeyValueStorage,
        *,
        timeout_min: int,
        clock: Callable[[], float] = time.time,
        unattested: UnattestedSessions | None = None,
    ) -> None:
        """``unattested``: the cap on sessions that have not attested (None: no cap)."""
        self._storage = storage
        self._lifetime = timeout_min * 60.0
        self._clock = clock
        self._unattested = unattested

    async def open(
        self, tee: Tee, hash_algorithm: HashAlgorithm, *, nonce: str | None = None
    ) -> Session:
        """``nonce``: a TEE-specific challenge from the attestation service (IBM SE's request),
        else a fresh random one."""
        session = Session(
            id=secrets.token_hex(16),
            tee=tee,
            nonce=nonce or base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode(),
            hash_algorithm=hash_algorithm,
            expires_at=self._clock() + self._lifetime,
        )
        await self._storage.set(session.id, session.to_bytes(), ttl=self._lifetime)
        if self._unattested is not None:
            for shed in await self._unattested.add(session.id):
                await self._shed(shed)
        return session

    async def _shed(self, session_id: str) -> None:
        # The index holds our own ids only; a shed session was never claimed, so it has no
        # attempt record to remove (claiming takes it out of the index).
        if _valid_session_id(session_id):
            await self._storage.delete(session_id)

    async def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (unknown, malformed id or expired)."""
        if session_id is None or not _valid_session_id(session_id):
            return None
        raw = await self._storage.get(session_id)
        if raw is None:
            return None
        session = Session.from_bytes(raw)
        if session.expires_at <= self._clock():
            await self._storage.delete(session_id)
            await self._storage.delete(_attempt_key(session_id))
            return None
        return session

    async def claim_attestation(self, session: Session) -> None:
        """Consume the session's nonce; only the first caller wins."""
        remaining = max(session.expires_at - self._clock(), 1.0)
        first = await self._storage.set(
            _attempt_key(session.id), b"1", overwrite=False, ttl=remaining
        )
        if not first:
            raise AttestationError(
                "this session's nonce has already been used for an attestation: "
                "start a new handshake with /auth"
            )
        if self._unattested is not None:  # consumed: no longer counts against the cap
            await self._unattested.remove(session.id)

    async def mark_attested(self, session: Session, token: str) -> Session:
        attested = Session(
            id=session.id,
            tee=session.tee,
            nonce=session.nonce,
            hash_algorithm=session.hash_algorithm,
            expires_at=session.expires_at,
            status=SessionStatus.ATTESTED,
            token=token,
        )
        remaining = max(session.expires_at - self._clock(), 1.0)
        await self._storage.set(session.id, attested.to_bytes(), ttl=remaining)
        return attested

    async def discard(self, session: Session) -> None:
        await self._storage.delete(session.id)


def _attempt_key(session_id: str) -> str:
    return f"{session_id}.attempt"

"""RCAR sessions in the shared store: expiry by the injected clock, one attestation per nonce."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import FakeClock
from keybroker.errors import AttestationError, StorageError
from keybroker.kbs.sessions import Session, SessionStatus, SessionStore
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.models import Tee
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage


def _stores(tmp_path: Path, clock: FakeClock) -> list[KeyValueStorage]:
    return [
        MemoryKeyValueStorage(clock),
        LocalFsKeyValueStorage(tmp_path, "kbs_protocol_session", clock=clock),
    ]


@pytest.mark.parametrize("backend", ["memory", "local_fs"])
def test_session_round_trip_and_expiry(tmp_path: Path, backend: str) -> None:
    clock = FakeClock()
    storage = dict(zip(["memory", "local_fs"], _stores(tmp_path, clock), strict=True))[backend]
    store = SessionStore(storage, timeout_min=5, clock=clock)

    async def scenario() -> None:
        session = await store.open(Tee.SAMPLE, HashAlgorithm.SHA384)
        assert len(session.id) == 32 and int(session.id, 16) >= 0
        assert await store.get(session.id) == session
        attested = await store.mark_attested(session, "token")
        assert (await store.get(session.id)) == attested
        assert attested.status is SessionStatus.ATTESTED
        clock.advance(5 * 60)
        assert await store.get(session.id) is None
        assert await store.get("../../etc/passwd") is None
        assert await store.get(None) is None

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["memory", "local_fs"])
def test_concurrent_attestation_claims_only_one_wins(tmp_path: Path, backend: str) -> None:
    clock = FakeClock()
    storage = dict(zip(["memory", "local_fs"], _stores(tmp_path, clock), strict=True))[backend]
    store = SessionStore(storage, timeout_min=5, clock=clock)

    async def scenario() -> list[bool]:
        session = await store.open(Tee.SAMPLE, HashAlgorithm.SHA384)

        async def claim() -> bool:
            try:
                await store.claim_attestation(session)
            except AttestationError:
                return False
            return True

        return list(await asyncio.gather(*(claim() for _ in range(8))))

    assert sorted(asyncio.run(scenario())) == [False] * 7 + [True]


def test_corrupt_session_record_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="corrupt"):
        Session.from_bytes(b'{"id": 1}')

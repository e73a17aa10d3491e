"""The LocalJson backend reads and writes upstream's file format and refuses a damaged file."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from storage_clock import SteppedClock

from keybroker.errors import StorageError
from keybroker.storage.local_json import LocalJsonKeyValueStorage


def test_reads_a_file_written_by_upstream(tmp_path: Path) -> None:
    # upstream's LocalJson: a JSON object of URL-safe, padded base64 strings
    value = bytes([0xFB, 0xFF, 0x00]) + b"secret"
    (tmp_path / "repository").write_text(
        json.dumps({"default/key/one": base64.urlsafe_b64encode(value).decode()})
    )
    store = LocalJsonKeyValueStorage(tmp_path, "repository")
    assert asyncio.run(store.get("default/key/one")) == value
    assert asyncio.run(store.list_keys()) == ["default/key/one"]


def test_writes_permanent_values_in_upstream_format(tmp_path: Path) -> None:
    store = LocalJsonKeyValueStorage(tmp_path, "repository")
    asyncio.run(store.set("repo/type/tag", b"\xfb\xff?"))
    document = json.loads((tmp_path / "repository").read_text())
    assert document == {"repo/type/tag": "-_8_"}
    assert (tmp_path / "repository").stat().st_mode & 0o777 == 0o600


def test_expiring_entry_carries_its_deadline(tmp_path: Path, clock: SteppedClock) -> None:
    store = LocalJsonKeyValueStorage(tmp_path, "kbs_protocol_session", clock)
    asyncio.run(store.set("session", b"s", ttl=30))
    document = json.loads((tmp_path / "kbs_protocol_session").read_text())
    assert document == {"session": {"value": "cw==", "expires_at": clock.now + 30}}


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", "{not json", '{"k": 3}', '{"k": "***"}', '{"k": {"value": "cw=="}}'],
    ids=["array", "syntax", "number", "bad-base64", "no-deadline"],
)
def test_malformed_file_is_an_error_and_left_untouched(tmp_path: Path, content: str) -> None:
    path = tmp_path / "repository"
    path.write_text(content)
    store = LocalJsonKeyValueStorage(tmp_path, "repository")
    with pytest.raises(StorageError, match="malformed"):
        asyncio.run(store.get("k"))
    with pytest.raises(StorageError, match="malformed"):
        asyncio.run(store.set("k", b"v"))
    assert path.read_text() == content


def test_writes_from_several_processes_are_not_lost(tmp_path: Path) -> None:
    """Worker processes share the file: each read-modify-write holds the lock."""
    import multiprocessing  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_write_many, args=(tmp_path, worker)) for worker in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    keys = asyncio.run(LocalJsonKeyValueStorage(tmp_path, "repository").list_keys())
    assert len(keys) == 3 * 20


def _write_many(directory: Path, worker: int) -> None:
    store = LocalJsonKeyValueStorage(directory, "repository")

    async def writes() -> None:
        for i in range(20):
            await store.set(f"w{worker}/k{i}", b"v")

    asyncio.run(writes())

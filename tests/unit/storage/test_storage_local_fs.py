r"""The local-filesystem store: upstream's on-disk layout, atomic writes, TTL sidecars."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from storage_clock import SteppedClock

from keybroker.errors import StorageError
from keybroker.storage import local_fs
from keybroker.storage.local_fs import DEFAULT_DIR_PATH, LocalFsKeyValueStorage

UPSTREAM_NAME = "default\\x2Fkey\\x2Fone"  # backslash, x, 2, F between the segments


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_upstream_layout_on_disk(tmp_path: Path) -> None:
    value = bytes(range(256))
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    asyncio.run(storage.set("default/key/one", value))

    assert len(UPSTREAM_NAME) == len("default/key/one") + 2 * 3
    assert os.listdir(tmp_path / "repository") == [UPSTREAM_NAME]  # no sidecar, no temp file
    assert (tmp_path / "repository" / UPSTREAM_NAME).read_bytes() == value


def test_file_dropped_in_upstream_layout_is_readable(tmp_path: Path) -> None:
    (tmp_path / "repository").mkdir()
    (tmp_path / "repository" / UPSTREAM_NAME).write_bytes(b"written by upstream")
    storage = LocalFsKeyValueStorage(tmp_path, "repository")

    assert asyncio.run(storage.get("default/key/one")) == b"written by upstream"
    assert asyncio.run(storage.list_keys()) == ["default/key/one"]


def test_upstream_default_dir() -> None:
    assert Path("/opt/confidential-containers/storage/local_fs") == DEFAULT_DIR_PATH


def test_directories_are_0700_and_files_0600(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    storage = LocalFsKeyValueStorage(root, "kbs")
    asyncio.run(storage.set("resource-policy.rego", b"package policy"))

    assert mode(root) == 0o700
    assert mode(root / "kbs") == 0o700
    assert mode(root / "kbs" / "resource-policy.rego") == 0o600


@pytest.mark.parametrize("namespace", ["", "..", "../x", "a/b", ".hidden", "a.b", "x" * 129])
def test_namespace_path_traversal_rejected(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(StorageError, match="namespace"):
        LocalFsKeyValueStorage(tmp_path / "root", namespace)
    assert not (tmp_path / "root").exists()


def test_crash_during_replace_keeps_the_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    asyncio.run(storage.set("a/b/c", b"old value"))

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="Input/output error") as raised:
        asyncio.run(storage.set("a/b/c", b"new value that never lands"))
    monkeypatch.undo()

    assert isinstance(raised.value.__cause__, OSError)
    assert asyncio.run(storage.get("a/b/c")) == b"old value"
    assert asyncio.run(storage.list_keys()) == ["a/b/c"]
    assert os.listdir(tmp_path / "repository") == ["a\\x2Fb\\x2Fc"]  # the temp file is gone


def test_temp_file_left_by_a_crash_is_never_listed_and_is_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_fs, "SWEEP_MIN_WRITES", 2)
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    orphan = tmp_path / "repository" / ".tmp-0123456789abcdef"
    orphan.write_bytes(b"half a val")

    assert asyncio.run(storage.list_keys()) == []
    asyncio.run(storage.set("a", b"1"))
    asyncio.run(storage.set("b", b"2"))
    assert not orphan.exists()


def test_ttl_value_keeps_upstream_bytes_and_a_hidden_sidecar(
    tmp_path: Path, clock: SteppedClock
) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "kbs_protocol_session", clock)
    directory = tmp_path / "kbs_protocol_session"

    async def scenario() -> None:
        await storage.set("s/1", b"session", ttl=300)
        assert (directory / "s\\x2F1").read_bytes() == b"session"
        assert float((directory / ".s\\x2F1.expires").read_bytes()) == clock.now + 300
        assert await storage.list_keys() == ["s/1"]
        clock.advance(300)
        assert await storage.get("s/1") is None
        assert os.listdir(directory) == []  # the expired value and its sidecar are purged

    asyncio.run(scenario())


def test_abandoned_expired_entries_are_swept_off_the_event_loop(
    tmp_path: Path, clock: SteppedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handshakes nobody finishes must not fill the disk. A sweep reads every deadline in the
    directory, so it runs in a worker thread."""
    monkeypatch.setattr(local_fs, "SWEEP_MIN_WRITES", 8)
    storage = LocalFsKeyValueStorage(tmp_path, "kbs_protocol_session", clock)
    loop_thread = threading.get_ident()
    sweeps: list[bool] = []
    sweep = storage._sweep

    def watched_sweep() -> None:
        sweeps.append(threading.get_ident() == loop_thread)
        sweep()

    monkeypatch.setattr(storage, "_sweep", watched_sweep)

    async def scenario() -> None:
        for i in range(7):
            await storage.set(f"abandoned{i}", b"s", ttl=60)
        clock.advance(61)
        await storage.set("fresh", b"s", ttl=60)  # the 8th write sweeps

    asyncio.run(scenario())
    assert sorted(os.listdir(tmp_path / "kbs_protocol_session")) == [".fresh.expires", "fresh"]
    assert sweeps == [False]  # swept once, not on the loop's thread


@pytest.mark.parametrize("deadline", [b"garbage", b"nan", b"-inf", b""])
def test_corrupt_deadline_fails_closed(tmp_path: Path, deadline: bytes) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "kbs_protocol_session")
    directory = tmp_path / "kbs_protocol_session"
    (directory / "s").write_bytes(b"session")
    (directory / ".s.expires").write_bytes(deadline)

    assert asyncio.run(storage.list_keys()) == []
    assert asyncio.run(storage.get("s")) is None


def test_names_that_are_not_keys_are_not_listed(tmp_path: Path) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    directory = tmp_path / "repository"
    for name in ["#expiry", "a b", ".hidden", "..\\x2Fescape", "ok"]:
        (directory / name).write_bytes(b"x")
    (directory / "subdir").mkdir()

    assert asyncio.run(storage.list_keys()) == ["ok"]


def test_second_handle_sees_writes_and_deletes(tmp_path: Path) -> None:
    """Two worker processes share one directory."""
    first = LocalFsKeyValueStorage(tmp_path, "repository")
    second = LocalFsKeyValueStorage(tmp_path, "repository")

    async def scenario() -> None:
        await first.set("k", b"v")
        assert await second.get("k") == b"v"
        assert await second.delete("k") == b"v"
        assert await first.get("k") is None

    asyncio.run(scenario())


def test_planted_fifo_does_not_hang_the_reader(tmp_path: Path) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    os.mkfifo(tmp_path / "repository" / "trap")

    with pytest.raises(StorageError, match="not a regular file"):
        asyncio.run(storage.get("trap"))


def test_os_error_becomes_storage_error(tmp_path: Path) -> None:
    storage = LocalFsKeyValueStorage(tmp_path, "repository")
    (tmp_path / "repository").rmdir()

    with pytest.raises(StorageError, match="list failed: No such file or directory") as raised:
        asyncio.run(storage.list_keys())
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    assert str(tmp_path) not in raised.value.detail  # no server paths on the wire


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create storage directory"):
        LocalFsKeyValueStorage(tmp_path / "file", "repository")


def test_durable_writes_are_fsynced_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced, threads = _watch_writes(monkeypatch)
    store = LocalFsKeyValueStorage(tmp_path, "repository")
    asyncio.run(store.set("a/b", b"value", ttl=60))
    asyncio.run(store.delete("a/b"))
    assert synced and threads == {"worker"}


@pytest.mark.parametrize("operation", ["set", "delete"])
def test_lock_held_by_another_worker_does_not_block_the_event_loop(
    tmp_path: Path, operation: str
) -> None:
    """Another worker process holds the namespace's writer lock (a slow sweep, say): a
    write waits for it in a thread, and the event loop keeps serving meanwhile."""
    store = LocalFsKeyValueStorage(tmp_path, "sessions")
    asyncio.run(store.set("s", b"one"))
    other_worker = os.open(tmp_path / "sessions", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(other_worker, fcntl.LOCK_EX)  # another open file: flock excludes it too
    loop_ticked = threading.Event()

    def release() -> None:
        # Waits for the loop to show it is alive; a loop stuck in flock never does, so the
        # lock is released anyway after a generous bound and the test fails instead of hanging.
        loop_ticked.wait(timeout=10)
        os.close(other_worker)

    releaser = threading.Thread(target=release)
    releaser.start()

    async def scenario() -> tuple[bool, object]:
        write: asyncio.Future[object] = asyncio.ensure_future(
            store.set("s", b"two") if operation == "set" else store.delete("s")
        )
        for _ in range(5):
            await asyncio.sleep(0)
        loop_ran_while_locked = not write.done()
        loop_ticked.set()
        return loop_ran_while_locked, await asyncio.wait_for(write, timeout=60)

    try:
        loop_ran_while_locked, result = asyncio.run(scenario())
    finally:
        loop_ticked.set()
        releaser.join()
    assert loop_ran_while_locked
    assert result == (True if operation == "set" else b"one")


def _watch_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], set[str]]:
    """Record fsync calls, and whether values are written on the loop's thread or another."""
    synced: list[int] = []
    threads: set[str] = set()
    real_fsync, real_replace = os.fsync, os.replace
    loop_thread = threading.get_ident()

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        threads.add("loop" if threading.get_ident() == loop_thread else "worker")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return synced, threads


def test_get_many_opens_only_the_files_a_listing_shows(
    tmp_path: Path, clock: SteppedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy asks for dozens of reference values of which a few exist: one listing, then
    an open for each value present (and its deadline, if it has one), none for the rest."""
    store = LocalFsKeyValueStorage(tmp_path, "reference", clock)
    asyncio.run(store.set("rv/kept", b"1"))
    asyncio.run(store.set("rv/soon", b"2", ttl=5))
    asyncio.run(store.set("rv/later", b"3", ttl=60))
    clock.advance(10)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    wanted = [f"rv/absent-{index}" for index in range(40)] + ["rv/kept", "rv/soon", "rv/later"]
    assert asyncio.run(store.get_many(wanted)) == {"rv/kept": b"1", "rv/later": b"3"}
    assert not any("absent" in path for path in opened)
    files = [path for path in opened if path != str(tmp_path / "reference")]  # not the lock
    # kept; soon and its deadline (read again under the lock, then purged); later and its deadline
    assert len(files) <= 6


def test_key_too_long_for_a_file_name_is_absent_and_refused_on_write(tmp_path: Path) -> None:
    # Found by schemathesis: GET /kbs/v0/reference-value/<300 characters> answered 500 with
    # ENAMETOOLONG. Such a key can never have been stored, so reading or deleting it finds
    # nothing; storing it is refused with a clear error, not an OS error.
    storage = LocalFsKeyValueStorage(tmp_path, "reference_value")
    longest = "k" * (local_fs.NAME_MAX - len("." + local_fs.EXPIRY_SUFFIX))
    too_long = "a/" + "k" * 250  # the escaped slash makes its file name 255 + 3 bytes

    assert asyncio.run(storage.set(longest, b"fits"))
    assert asyncio.run(storage.get(longest)) == b"fits"
    assert asyncio.run(storage.get(too_long)) is None
    assert asyncio.run(storage.get_many([too_long, longest])) == {longest: b"fits"}
    assert asyncio.run(storage.delete(too_long)) is None
    with pytest.raises(StorageError, match="too long for LocalFs"):
        asyncio.run(storage.set(too_long, b"x"))
    with pytest.raises(StorageError, match="too long for LocalFs"):
        asyncio.run(storage.set(longest + "k", b"x"))

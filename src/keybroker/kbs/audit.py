"""The audit log: one JSON line per admin operation, attestation and release decision, chained
by hashes so that an edited, removed, inserted or reordered record is detectable.

Each record carries ``seq`` (one more than the previous record's), ``prev`` (the previous
record's ``hash``) and ``hash`` (SHA-256 of the record's canonical JSON without ``hash``). The
file sink appends under an exclusive ``flock`` and reads the chain's tail from the file itself,
so several worker processes and restarts extend one chain.

Records never contain secrets, tokens or policy bodies: subjects are named by role/issuer or by
TEE and a hash of the guest's key.

Fail closed: when the sink cannot be written, ``ensure_writable``/``record`` raise
``ServiceUnavailableError``, and the KBS refuses releases and admin changes until it can write
again.

Group commit: ``record`` returns once its record is written (and, with ``fsync = "always"``,
on disk), but the writing happens in a worker thread, never on the event loop, and the records
that requests submit while one batch is being written go together in the next one: one
``flock``, one write and one ``fsync`` for all of them. Durability per response is unchanged;
its cost is shared.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from keybroker.errors import ServiceUnavailableError
from keybroker.protocol.canonical import jcs
from keybroker.protocol.models import JsonValue

GENESIS = "0" * 64
_TAIL_BYTES = 64 * 1024
_TAIL_STEP = 4096


def record_hash(record: dict[str, JsonValue]) -> str:
    return hashlib.sha256(jcs({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _chain(record: dict[str, JsonValue], previous: dict[str, JsonValue] | None) -> str:
    record["seq"] = int(previous["seq"]) + 1 if previous else 1
    record["prev"] = str(previous["hash"]) if previous else GENESIS
    record["hash"] = record_hash(record)
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


class AuditSink(ABC):
    @abstractmethod
    def append_many(self, records: Sequence[dict[str, JsonValue]]) -> None:
        """Chain and write ``records`` in order, durably per the sink's policy; raise OSError
        (then none of them counts as written)."""

    def append(self, record: dict[str, JsonValue]) -> None:
        self.append_many([record])

    def probe(self) -> None:  # noqa: B027 - sinks that cannot fail
        """Raise OSError if a record could not be written now."""


class StdoutSink(AuditSink):
    def __init__(self) -> None:
        self._previous: dict[str, JsonValue] | None = None
        self._lock = threading.Lock()

    def append_many(self, records: Sequence[dict[str, JsonValue]]) -> None:
        with self._lock:
            lines = []
            previous = self._previous
            for record in records:
                lines.append(_chain(record, previous) + "\n")
                previous = record
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
            self._previous = previous


class FileSink(AuditSink):
    """Appends under ``flock`` to a file other processes may extend too. The file stays open;
    it is reopened when it was replaced (log rotation). The chain's tail is remembered with
    the file size it was written at, and read back from the file only when another process
    wrote since."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self._path = path
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._tail: tuple[int, dict[str, JsonValue]] | None = None  # (file size, last record)

    def probe(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)

    def _open(self) -> int:
        if self._fd is not None:
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self._path))
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            self._close_fd()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._tail = None
        return self._fd

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._tail = None, None

    def append_many(self, records: Sequence[dict[str, JsonValue]]) -> None:
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)  # one chain across workers and restarts
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if self._tail is not None and self._tail[0] == size:
                    previous: dict[str, JsonValue] | None = self._tail[1]
                else:
                    previous = _last_record(fd, size)
                lines = []
                for record in records:
                    lines.append(_chain(record, previous) + "\n")
                    previous = record
                data = "".join(lines).encode()
                written = os.write(fd, data)
                if written != len(data):
                    self._tail = None
                    raise OSError(f"short write to the audit log ({written} of {len(data)})")
                if self._fsync:
                    os.fsync(fd)
                self._tail = (size + written, previous) if previous is not None else None
            except BaseException:
                self._tail = None
                raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


def _last_record(fd: int, size: int) -> dict[str, JsonValue] | None:
    """The record on the file's last line, read backwards in small steps."""
    if size == 0:
        return None
    start, tail = size, b""
    while start > 0 and (b"\n" not in tail.rstrip(b"\n")) and size - start < _TAIL_BYTES:
        step = min(_TAIL_STEP, start)
        start -= step
        tail = os.pread(fd, step, start) + tail
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
    except json.JSONDecodeError:
        raise OSError("the audit log's last record is damaged; run `kbs audit verify`") from None
    if not isinstance(record, dict) or "hash" not in record or "seq" not in record:
        raise OSError("the audit log's last line is not an audit record")
    return record


class _Batch:
    """The records one event loop submitted while the previous batch was being written."""

    def __init__(self) -> None:
        self.pending: list[tuple[dict[str, JsonValue], asyncio.Future[None]]] = []
        self.writing = False
        self.task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Subject:
    """Who acted: an admin (role, issuer, subject) or a guest (TEE, key hash, token id)."""

    kind: str
    role: str | None = None
    issuer: str | None = None
    subject: str | None = None
    tee: str | None = None
    tee_pubkey_sha256: str | None = None
    token_id: str | None = None

    def to_json(self) -> dict[str, JsonValue]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class AuditLog:
    def __init__(self, sink: AuditSink, *, clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._clock = clock
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batch] = (
            weakref.WeakKeyDictionary()
        )

    def ensure_writable(self) -> None:
        """Raise ServiceUnavailableError now rather than act and fail to record it."""
        try:
            self._sink.probe()
        except OSError as e:
            raise _unavailable(e) from None

    async def record(
        self,
        *,
        action: str,
        decision: str,
        target: str,
        subject: Subject | None,
        request_id: str,
        peer: str | None,
        reason: str = "",
    ) -> None:
        entry: dict[str, JsonValue] = {
            "time": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "peer": peer,
            "subject": subject.to_json() if subject else None,
            "action": action,
            "target": target,
            "decision": decision,
            "reason": reason[:500],
        }
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = _Batch()
        done: asyncio.Future[None] = loop.create_future()
        batch.pending.append((entry, done))
        if not batch.writing:
            batch.writing = True
            batch.task = loop.create_task(self._write(batch))
        await asyncio.shield(done)  # a guest hanging up does not unwrite its record

    async def _write(self, batch: _Batch) -> None:
        try:
            while batch.pending:
                items, batch.pending = batch.pending, []
                try:
                    await asyncio.to_thread(self._sink.append_many, [e for e, _ in items])
                except Exception as e:  # every waiter learns it; none is left hanging
                    failure = _unavailable(e) if isinstance(e, OSError) else e
                    for _, done in items:
                        if not done.done():
                            done.set_exception(failure)
                else:
                    for _, done in items:
                        if not done.done():
                            done.set_result(None)
        finally:
            batch.writing = False


def _unavailable(error: OSError) -> ServiceUnavailableError:
    reason = error.strerror or str(error)
    return ServiceUnavailableError(
        f"the audit log cannot be written ({reason}): releases and admin changes are refused "
        "until it can"
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    problem: str = ""


def verify_file(path: Path) -> VerifyResult:
    """Check the chain; report the first edited, removed, inserted or reordered record."""
    records: list[dict[str, JsonValue]] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                int(record["seq"])
                if "hash" not in record:
                    raise KeyError("hash")
            except (ValueError, KeyError, TypeError):
                return VerifyResult(False, number, f"line {number}: not an audit record (edited?)")
            records.append(record)
    seen = {int(r["seq"]) for r in records}
    for index, record in enumerate(records):
        number, seq = index + 1, int(record["seq"])
        if record_hash(record) != record["hash"]:
            return VerifyResult(False, len(records), f"line {number} (seq {seq}) was edited")
        if index == 0:
            continue
        previous = records[index - 1]
        expected = int(previous["seq"]) + 1
        if seq != expected:
            if expected in seen or seq < expected:
                problem = f"line {number} (seq {seq}) is out of order: seq {expected} expected"
            else:
                problem = f"record(s) seq {expected}..{seq - 1} removed before line {number}"
            return VerifyResult(False, len(records), problem)
        if record.get("prev") != previous["hash"]:
            return VerifyResult(
                False,
                len(records),
                f"line {number} (seq {seq}) does not chain to line {number - 1}: inserted?",
            )
    return VerifyResult(True, len(records))

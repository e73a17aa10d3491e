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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from keybroker.errors import ServiceUnavailableError
from keybroker.protocol.canonical import jcs
from keybroker.protocol.models import JsonValue

GENESIS = "0" * 64
_TAIL_BYTES = 64 * 1024


def record_hash(record: dict[str, JsonValue]) -> str:
    return hashlib.sha256(jcs({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _chain(record: dict[str, JsonValue], previous: dict[str, JsonValue] | None) -> str:
    record["seq"] = int(previous["seq"]) + 1 if previous else 1
    record["prev"] = str(previous["hash"]) if previous else GENESIS
    record["hash"] = record_hash(record)
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


class AuditSink(ABC):
    @abstractmethod
    def append(self, record: dict[str, JsonValue]) -> None:
        """Chain and write one record, durably per the sink's policy; raise OSError."""

    def probe(self) -> None:  # noqa: B027 - sinks that cannot fail
        """Raise OSError if a record could not be written now."""


class StdoutSink(AuditSink):
    def __init__(self) -> None:
        self._previous: dict[str, JsonValue] | None = None
        self._lock = threading.Lock()

    def append(self, record: dict[str, JsonValue]) -> None:
        with self._lock:
            line = _chain(record, self._previous)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self._previous = record


class FileSink(AuditSink):
    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self._path = path
        self._fsync = fsync

    def probe(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)

    def append(self, record: dict[str, JsonValue]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one chain across workers and restarts
            line = _chain(record, _last_record(fd))
            os.write(fd, (line + "\n").encode())
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock


def _last_record(fd: int) -> dict[str, JsonValue] | None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    start = max(0, size - _TAIL_BYTES)
    tail = os.pread(fd, size - start, start).rstrip(b"\n")
    last = tail.rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
    except json.JSONDecodeError:
        raise OSError("the audit log's last record is damaged; run `kbs audit verify`") from None
    if not isinstance(record, dict) or "hash" not in record or "seq" not in record:
        raise OSError("the audit log's last line is not an audit record")
    return record


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

    def ensure_writable(self) -> None:
        """Raise ServiceUnavailableError now rather than act and fail to record it."""
        try:
            self._sink.probe()
        except OSError as e:
            raise _unavailable(e) from None

    def record(
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
        try:
            self._sink.append(entry)
        except OSError as e:
            raise _unavailable(e) from None


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

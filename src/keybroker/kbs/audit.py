"""The audit log: one JSON line per admin operation, attestation and release decision, chained
so that an edited, removed, inserted or reordered record is detectable.

Each record carries ``seq`` (one more than the previous record's), ``prev`` (the previous
record's ``hash``) and ``hash``. With a key (``[audit] key_path``) the hash is an HMAC-SHA256 of
the record's canonical JSON (``"alg": "hmac-sha256"``): nobody without the key can edit a record
and chain it again, so the chain is tamper-evident. Without a key it is a plain SHA-256, which
anyone can recompute: it detects corruption, not tampering.

A keyed chain also holds checkpoints (``"action": "audit.checkpoint"``), keyed like any record:

- ``interval``: after the chain's first batch, then every ``checkpoint_records`` records or
  ``checkpoint_seconds`` seconds. The latest is also written to ``<log>.checkpoint``: removing
  records from the end back past it is detectable, and the writer refuses to extend such a log;
- ``rotated``: the last record of a log file that was rotated away while the KBS ran;
- ``continued``: the first record of the file that replaced it, chained to the ``rotated``
  one (or, for a file found empty, to the checkpoint in ``<log>.checkpoint``).

A log verifies only when it starts at seq 1 or with a ``continued`` checkpoint; truncation after
the last checkpoint, and anything done by someone who holds the key, are not detectable.

The file sink appends under an exclusive ``flock`` and reads the chain's tail from the file
itself, so several worker processes and restarts extend one chain.

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
import hmac
import json
import logging
import os
import secrets
import stat
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from keybroker.config import AuditConfig
from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.protocol.canonical import jcs
from keybroker.protocol.models import JsonValue

log = logging.getLogger(__name__)

GENESIS = "0" * 64
HMAC_ALG = "hmac-sha256"
CHECKPOINT = "audit.checkpoint"
KEY_BYTES = 32
_TAIL_BYTES = 64 * 1024
_TAIL_STEP = 4096
_MAX_KEY_FILE = 1024
_MAX_REOPENS = 5

Record = dict[str, JsonValue]


# --- the key ---------------------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """The HMAC key from ``path`` (64 hex digits), refused if others could read or change it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"cannot read audit key {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as key_file:
        mode = os.fstat(key_file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"audit key {path} is not a regular file")
        # whoever can read the key can forge the whole log: the key is as secret as the log
        if mode & 0o077:
            raise ConfigError(
                f"audit key {path} is accessible to group or others (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 {path}"
            )
        text = key_file.read(_MAX_KEY_FILE + 1)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"audit key {path} must hold {KEY_BYTES * 2} hex digits (kbs audit keygen writes one)"
        )
    return key


def generate_key(path: Path) -> None:
    """Write a new random key to ``path`` (mode 0600); never overwrite a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(KEY_BYTES) + "\n")


# --- chaining --------------------------------------------------------------------------------


def record_hash(record: Record, key: bytes | None = None) -> str:
    body = jcs({k: v for k, v in record.items() if k != "hash"})
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def hash_matches(unverified: Record, key: bytes | None) -> bool:
    """Whether ``unverified`` carries its own hash (an HMAC under ``key`` when given)."""
    try:
        expected = record_hash(unverified, key)
    except (ValueError, TypeError):  # not canonicalizable: NaN, huge integers
        return False
    return hmac.compare_digest(expected, str(unverified.get("hash")))


def _chain(record: Record, previous: Record | None, key: bytes | None = None) -> str:
    record["seq"] = int(str(previous["seq"])) + 1 if previous else 1
    record["prev"] = str(previous["hash"]) if previous else GENESIS
    if key is not None:
        record["alg"] = HMAC_ALG
    record["hash"] = record_hash(record, key)
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def is_checkpoint(record: Record, kind: str | None = None) -> bool:
    return record.get("action") == CHECKPOINT and (kind is None or record.get("checkpoint") == kind)


def checkpoint_path(log_path: Path) -> Path:
    """Where the file sink keeps the log's latest ``interval`` or ``continued`` checkpoint."""
    return log_path.with_name(log_path.name + ".checkpoint")


@dataclass(frozen=True)
class Checkpoints:
    """How often a keyed chain gets a checkpoint: whichever comes first."""

    every_records: int = 1000
    every_seconds: float = 300.0


class Chain:
    """Seals records for one writer: seq, prev, hash (keyed or not), and checkpoints when due.
    It holds no tail: the caller passes the previous record, read from wherever it lives."""

    def __init__(
        self,
        key: bytes | None = None,
        checkpoints: Checkpoints = Checkpoints(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._checkpoints = checkpoints
        self._clock = clock
        self._last_checkpoint = clock()

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def seal(
        self, records: Iterable[Record], previous: Record | None
    ) -> tuple[list[str], Record | None, Record | None]:
        """The lines for ``records`` (plus an interval checkpoint when one is due), the new
        tail, and that checkpoint if any."""
        self.refuse_mixed(previous)
        start = int(str(previous["seq"])) if previous else 0
        lines = []
        for record in records:
            lines.append(_chain(record, previous, self._key))
            previous = record
        if self._key is None or previous is None:
            return lines, previous, None
        end, every = int(str(previous["seq"])), self._checkpoints.every_records
        # the first batch of a chain gets one too, so that every keyed log has a checkpoint
        due = start == 0 or end // every != start // every
        if due or self._clock() - self._last_checkpoint >= self._checkpoints.every_seconds:
            line, checkpoint = self.checkpoint("interval", previous)
            return [*lines, line], checkpoint, checkpoint
        return lines, previous, None

    def verifies(self, record: Record) -> bool:
        """Whether ``record`` is a checkpoint sealed with this chain's key."""
        return (
            self._key is not None
            and record.get("alg") == HMAC_ALG
            and is_checkpoint(record)
            and hash_matches(record, self._key)
        )

    def checkpoint(self, kind: str, previous: Record | None) -> tuple[str, Record]:
        now = self._clock()
        record: Record = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "action": CHECKPOINT,
            "checkpoint": kind,
        }
        line = _chain(record, previous, self._key)
        self._last_checkpoint = now
        return line, record

    def refuse_mixed(self, previous: Record | None) -> None:
        """A keyed record after unkeyed ones (or the reverse) would leave a log that verifies
        neither way: the operator moves the old log aside instead."""
        if previous is None or (previous.get("alg") == HMAC_ALG) == self.keyed:
            return
        if self.keyed:
            raise OSError(
                "the audit log holds unkeyed records but [audit] key_path is set: move the old "
                "log aside (it stays verifiable without --key) and a keyed one starts"
            )
        raise OSError("the audit log holds keyed records but no [audit] key_path is configured")


# --- sinks -----------------------------------------------------------------------------------


class AuditSink(ABC):
    @abstractmethod
    def append_many(self, records: Sequence[Record]) -> None:
        """Chain and write ``records`` in order, durably per the sink's policy; raise OSError
        (then none of them counts as written)."""

    def append(self, record: Record) -> None:
        self.append_many([record])

    def probe(self) -> None:  # noqa: B027 - sinks that cannot fail
        """Raise OSError if a record could not be written now."""


class StdoutSink(AuditSink):
    def __init__(self, chain: Chain | None = None) -> None:
        self._chain = chain or Chain()
        self._previous: Record | None = None
        self._lock = threading.Lock()

    def append_many(self, records: Sequence[Record]) -> None:
        with self._lock:
            lines, previous, _ = self._chain.seal(records, self._previous)
            sys.stdout.write("".join(line + "\n" for line in lines))
            sys.stdout.flush()
            self._previous = previous


class FileSink(AuditSink):
    """Appends under ``flock`` to a file other processes may extend too. The file stays open;
    it is reopened when it was replaced (log rotation: rename it, do not copy and truncate it).
    The chain's tail is remembered with the file size it was written at, and read back from the
    file only when another process wrote since.

    With a key, the first writer that finds the file replaced closes the old file with a
    ``rotated`` checkpoint and starts the new one with a ``continued`` checkpoint, both under
    the old file's lock, so the chain runs on across files."""

    def __init__(self, path: Path, *, fsync: bool = True, chain: Chain | None = None) -> None:
        self._path = path
        self._fsync = fsync
        self._chain = chain or Chain()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._tail: tuple[int, Record] | None = None  # (file size, last record)

    def probe(self) -> None:
        # O_NOFOLLOW: a link planted at the log's path must not make the KBS append elsewhere
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            fd = os.open(self._path, flags, 0o600)
        except FileNotFoundError:  # its directory is gone (or new): make it, then try again
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, flags, 0o600)
        os.close(fd)
        # Hold the file from the first probe (start-up) on, so a worker that has not written
        # yet still finds the file it would rotate away from. Never wait on the event loop.
        if self._fd is None and self._lock.acquire(blocking=False):
            try:
                self._open()
            finally:
                self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._tail = None, None

    def _open(self) -> int:
        if self._fd is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            self._fd = os.open(self._path, flags, 0o600)
            self._tail = None
        return self._fd

    def _lock_current(self) -> tuple[int, Record | None]:
        """The current file, locked; and the rotated file's last record if it was just
        replaced. The check runs under the lock, so no record lands in a file after the
        ``rotated`` checkpoint that closes it."""
        carried: Record | None = None
        for _ in range(_MAX_REOPENS):
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._path))
            except FileNotFoundError:
                same = False
            if same:
                return fd, carried
            try:
                carried = self._close_rotated(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                self._close_fd()
        raise OSError(f"the audit log {self._path} keeps being replaced")

    def _close_rotated(self, fd: int) -> Record | None:
        if not self._chain.keyed:
            return None  # an unkeyed chain starts again at seq 1 in the new file
        last = _last_record(fd, os.lseek(fd, 0, os.SEEK_END))
        if last is None or is_checkpoint(last, "rotated"):
            return last
        self._chain.refuse_mixed(last)
        line, closing = self._chain.checkpoint("rotated", last)
        self._write(fd, [line])
        return closing

    def _write(self, fd: int, lines: Sequence[str]) -> int:
        data = "".join(line + "\n" for line in lines).encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to the audit log ({written} of {len(data)})")
        if self._fsync:
            os.fsync(fd)
        return written

    def append_many(self, records: Sequence[Record]) -> None:
        with self._lock:
            fd, carried = self._lock_current()  # one chain across workers and restarts
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                lines: list[str] = []
                previous: Record | None
                published: Record | None = None
                if self._tail is not None and self._tail[0] == size:
                    previous = self._tail[1]
                else:
                    previous = _last_record(fd, size)
                    carried = carried or self._beyond_end(previous)
                if size == 0 and carried is not None:
                    line, previous = self._chain.checkpoint("continued", carried)
                    lines, published = [line], previous
                sealed, previous, checkpoint = self._chain.seal(records, previous)
                written = self._write(fd, [*lines, *sealed])
                self._tail = (size + written, previous) if previous is not None else None
                if checkpoint or published:
                    self._publish(checkpoint or published)
            except BaseException:
                self._tail = None
                raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _beyond_end(self, last: Record | None) -> Record | None:
        """The published checkpoint when the file ends before it. Records removed from the end
        (a truncation) are refused: writing on would hide them at the next checkpoint. An
        empty file (rotated while no KBS ran, or emptied) gets a chain continued from the
        checkpoint, which the ``continued`` record says."""
        target = checkpoint_path(self._path)
        if not self._chain.keyed:
            return None
        self._chain.refuse_mixed(last)
        if not target.exists():
            if last is None:
                return None  # a new log
            # written after the log: a crash in between leaves the log ending with the
            # checkpoint, the state an earlier checkpoint file would name, so it is restored.
            # Otherwise it was removed, and a cut end would be covered by the next checkpoint.
            if self._chain.verifies(last) and not is_checkpoint(last, "rotated"):
                self._publish(last)
                return None
            raise OSError(f"the audit checkpoint file {target} is missing: run `kbs audit verify`")
        published = read_json_record(target)
        if not self._chain.verifies(published):
            raise OSError(f"{target} does not verify with the audit key: run `kbs audit verify`")
        seq, end = int(str(published["seq"])), int(str(last["seq"])) if last else 0
        if seq <= end:
            return None
        if last is not None:
            raise OSError(
                f"the audit log ends at seq {end} but its last checkpoint is seq {seq}: records "
                "were removed from its end; move it aside and run `kbs audit verify`"
            )
        log.warning("the audit log %s is empty: continuing the chain from seq %s", self._path, seq)
        return published

    def _publish(self, checkpoint: Record | None) -> None:
        """Keep the latest checkpoint beside the log (under the log's lock): a log cut back
        past it no longer holds it. The checkpoint also goes to the service log, which an
        operator may ship elsewhere."""
        if checkpoint is None:
            return
        log.info("audit checkpoint: seq %s hash %s", checkpoint["seq"], checkpoint["hash"])
        target = checkpoint_path(self._path)
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            fd = os.open(temporary, flags, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(checkpoint, separators=(",", ":"), sort_keys=True) + "\n")
                if self._fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(temporary, target)
        except OSError as e:
            # the records are written and chained; the file only names an older checkpoint
            log.error("cannot update the audit checkpoint file %s: %s", target, e.strerror or e)


def read_json_record(path: Path) -> Record:
    with path.open("rb") as source:
        raw = source.read(_TAIL_BYTES)
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or "seq" not in record or "hash" not in record:
        raise OSError(f"{path} is not an audit checkpoint")
    return record


def _last_record(fd: int, size: int) -> Record | None:
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
    except (ValueError, RecursionError):
        raise OSError("the audit log's last record is damaged; run `kbs audit verify`") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("hash"), str)
        or type(record.get("seq")) is not int
    ):
        raise OSError("the audit log's last line is not an audit record")
    return record


def audit_key(config: AuditConfig) -> bytes | None:
    """The HMAC key ``[audit] key_path`` names, if any."""
    return load_key(config.key_path) if config.key_path is not None else None


def audit_log(
    config: AuditConfig, *, clock: Callable[[], float] = time.time, key: bytes | None = None
) -> AuditLog:
    """The audit log ``[audit]`` describes (with ``key``, when the caller loaded it already);
    an unkeyed chain is named as such at start-up."""
    key = key if key is not None else audit_key(config)
    if key is None:
        log.warning(
            "audit log without [audit] key_path: its SHA-256 chain detects corruption, not "
            "tampering (anyone can edit a record and chain it again); kbs audit keygen makes a key"
        )
    checkpoints = Checkpoints(config.checkpoint_records, config.checkpoint_seconds)
    chain = Chain(key, checkpoints, clock=clock)
    if config.sink == "stdout":
        return AuditLog(StdoutSink(chain), clock=clock)
    log.info(
        "audit log: %s (fsync %s, %s)",
        config.path,
        config.fsync,
        "HMAC-SHA256 chain" if key else "unkeyed chain",
    )
    return AuditLog(FileSink(config.path, fsync=config.fsync == "always", chain=chain), clock=clock)


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

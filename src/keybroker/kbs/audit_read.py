"""Reading the audit log back for the admin API (``GET /kbs/v0/audit-log`` and
``/audit-log/attestations``): the newest records first, filtered, a page at a time, with the
verification status of the chain; and the recent attestations those records hold, counted by
TEE and status. It never writes; ``keybroker.kbs.audit`` writes.

Only the file sink can be read back: what went to standard output is the log collector's.

Everything a query controls is bounded: at most ``MAX_LIMIT`` records a page, at most
``SCAN_BYTES`` read back from the page's end (the answer's ``next_cursor`` says where to go
on), filter values of at most ``MAX_FILTER`` characters, and whole-file verification only for
files up to ``VERIFY_MAX_BYTES`` (beyond it, ``kbs audit verify`` on the host, which streams).

The reader takes the log's lock, shared, only to learn the file's size and to read the
checkpoint file: writers append whole records under the exclusive lock, so every byte before
that size belongs to a complete record, and the checkpoint file matches them.

Verification reuses ``keybroker.kbs.audit_verify``; records are data to show, never trusted
(their text reaches a browser: the console renders it as text).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from keybroker.errors import BadRequestError, ServiceUnavailableError
from keybroker.kbs.audit import Record, checkpoint_path, read_json_record
from keybroker.kbs.audit_verify import VerifyResult, verify_lines
from keybroker.protocol.models import JsonValue

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
SCAN_BYTES = 4 * 1024 * 1024
VERIFY_MAX_BYTES = 16 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
MAX_FILTER = 128
DECISIONS = ("allow", "deny", "failure", "success")
_CHUNK = 64 * 1024
_CURSOR = re.compile(r"^([0-9a-f]{1,16})-([0-9]{1,20})$")
_KEYS = ("action", "decision", "target", "since", "limit", "cursor", "verify")
ATTESTATION_KEYS = ("since", "limit", "cursor")  # /audit-log/attestations: attest records only


@dataclass(frozen=True)
class AuditQuery:
    """One page's worth of filters. ``action`` matches whole words from the start (``admin``
    matches ``admin POST resource``, not ``administrator``); ``target`` is a prefix."""

    action: str | None = None
    decision: str | None = None
    target: str | None = None
    since: datetime | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    verify_file: bool = False

    def matches(self, record: Record) -> bool:
        action = str(record.get("action", ""))
        if self.action is not None and not (
            action == self.action or action.startswith(self.action + " ")
        ):
            return False
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.target is not None and not str(record.get("target", "")).startswith(self.target):
            return False
        if self.since is not None:
            when = _time(record.get("time"))
            return when is not None and when >= self.since
        return True


def parse_query(query: Mapping[str, str], keys: tuple[str, ...] = _KEYS) -> AuditQuery:
    """The query string of an audit-log request, checked and bounded (400 otherwise);
    ``keys``: the parameters this endpoint takes."""
    unknown = sorted(set(query) - set(keys))
    if unknown:
        raise BadRequestError(
            f"unknown audit-log parameter {unknown[0][:32]!r} (known: {', '.join(keys)})"
        )
    for name, value in query.items():
        if len(value) > MAX_FILTER:
            raise BadRequestError(f"{name} is longer than {MAX_FILTER} characters")
    decision = query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise BadRequestError(f"decision must be one of {', '.join(DECISIONS)}")
    verify = query.get("verify") or "window"
    if verify not in ("window", "file"):
        raise BadRequestError("verify must be window (the records read) or file (the whole log)")
    return AuditQuery(
        action=query.get("action") or None,
        decision=decision,
        target=query.get("target") or None,
        since=_since(query.get("since") or None),
        limit=_limit(query.get("limit") or None),
        cursor=query.get("cursor") or None,
        verify_file=verify == "file",
    )


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequestError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    when = _time(value)
    if when is None:
        raise BadRequestError("since must be an ISO 8601 time, e.g. 2026-12-07T08:00:00Z")
    return when


def _time(value: JsonValue) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Snapshot:
    """The log as of one moment: its size, which file it is, and its checkpoint file."""

    size: int
    inode: int
    checkpoint: Record | None
    checkpoint_problem: str | None


class ChainStatus(TypedDict):
    """The hash chain of what a page read (``scope = "window"``) or of the whole file."""

    scope: str
    keyed: bool
    status: str  # verified, broken or unchecked
    records: int
    end_checked: bool
    broken_at_seq: int | None
    problem: str
    summary: str


class ScanInfo(TypedDict):
    bytes: int
    reached_start: bool


class AuditPage(TypedDict):
    """``GET /audit-log``: records newest first, and where the next page starts."""

    records: list[Record]
    next_cursor: str | None
    scan: ScanInfo
    chain: ChainStatus


class AttestationRow(TypedDict):
    time: JsonValue
    seq: JsonValue
    tee: JsonValue
    status: str
    decision: JsonValue
    reason: str
    token_id: JsonValue
    peer: JsonValue


class TeeCount(TypedDict):
    tee: str
    status: str
    count: int


class AttestationPage(TypedDict):
    """``GET /audit-log/attestations``: one page's ``attest`` records as rows, counted."""

    attestations: list[AttestationRow]
    by_tee: list[TeeCount]
    next_cursor: str | None
    scan: ScanInfo
    chain: ChainStatus


@dataclass
class _Window:
    """What one page read: its lines (oldest first, for verification) and the matches."""

    start: int
    lines: list[bytes]
    matches: list[Record]


class AuditReader:
    """Reads one file-sink audit log (``[audit] path``), keyed when ``key`` is given."""

    def __init__(self, path: Path, key: bytes | None) -> None:
        self._path = path
        self._key = key

    def page(self, query: AuditQuery) -> AuditPage:
        """Records newest first, ``next_cursor`` (``None`` once the start was read), what was
        scanned, and the chain status of the records read (or of the whole file)."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return _empty(self._key is not None)
        except OSError as e:
            raise ServiceUnavailableError(f"cannot read the audit log: {e.strerror or e}") from None
        try:
            snapshot = self._snapshot(fd)
            end = _cursor_end(fd, query.cursor, snapshot)
            window = _scan(fd, end, query)
            if query.verify_file:
                chain = self._file_chain(fd, snapshot)
            else:
                chain = self._window_chain(window, snapshot, at_end=end == snapshot.size)
        finally:
            os.close(fd)
        return {
            "records": list(window.matches),
            "next_cursor": f"{snapshot.inode:x}-{window.start}" if window.start > 0 else None,
            "scan": {"bytes": end - window.start, "reached_start": window.start == 0},
            "chain": chain,
        }

    def attestations(self, query: AuditQuery) -> AttestationPage:
        """The ``attest`` records of one page, as rows, and their counts by TEE and status
        (over the rows listed: at most ``limit``)."""
        page = self.page(replace(query, action="attest"))
        rows = [_attestation_row(record) for record in page["records"]]
        counts = Counter((str(row["tee"]), str(row["status"])) for row in rows)
        by_tee: list[TeeCount] = [
            {"tee": tee, "status": status, "count": count}
            for (tee, status), count in sorted(counts.items())
        ]
        return {
            "attestations": list(rows),
            "by_tee": by_tee,
            "next_cursor": page["next_cursor"],
            "scan": page["scan"],
            "chain": page["chain"],
        }

    def _snapshot(self, fd: int) -> _Snapshot:
        fcntl.flock(fd, fcntl.LOCK_SH)  # writers append whole records under LOCK_EX
        try:
            stat = os.fstat(fd)
            checkpoint, problem = None, None
            if self._key is not None:
                try:
                    checkpoint = read_json_record(checkpoint_path(self._path))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    problem = f"the checkpoint file cannot be read: {e.strerror or e}"
            return _Snapshot(stat.st_size, stat.st_ino, checkpoint, problem)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _window_chain(self, window: _Window, snapshot: _Snapshot, *, at_end: bool) -> ChainStatus:
        if not window.lines:
            return _chain_status("window", None, self._key is not None, "no records read")
        first_seq = _seq(window.lines[0])
        checkpoint = snapshot.checkpoint
        check_end = (
            self._key is not None
            and at_end
            and checkpoint is not None
            and first_seq is not None
            and _int(checkpoint.get("seq")) >= first_seq
        )
        result = verify_lines(
            window.lines,
            key=self._key,
            last_checkpoint=checkpoint,
            check_end=check_end,
            check_start=window.start == 0,
        )
        return _chain_status("window", result, self._key is not None, snapshot.checkpoint_problem)

    def _file_chain(self, fd: int, snapshot: _Snapshot) -> ChainStatus:
        keyed = self._key is not None
        if snapshot.size > VERIFY_MAX_BYTES:
            return _chain_status(
                "file",
                None,
                keyed,
                f"the log is larger than {VERIFY_MAX_BYTES // (1024 * 1024)} MiB: verify it on "
                "the host with `kbs audit verify`",
            )
        if snapshot.checkpoint_problem is not None:
            result = VerifyResult(False, 0, snapshot.checkpoint_problem, keyed=keyed)
            return _chain_status("file", result, keyed, None)
        lines = os.pread(fd, snapshot.size, 0).split(b"\n") if snapshot.size else []
        if lines and lines[-1] == b"":
            lines.pop()
        # check_end: a keyed log's end is checked against its checkpoint file, as the CLI does
        result = verify_lines(
            lines,
            key=self._key,
            last_checkpoint=snapshot.checkpoint,
            check_end=keyed and snapshot.checkpoint is not None,
        )
        return _chain_status("file", result, keyed, None)


def _empty(keyed: bool) -> AuditPage:
    return {
        "records": [],
        "next_cursor": None,
        "scan": {"bytes": 0, "reached_start": True},
        "chain": _chain_status("window", None, keyed, "the audit log has no records yet"),
    }


def _chain_status(
    scope: str, result: VerifyResult | None, keyed: bool, note: str | None
) -> ChainStatus:
    """``status``: ``verified``, ``broken`` (at ``broken_at_seq`` when one record is to blame)
    or ``unchecked`` (``problem`` says why)."""
    kind = "keyed (HMAC-SHA256)" if keyed else "unkeyed (SHA-256: detects corruption only)"
    if result is None:
        return {
            "scope": scope,
            "keyed": keyed,
            "status": "unchecked",
            "records": 0,
            "end_checked": False,
            "broken_at_seq": None,
            "problem": note or "",
            "summary": f"not checked: {note}",
        }
    if result.ok:
        status, problem = "verified", note or ""
        where = "the whole file" if scope == "file" else "the records read"
        end = ""
        if keyed:  # an unkeyed chain has no checkpoints: its end is never checked
            end = ", up to its checkpoint" if result.end_checked else ", end not checked"
        summary = f"verified: {kind} chain of {where} ({result.records} records){end}"
    else:
        status, problem = "broken", result.problem
        at = f" at seq {result.broken_at_seq}" if result.broken_at_seq is not None else ""
        summary = f"BROKEN{at}: {result.problem} ({kind} chain)"
    return {
        "scope": scope,
        "keyed": keyed,
        "status": status,
        "records": result.records,
        "end_checked": result.end_checked,
        "broken_at_seq": result.broken_at_seq,
        "problem": problem,
        "summary": summary,
    }


def _cursor_end(fd: int, cursor: str | None, snapshot: _Snapshot) -> int:
    """Where a page ends: the file's end, or where the previous page stopped."""
    if cursor is None:
        return snapshot.size
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise BadRequestError("cursor is not one this endpoint gave (next_cursor)")
    inode, offset = int(match.group(1), 16), int(match.group(2))
    if inode != snapshot.inode:
        raise BadRequestError(
            "the cursor belongs to a log file that has been rotated away: start again"
        )
    # a cursor always points at the start of a line: right after a newline
    if not 0 < offset <= snapshot.size or os.pread(fd, 1, offset - 1) != b"\n":
        raise BadRequestError("cursor is not one this endpoint gave (next_cursor)")
    return offset


def _scan(fd: int, end: int, query: AuditQuery) -> _Window:
    """Lines back from ``end`` until ``limit`` matches, ``SCAN_BYTES`` or the file's start."""
    window = _Window(start=end, lines=[], matches=[])
    newest_first: list[bytes] = []
    for offset, line in _lines_backwards(fd, end):
        if line is None:  # not a record a KBS wrote: the chain check says so
            newest_first.append(b"<a line longer than 1 MiB>")
            window.start = 0
            break
        newest_first.append(line)
        window.start = offset
        record = _record(line)
        if record is not None and query.matches(record):
            window.matches.append(record)
        if len(window.matches) >= query.limit or end - offset >= SCAN_BYTES:
            break
    window.lines = newest_first[::-1]
    return window


def _lines_backwards(fd: int, end: int) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line without its newline) from the line that ends at ``end`` back to the
    file's start; ``None`` for a line longer than ``MAX_LINE_BYTES``, and then no more."""
    position, buffer = end, b""  # buffer = the file's bytes [position, not yet yielded)
    while True:
        body = buffer[:-1] if buffer.endswith(b"\n") else buffer
        cut = body.rfind(b"\n")
        if cut >= 0 or position == 0:
            line = body[cut + 1 :]
            if len(line) > MAX_LINE_BYTES:
                yield position + cut + 1, None
                return
            if cut < 0:
                if buffer:
                    yield 0, line
                return
            yield position + cut + 1, line
            buffer = buffer[: cut + 1]
            continue
        if len(buffer) > MAX_LINE_BYTES + 1:
            yield position, None
            return
        step = min(_CHUNK, position)
        position -= step
        buffer = os.pread(fd, step, position) + buffer


def _record(line: bytes) -> Record | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _seq(line: bytes) -> int | None:
    record = _record(line)
    return _int(record.get("seq")) if record is not None else None


def _int(value: JsonValue) -> int:
    return value if type(value) is int else -1


def _attestation_row(record: Record) -> AttestationRow:
    subject = record.get("subject")
    subject = subject if isinstance(subject, dict) else {}
    decision, reason = record.get("decision"), str(record.get("reason", ""))
    # a success's reason is the outcome: "cpu0 affirming", or Intel Trust Authority's
    # "intel trust authority tdx <tcb status>"
    status = reason.removeprefix("cpu0 ") if decision == "success" else "failure"
    return {
        "time": record.get("time"),
        "seq": record.get("seq"),
        # a failed attestation has no verified claims, so no TEE to name
        "tee": subject.get("tee") or "unknown",
        "status": status,
        "decision": decision,
        "reason": reason if decision != "success" else "",
        "token_id": subject.get("token_id"),
        "peer": record.get("peer"),
    }

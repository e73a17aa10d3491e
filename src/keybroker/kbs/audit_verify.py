"""Verifying an audit log (pure, apart from reading the files): each record's hash or HMAC,
the links between records, where the log starts and, for a keyed log, where it ends.

What it detects and what it cannot is spelled out in docs/admin.md: with a key, an edited,
removed, inserted or reordered record, removed first records, and records removed from the end
back past the last checkpoint; not records removed after the last checkpoint, a whole log file
removed, or anything done by someone who holds the key. Without a key, only corruption.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keybroker.kbs.audit import (
    GENESIS,
    HMAC_ALG,
    Record,
    checkpoint_path,
    hash_matches,
    is_checkpoint,
    read_json_record,
)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    problem: str = ""
    keyed: bool = False
    end_checked: bool = False
    broken_at_seq: int | None = None  # the seq of the record where the problem was found


class _ChainError(Exception):
    """Verification stopped at the first problem, named for the operator (and, when one
    record is to blame, its seq)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


def verify_file(
    path: Path,
    *,
    key: bytes | None = None,
    checkpoint_file: Path | None = None,
    check_end: bool = True,
) -> VerifyResult:
    """Check a log: keyed when ``key`` is given. The end of a keyed log is checked against
    ``checkpoint_file`` (by default ``<log>.checkpoint`` when it exists) or a closing
    ``rotated`` checkpoint; ``check_end=False`` skips that, and says so."""
    last_checkpoint: Record | None = None
    if key is not None and check_end:
        default = checkpoint_path(path)
        if checkpoint_file is not None or default.exists():
            last_checkpoint = read_json_record(checkpoint_file or default)
    with path.open("rb") as lines:
        return verify_lines(lines, key=key, last_checkpoint=last_checkpoint, check_end=check_end)


def verify_lines(
    unverified_lines: Iterable[bytes],
    *,
    key: bytes | None = None,
    last_checkpoint: Record | None = None,
    check_end: bool = True,
    check_start: bool = True,
) -> VerifyResult:
    """Check the chain from its first line to its last; report the first problem found.
    ``check_start=False`` checks a stretch taken from the middle of a log (its first record
    is checked on its own, not as the start of a chain)."""
    keyed = key is not None
    try:
        records = _parse(unverified_lines)
    except _ChainError as e:
        return VerifyResult(False, 0, str(e), keyed=keyed, broken_at_seq=e.seq)
    try:
        if not records:
            raise _ChainError("no records: an empty log proves nothing (truncated?)")
        if check_start:
            _check_start(records[0], key)
        else:
            _check_record(1, records[0], key)
        _check_links(records, key)
        end_checked = False
        if key is not None and check_end:
            _check_end(records, key, last_checkpoint)
            end_checked = True
    except _ChainError as e:
        return VerifyResult(False, len(records), str(e), keyed=keyed, broken_at_seq=e.seq)
    return VerifyResult(True, len(records), keyed=keyed, end_checked=end_checked)


def _parse(unverified_lines: Iterable[bytes]) -> list[Record]:
    records: list[Record] = []
    for number, raw in enumerate(unverified_lines, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record["hash"], str):
                raise ValueError("not a record")
            if type(record["seq"]) is not int:
                raise ValueError("seq is not an integer")
        except (ValueError, KeyError, TypeError, RecursionError):
            raise _ChainError(f"line {number}: not an audit record (edited?)") from None
        records.append(record)
    return records


def _seq(record: Record) -> int:
    """The record's ``seq``, which ``_parse`` checked is an integer."""
    seq = record["seq"]
    if type(seq) is not int:
        raise TypeError("seq is not an integer")
    return seq


def _check_record(number: int, record: Record, key: bytes | None) -> None:
    seq, alg = _seq(record), record.get("alg")
    if alg is not None and alg != HMAC_ALG:
        raise _ChainError(f"line {number} (seq {seq}): unknown alg {str(alg)[:40]!r}", seq)
    if key is None and alg == HMAC_ALG:
        raise _ChainError(f"line {number} (seq {seq}) is keyed ({HMAC_ALG}): pass --key FILE", seq)
    if key is not None and alg != HMAC_ALG:
        # a keyed log never holds an unkeyed record: one is a forgery, or this is not a keyed log
        raise _ChainError(
            f"line {number} (seq {seq}) is not keyed: inserted, or an unkeyed log", seq
        )
    if not hash_matches(record, key):
        if key is None:
            raise _ChainError(f"line {number} (seq {seq}) was edited", seq)
        raise _ChainError(
            f"line {number} (seq {seq}) was edited, or the key is not this log's", seq
        )


def _check_start(first: Record, key: bytes | None) -> None:
    _check_record(1, first, key)
    if first["seq"] == 1 and first.get("prev") == GENESIS:
        return
    if key is not None and is_checkpoint(first, "continued"):
        return  # the log continues a rotated file; that file is checked on its own
    raise _ChainError(
        f"the log starts at seq {first['seq']}, not at seq 1"
        + (" or with a 'continued' checkpoint" if key is not None else "")
        + ": its first records were removed",
        int(str(first["seq"])),
    )


def _check_links(records: list[Record], key: bytes | None) -> None:
    seen = {int(str(r["seq"])) for r in records}
    for index in range(1, len(records)):
        record, previous = records[index], records[index - 1]
        number, seq = index + 1, int(str(record["seq"]))
        _check_record(number, record, key)
        if is_checkpoint(record, "continued"):
            raise _ChainError(f"line {number} (seq {seq}): a 'continued' checkpoint mid-log", seq)
        expected = int(str(previous["seq"])) + 1
        if seq != expected:
            if expected in seen or seq < expected:
                problem = f"line {number} (seq {seq}) is out of order: seq {expected} expected"
                raise _ChainError(problem, seq)
            raise _ChainError(
                f"record(s) seq {expected}..{seq - 1} removed before line {number}", expected
            )
        if record.get("prev") != previous["hash"]:
            raise _ChainError(
                f"line {number} (seq {seq}) does not chain to line {number - 1}: inserted?", seq
            )


def _check_end(records: list[Record], key: bytes, last_checkpoint: Record | None) -> None:
    first, last = int(str(records[0]["seq"])), int(str(records[-1]["seq"]))
    if last_checkpoint is None:
        if is_checkpoint(records[-1], "rotated"):
            return
        raise _ChainError(
            "the end of the log cannot be checked: no checkpoint file, and the log does not end "
            "with a 'rotated' checkpoint (pass --checkpoint FILE, or --no-end-check)"
        )
    alg = last_checkpoint.get("alg")
    unverified_hash = str(last_checkpoint.get("hash"))
    if (
        alg != HMAC_ALG
        or not is_checkpoint(last_checkpoint)
        or not hash_matches(last_checkpoint, key)
    ):
        raise _ChainError("the checkpoint file does not verify with this key")
    seq = int(str(last_checkpoint["seq"]))
    if seq > last:
        raise _ChainError(
            f"records removed from the end: the log ends at seq {last}, "
            f"its last checkpoint is seq {seq}",
            last + 1,
        )
    if seq < first:
        raise _ChainError(
            f"the checkpoint file names seq {seq}, before this log's first record (seq {first}): "
            "a stale checkpoint file, or an earlier log's"
        )
    if records[seq - first]["hash"] != unverified_hash:
        raise _ChainError(
            f"seq {seq} is not the checkpoint the checkpoint file names: rewritten?", seq
        )

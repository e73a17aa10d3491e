"""The keyed audit chain: what an attacker without the key can no longer do to the log unseen,
what stays undetectable (pinned here as in docs/admin.md), rotation, and the key file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from audit_records import record_attest
from conftest import FakeClock, kbs_config
from keybroker.cli.kbs import main as kbs_main
from keybroker.client.admin import AdminClient
from keybroker.errors import ConfigError, ServiceUnavailableError
from keybroker.kbs.app import create_app
from keybroker.kbs.audit import (
    AuditLog,
    Chain,
    Checkpoints,
    FileSink,
    StdoutSink,
    _chain,
    checkpoint_path,
    load_key,
)
from keybroker.protocol.models import JsonValue


def _keygen(path: Path) -> bytes:
    assert kbs_main(["audit", "keygen", "--out", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    return load_key(path)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _keyed_log(
    tmp_path: Path, count: int, *, every: int = 5, clock: FakeClock | None = None
) -> tuple[Path, Path, AuditLog]:
    """A log of ``count`` records (one batch each), keyed, a checkpoint every ``every``."""
    key_file, log = tmp_path / "audit.key", tmp_path / "audit.log"
    clock = clock or FakeClock()
    chain = Chain(_keygen(key_file), Checkpoints(every, 3600), clock=clock)
    audit = AuditLog(FileSink(log, chain=chain), clock=clock)

    async def scenario() -> None:
        for number in range(count):
            await record_attest(audit, number)

    asyncio.run(scenario())
    return log, key_file, audit


def _verify(log: Path, *extra: str) -> int:
    return kbs_main(["audit", "verify", *extra, str(log)])


def _checkpoints(log: Path) -> list[int]:
    """Line indexes of the checkpoints."""
    return [i for i, line in enumerate(_lines(log)) if '"action":"audit.checkpoint"' in line]


def test_keyed_log_through_the_kbs_verifies_to_its_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file, log = tmp_path / "audit.key", tmp_path / "audit.log"
    _keygen(key_file)
    audit = {"path": str(log), "key_path": str(key_file), "checkpoint_records": 3}
    with TestClient(create_app(kbs_config(audit=audit))) as client:
        admin = AdminClient("http://testserver", http=client)
        for index in range(7):
            admin.set_resource(f"r/t/{index}", b"x")
    records = [json.loads(line) for line in _lines(log)]
    assert all(r["alg"] == "hmac-sha256" for r in records)
    last = records[_checkpoints(log)[-1]]
    assert json.loads(checkpoint_path(log).read_text()) == last
    capsys.readouterr()
    assert _verify(log, "--key", str(key_file)) == 0
    assert "keyed chain intact up to its end" in capsys.readouterr().out


def test_edited_record_rechained_without_the_key_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 8)
    original = _lines(log)
    for attacker_key in (None, bytes(32)):  # the code's own _chain, unkeyed or with a guess
        records: list[dict[str, JsonValue]] = [json.loads(line) for line in original]
        records[2]["decision"] = "deny"
        lines = original[:2]
        for index in range(2, len(records)):
            records[index].pop("alg", None)
            lines.append(_chain(records[index], records[index - 1], attacker_key))
        _write(log, lines)
        capsys.readouterr()
        assert _verify(log, "--key", str(key_file)) == 2
        assert "line 3 (seq 3)" in capsys.readouterr().err


def test_unkeyed_chain_is_named_corruption_detecting_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented limit of the unkeyed mode: a re-chained edit verifies, and verify says
    what that result is worth."""
    log = tmp_path / "audit.log"
    audit = AuditLog(FileSink(log))
    asyncio.run(record_attest(audit, 1))
    record: dict[str, Any] = json.loads(_lines(log)[0])
    record["decision"] = "deny"
    _write(log, [_chain(record, None)])
    assert _verify(log) == 0
    assert "unkeyed: this detects corruption, not tampering" in capsys.readouterr().out


@pytest.mark.parametrize("removed", [1, 5, 6, 50])
def test_deleted_first_records_are_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], removed: int
) -> None:
    """Line 6 is an interval checkpoint: a log may start at seq 1 or with a 'continued'
    checkpoint only, never with any other."""
    log, key_file, _ = _keyed_log(tmp_path, 60)
    assert 5 in _checkpoints(log)
    _write(log, _lines(log)[removed:])
    assert _verify(log, "--key", str(key_file)) == 2
    assert "its first records were removed" in capsys.readouterr().err


def test_deleted_first_records_of_an_unkeyed_log_are_detected(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    audit = AuditLog(FileSink(log))
    for number in range(3):
        asyncio.run(record_attest(audit, number))
    _write(log, _lines(log)[1:])
    assert _verify(log) == 2


def test_truncated_tail_before_last_checkpoint_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 14)
    last_checkpoint = _checkpoints(log)[-1]
    original = _lines(log)
    assert last_checkpoint < len(original) - 1  # records follow it
    for cut in (last_checkpoint, last_checkpoint - 3, 1):
        _write(log, original[:cut])
        capsys.readouterr()
        assert _verify(log, "--key", str(key_file)) == 2
        assert "records removed from the end" in capsys.readouterr().err
    # documented limit: records after the last checkpoint can go unseen
    _write(log, original[: last_checkpoint + 1])
    assert _verify(log, "--key", str(key_file)) == 0


def test_deleted_checkpoint_file_fails_closed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 14)
    checkpoint_path(log).unlink()
    assert _verify(log, "--key", str(key_file)) == 2
    assert "the end of the log cannot be checked" in capsys.readouterr().err
    assert _verify(log, "--key", str(key_file), "--no-end-check") == 0
    assert "end not checked" in capsys.readouterr().out


def test_empty_file_does_not_verify_as_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 3)
    log.write_bytes(b"")
    for extra in (("--key", str(key_file)), ()):
        capsys.readouterr()
        assert _verify(log, *extra) == 2
        assert "no records" in capsys.readouterr().err


def test_wrong_key_fails_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, _, _ = _keyed_log(tmp_path, 3)
    other = tmp_path / "other.key"
    _keygen(other)
    capsys.readouterr()
    assert _verify(log, "--key", str(other)) == 2
    assert "the key is not this log's" in capsys.readouterr().err
    assert _verify(log) == 2  # a keyed log never verifies without its key
    assert "pass --key FILE" in capsys.readouterr().err


def test_time_based_checkpoint(tmp_path: Path) -> None:
    clock = FakeClock()
    log, key_file, audit = _keyed_log(tmp_path, 2, every=1000, clock=clock)
    assert _checkpoints(log) == [1]  # the chain's first batch gets one
    clock.advance(3599)
    asyncio.run(record_attest(audit, 2))
    assert _checkpoints(log) == [1]
    clock.advance(1)
    asyncio.run(record_attest(audit, 3))
    assert _checkpoints(log) == [1, 5]
    assert _verify(log, "--key", str(key_file)) == 0


def test_rotated_keyed_log_chains_across_files(tmp_path: Path) -> None:
    log, key_file, audit = _keyed_log(tmp_path, 3)
    rotated = tmp_path / "audit.log.1"
    log.rename(rotated)
    asyncio.run(record_attest(audit, 3))
    old, new = (
        [json.loads(line) for line in _lines(rotated)],
        [json.loads(line) for line in _lines(log)],
    )
    assert old[-1]["checkpoint"] == "rotated"
    assert new[0]["checkpoint"] == "continued" and new[0]["prev"] == old[-1]["hash"]
    assert [r["seq"] for r in new] == [old[-1]["seq"] + 1, old[-1]["seq"] + 2]
    assert _verify(rotated, "--key", str(key_file)) == 0  # its end: the 'rotated' checkpoint
    assert _verify(log, "--key", str(key_file)) == 0  # its end: the checkpoint file
    _write(rotated, _lines(rotated)[:-1])  # the closing checkpoint removed
    assert _verify(rotated, "--key", str(key_file)) == 2


def test_keyed_sink_refuses_to_extend_an_unkeyed_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    asyncio.run(record_attest(AuditLog(FileSink(log)), 1))
    keyed = AuditLog(FileSink(log, chain=Chain(bytes(range(32)))))
    with pytest.raises(ServiceUnavailableError, match="holds unkeyed records"):
        asyncio.run(record_attest(keyed, 2))


def test_group_readable_audit_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "audit.key"
    _keygen(key_file)
    key_file.chmod(0o640)
    config = kbs_config(audit={"path": str(tmp_path / "audit.log"), "key_path": str(key_file)})
    with pytest.raises(ConfigError, match="chmod 600"):
        create_app(config)
    (tmp_path / "audit.log").write_text("")
    assert _verify(tmp_path / "audit.log", "--key", str(key_file)) == 1
    assert "accessible to group or others (mode 0640)" in capsys.readouterr().err


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "audit.key"
    key = _keygen(key_file)
    assert kbs_main(["audit", "keygen", "--out", str(key_file)]) == 1
    assert "File exists" in capsys.readouterr().err
    assert load_key(key_file) == key


def test_truncated_tail_is_not_extended_to_hide_the_truncation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writing on would put a new checkpoint in the checkpoint file, and the cut would then
    verify: the KBS refuses (503) instead."""
    log, key_file, audit = _keyed_log(tmp_path, 14)
    _write(log, _lines(log)[: _checkpoints(log)[-1]])
    restarted = AuditLog(FileSink(log, chain=Chain(load_key(key_file), Checkpoints(5, 3600))))
    for writer in (audit, restarted):
        with pytest.raises(ServiceUnavailableError, match="records were removed from its end"):
            asyncio.run(record_attest(writer, 99))
    assert _verify(log, "--key", str(key_file)) == 2
    assert "records removed from the end" in capsys.readouterr().err


def test_emptied_log_is_continued_from_the_checkpoint_file(tmp_path: Path) -> None:
    """Emptied (or rotated while no KBS ran): the next record continues the chain from the
    checkpoint file rather than starting a second seq 1; until then it does not verify."""
    log, key_file, _ = _keyed_log(tmp_path, 7)
    published = json.loads(checkpoint_path(log).read_text())
    log.write_bytes(b"")
    assert _verify(log, "--key", str(key_file)) == 2
    restarted = AuditLog(FileSink(log, chain=Chain(load_key(key_file), Checkpoints(5, 3600))))
    asyncio.run(record_attest(restarted, 99))
    first = json.loads(_lines(log)[0])
    assert first["checkpoint"] == "continued" and first["prev"] == published["hash"]
    assert first["seq"] == published["seq"] + 1
    assert _verify(log, "--key", str(key_file)) == 0


def test_forged_checkpoint_file_is_refused(tmp_path: Path) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 3)
    published = json.loads(checkpoint_path(log).read_text())
    published["seq"] = 1000
    checkpoint_path(log).write_text(json.dumps(published))
    assert _verify(log, "--key", str(key_file)) == 2
    with pytest.raises(ServiceUnavailableError, match="does not verify with the audit key"):
        asyncio.run(record_attest(AuditLog(FileSink(log, chain=Chain(load_key(key_file)))), 4))


def test_removed_checkpoint_file_is_not_recreated_over_a_cut_log(tmp_path: Path) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 14)
    checkpoint_path(log).unlink()
    _write(log, _lines(log)[:-1])  # the cut ends on a record, not a checkpoint
    assert _checkpoints(log)[-1] < len(_lines(log)) - 1
    restarted = AuditLog(FileSink(log, chain=Chain(load_key(key_file), Checkpoints(5, 3600))))
    with pytest.raises(ServiceUnavailableError, match=r"checkpoint file .* is missing"):
        asyncio.run(record_attest(restarted, 99))


def test_checkpoint_file_lost_in_a_crash_is_restored_from_the_log_end(tmp_path: Path) -> None:
    """A crash between the log's write and the checkpoint file's leaves the log ending with
    the checkpoint: writing goes on, and the file names it again."""
    log, key_file, _ = _keyed_log(tmp_path, 4)  # ends with the checkpoint after seq 5
    assert _checkpoints(log)[-1] == len(_lines(log)) - 1
    checkpoint_path(log).unlink()
    restarted = AuditLog(FileSink(log, chain=Chain(load_key(key_file), Checkpoints(5, 3600))))
    asyncio.run(record_attest(restarted, 99))
    assert _verify(log, "--key", str(key_file)) == 0


@pytest.mark.parametrize(
    "line",
    [
        '{"seq": 1.5, "hash": "x"}',
        '{"seq": 1, "hash": "x", "n": NaN}',
        '{"seq": 1, "hash": "x", "n": 123456789012345678901234567890}',
        "[" * 100_000 + "]" * 100_000,
        "\xff",
    ],
)
def test_malformed_log_lines_are_reported_not_crashed_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    log, key_file, _ = _keyed_log(tmp_path, 3)
    log.write_bytes(line.encode("latin-1") + b"\n")
    assert _verify(log, "--key", str(key_file)) == 2
    assert "TAMPERED: line 1" in capsys.readouterr().err
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(record_attest(AuditLog(FileSink(log, chain=Chain(load_key(key_file)))), 9))


def test_unkeyed_audit_log_warns_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_app(kbs_config(audit={"path": str(tmp_path / "audit.log")}))
    assert "detects corruption, not tampering" in caplog.text
    caplog.clear()
    key_file = tmp_path / "audit.key"
    _keygen(key_file)
    create_app(kbs_config(audit={"path": str(tmp_path / "k.log"), "key_path": str(key_file)}))
    assert "not tampering" not in caplog.text


def test_worker_that_had_not_written_yet_still_continues_a_rotated_log(tmp_path: Path) -> None:
    """Its first write after a rotation closes the old file and chains the new one to it,
    not to the (older) checkpoint in the checkpoint file."""
    log, key_file, _ = _keyed_log(tmp_path, 3)
    idle = AuditLog(FileSink(log, chain=Chain(load_key(key_file), Checkpoints(5, 3600))))
    idle.ensure_writable()  # what every worker does at start-up
    asyncio.run(record_attest(AuditLog(FileSink(log, chain=Chain(load_key(key_file)))), 3))
    rotated = tmp_path / "audit.log.1"
    log.rename(rotated)
    asyncio.run(record_attest(idle, 4))
    old_last, new_first = json.loads(_lines(rotated)[-1]), json.loads(_lines(log)[0])
    assert old_last["checkpoint"] == "rotated" and new_first["prev"] == old_last["hash"]
    assert _verify(rotated, "--key", str(key_file)) == 0
    assert _verify(log, "--key", str(key_file)) == 0


def test_keyed_stdout_sink_output_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "audit.key"
    chain = Chain(_keygen(key_file), Checkpoints(3, 3600))
    capsys.readouterr()
    audit = AuditLog(StdoutSink(chain))
    for number in range(5):
        asyncio.run(record_attest(audit, number))
    collected = tmp_path / "collected.log"
    collected.write_text(capsys.readouterr().out)
    assert _checkpoints(collected)
    assert _verify(collected, "--key", str(key_file)) == 2  # no checkpoint file to end on
    assert _verify(collected, "--key", str(key_file), "--no-end-check") == 0
    assert _verify(collected, "--no-end-check") == 1  # an option of keyed verification only

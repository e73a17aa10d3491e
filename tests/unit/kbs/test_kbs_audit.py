"""The audit log: one record per decision, a verifiable chain, and fail-closed releases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from audit_records import record_attest
from conftest import kbs_config
from keybroker.cli.kbs import main as kbs_main
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import ServiceUnavailableError
from keybroker.kbs.app import create_app
from keybroker.kbs.audit import AuditLog, FileSink, record_hash
from keybroker.kbs.audit_verify import VerifyResult, verify_file
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.models import JsonValue

SECRET = b"top-secret-value-never-logged"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _app(log: Path) -> TestClient:
    return TestClient(create_app(kbs_config(audit={"path": str(log)})))


def test_release_denial_and_admin_change_each_one_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _app(log) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource("default/key/one", SECRET)
        records = _records(log)
        assert len(records) == 1
        assert records[0]["action"] == "admin POST resource"
        assert records[0]["target"] == "default/key/one"
        assert records[0]["decision"] == "allow"
        assert records[0]["subject"] == {"kind": "admin", "role": "InsecureAllowAll"}

        guest = KbsClient("http://testserver", http=client)
        with pytest.raises(Exception, match="403"):
            guest.get_resource("default/key/one")  # default policy: sample denied
        attest, denial = _records(log)[1:]
        assert attest["action"] == "attest" and attest["decision"] == "success"
        assert attest["subject"]["tee"] == "sample"
        assert len(attest["subject"]["tee_pubkey_sha256"]) == 64
        assert denial["action"] == "release GET resource" and denial["decision"] == "deny"
        assert denial["subject"]["token_id"] == attest["subject"]["token_id"]

        admin.set_resource_policy(builtin_policy("allow_all"))
        assert guest.get_resource("default/key/one") == SECRET
        release = _records(log)[-1]
        assert release["decision"] == "allow" and release["target"] == "default/key/one"
        assert {r["request_id"] for r in _records(log)} == {r["request_id"] for r in _records(log)}
        assert len(_records(log)) == 5
    text = log.read_text()
    assert SECRET.decode() not in text  # never the secret,
    assert guest.token is not None and guest.token not in text  # the token,
    assert "package policy" not in text  # or the policy body
    assert verify_file(log).ok


def test_tokenless_request_and_missing_resource_are_recorded(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _app(log) as client:
        assert client.get("/kbs/v0/resource/a/b/c").status_code == 401
        AdminClient("http://testserver", http=client).set_resource_policy(
            builtin_policy("allow_all")
        )
        guest = KbsClient("http://testserver", http=client)
        with pytest.raises(Exception, match="404"):
            guest.get_resource("a/b/missing")
    tokenless, _, _, missing = _records(log)
    assert tokenless["decision"] == "deny" and "Token not found" in tokenless["reason"]
    assert missing["decision"] == "failure" and "resource not found" in missing["reason"]


def test_failed_attestation_is_recorded(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    with _app(log) as client:
        client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
        reply = client.post("/kbs/v0/attest", content=b'{"runtime-data": 1}')
        assert reply.status_code == 400
    (record,) = _records(log)
    assert record["action"] == "attest" and record["decision"] == "failure"
    assert "malformed" in record["reason"]


def _chain(tmp_path: Path, count: int = 5) -> Path:
    log = tmp_path / "audit.log"
    with _app(log) as client:
        admin = AdminClient("http://testserver", http=client)
        for index in range(count):
            admin.set_resource(f"r/t/{index}", b"x")
    return log


def test_verify_passes_on_untouched_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _chain(tmp_path)
    assert kbs_main(["audit", "verify", str(log)]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out


def test_verify_pinpoints_an_edit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _chain(tmp_path)
    lines = log.read_text().splitlines()
    lines[2] = lines[2].replace('"decision":"allow"', '"decision":"deny"')
    log.write_text("\n".join(lines) + "\n")
    assert kbs_main(["audit", "verify", str(log)]) == 2
    assert "line 3 (seq 3) was edited" in capsys.readouterr().err


def test_verify_pinpoints_a_deletion(tmp_path: Path) -> None:
    log = _chain(tmp_path)
    lines = log.read_text().splitlines()
    del lines[1]
    log.write_text("\n".join(lines) + "\n")
    result = verify_file(log)
    assert not result.ok and "seq 2..2 removed before line 2" in result.problem


def test_verify_pinpoints_a_swap(tmp_path: Path) -> None:
    log = _chain(tmp_path)
    lines = log.read_text().splitlines()
    lines[1], lines[3] = lines[3], lines[1]
    log.write_text("\n".join(lines) + "\n")
    result = verify_file(log)
    assert not result.ok and "line 2 (seq 4) is out of order" in result.problem


def test_verify_pinpoints_an_insertion(tmp_path: Path) -> None:
    log = _chain(tmp_path, 3)
    lines = log.read_text().splitlines()
    forged = json.loads(lines[1])
    forged["target"] = "forged"
    forged["hash"] = record_hash(forged)  # internally consistent, but not chained
    lines.insert(2, json.dumps(forged))
    log.write_text("\n".join(lines) + "\n")
    result = verify_file(log)
    assert not result.ok and "line 3" in result.problem


def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    log = _chain(tmp_path, 2)
    with _app(log) as client:
        AdminClient("http://testserver", http=client).set_resource("a/b/c", b"x")
    assert [r["seq"] for r in _records(log)] == [1, 2, 3]
    assert verify_file(log).ok


def test_unwritable_sink_refuses_release_and_admin_change_then_recovers(tmp_path: Path) -> None:
    log_dir = tmp_path / "audit"
    log = log_dir / "audit.log"
    with _app(log) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource("a/b/c", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://testserver", http=client)
        guest.attest()
        # the sink breaks: the log's path becomes a directory (works as root, unlike chmod)
        log.unlink()
        log.mkdir()
        reply = client.get("/kbs/v0/resource/a/b/c")
        assert reply.status_code == 503
        assert "audit log cannot be written" in reply.json()["detail"]
        assert "ciphertext" not in reply.text
        change = client.post("/kbs/v0/resource/a/b/d", content=b"new")
        assert change.status_code == 503
        assert client.get("/kbs/v0/resource/a/b/d").status_code == 503
        log.rmdir()  # the sink recovers without a restart
        assert guest.get_resource("a/b/c") == SECRET
    assert not (tmp_path / "a").exists()


def test_symlink_at_the_audit_path_is_refused_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a log\n")
    log = tmp_path / "audit.log"
    log.symlink_to(elsewhere)
    audit = AuditLog(FileSink(log))
    with pytest.raises(ServiceUnavailableError, match="audit log cannot be written"):
        audit.ensure_writable()
    with pytest.raises(OSError):
        FileSink(log).append_many([{"action": "attest"}])
    assert elsewhere.read_text() == "not a log\n"  # nothing was appended through the link


# --- group commit ------------------------------------------------------------------------------


class CountingSink(FileSink):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def append_many(self, records: Sequence[dict[str, JsonValue]]) -> None:
        self.batches.append(len(records))
        super().append_many(records)


def test_concurrent_records_share_writes_and_keep_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    sink = CountingSink(log)
    audit = AuditLog(sink)

    async def scenario() -> None:
        await asyncio.gather(*(record_attest(audit, n) for n in range(200)))

    asyncio.run(scenario())
    assert verify_file(log) == VerifyResult(True, 200)
    assert sorted(int(r["target"]) for r in _records(log)) == list(range(200))
    assert sum(sink.batches) == 200 and len(sink.batches) < 200  # one fsync per batch


def test_two_processes_writers_extend_one_chain(tmp_path: Path) -> None:
    """Each sink remembers the chain's tail; a record the other wrote in between is read back."""
    log = tmp_path / "audit.log"
    first, second = AuditLog(FileSink(log)), AuditLog(FileSink(log))

    async def scenario() -> None:
        for n in range(10):
            await record_attest(first if n % 3 else second, n)

    asyncio.run(scenario())
    assert verify_file(log) == VerifyResult(True, 10)


def test_rotated_log_is_reopened(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    audit = AuditLog(FileSink(log))
    asyncio.run(record_attest(audit, 1))
    log.rename(tmp_path / "audit.log.1")
    asyncio.run(record_attest(audit, 2))
    assert [r["target"] for r in _records(log)] == ["2"]
    assert [r["target"] for r in _records(tmp_path / "audit.log.1")] == ["1"]


def test_failed_write_fails_every_record_of_its_batch(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.mkdir()  # unwritable: a directory
    audit = AuditLog(FileSink(log))

    async def scenario() -> list[BaseException | None]:
        return await asyncio.gather(
            *(record_attest(audit, n) for n in range(5)), return_exceptions=True
        )

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, ServiceUnavailableError) for o in outcomes)


class BrokenSink(FileSink):
    def append_many(self, records: Sequence[dict[str, JsonValue]]) -> None:
        raise TypeError("a bug in a sink")


def test_sink_bug_fails_its_records_instead_of_leaving_them_waiting(tmp_path: Path) -> None:
    audit = AuditLog(BrokenSink(tmp_path / "audit.log"))

    async def scenario() -> list[BaseException | None]:
        records = (record_attest(audit, n) for n in range(3))
        return await asyncio.wait_for(asyncio.gather(*records, return_exceptions=True), 5)

    assert all(isinstance(o, TypeError) for o in asyncio.run(scenario()))

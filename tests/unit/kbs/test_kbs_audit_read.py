"""Reading the audit log back (GET /kbs/v0/audit-log and /audit-log/attestations): newest
first, filters, pages, every bound an admin's query could push on, and the chain status."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import FakeClock, kbs_config
from json_shapes import at, integer, obj, objs
from keybroker.cli.kbs import main as kbs_main
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.config import AclRule
from keybroker.errors import AdminDeniedError
from keybroker.kbs import audit_read
from keybroker.kbs.admin_auth import AdminIdentity, RegexAcl
from keybroker.kbs.app import create_app
from keybroker.kbs.audit import AuditLog, Chain, Checkpoints, FileSink, load_key, record_hash
from keybroker.kbs.audit_read import AuditPage, AuditQuery, AuditReader, parse_query
from keybroker.kbs.resource_policy import builtin_policy

# (action, decision, target) of the records _log writes, oldest first; one minute apart
RECORDS = [
    ("admin POST resource", "allow", "tenant-a/key/one"),
    ("attest", "success", ""),
    ("release GET resource", "deny", "tenant-a/key/one"),
    ("admin POST resource-policy", "allow", ""),
    ("release GET resource", "allow", "tenant-b/key/two"),
    ("admin DELETE resource", "deny", "tenant-b/key/two"),
    ("attest", "failure", ""),
]


def _log(path: Path, *, key: bytes | None = None, count: int = len(RECORDS)) -> None:
    clock = FakeClock()
    chain = Chain(key, Checkpoints(1000, 3600), clock=clock)
    audit = AuditLog(FileSink(path, chain=chain), clock=clock)

    async def write() -> None:
        for number in range(count):
            action, decision, target = RECORDS[number % len(RECORDS)]
            await audit.record(
                action=action,
                decision=decision,
                target=target,
                subject=None,
                request_id=f"r{number}",
                peer=None,
            )
            clock.advance(60)

    asyncio.run(write())


def _seqs(page: AuditPage) -> list[int]:
    return [integer(record["seq"]) for record in page["records"]]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    _log(path)
    return path


def test_records_come_newest_first_with_the_chain_verified(log: Path) -> None:
    page = AuditReader(log, None).page(AuditQuery())
    assert _seqs(page) == [7, 6, 5, 4, 3, 2, 1]
    assert page["next_cursor"] is None and page["scan"]["reached_start"]
    chain = page["chain"]
    assert chain["status"] == "verified" and chain["scope"] == "window"
    assert chain["keyed"] is False and chain["records"] == 7
    assert "unkeyed" in chain["summary"] and "corruption only" in chain["summary"]


def test_filters_match_action_words_decision_target_prefix_and_since(log: Path) -> None:
    reader = AuditReader(log, None)

    def seqs(**query: str) -> list[int]:
        return _seqs(reader.page(parse_query(query)))

    assert seqs(action="admin") == [6, 4, 1]
    assert seqs(action="admin POST") == [4, 1]
    assert seqs(action="adm") == []  # whole words only
    assert seqs(action="attest") == [7, 2]
    assert seqs(decision="deny") == [6, 3]
    assert seqs(target="tenant-b/") == [6, 5]
    first = json.loads(log.read_text().splitlines()[0])["time"]  # 1_800_000_000 s, UTC
    assert first.startswith("2027-01-15T08:00:00")
    assert seqs(since="2027-01-15T08:04:00Z") == [7, 6, 5]
    assert seqs(since="2027-01-15T08:04:00") == [7, 6, 5]  # no zone: UTC
    assert seqs(action="release", decision="allow", target="tenant-b") == [5]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"limit": "501"}, "from 1 to 500"),
        ({"limit": "0"}, "from 1 to 500"),
        ({"limit": "-1"}, "from 1 to 500"),
        ({"limit": "1e3"}, "from 1 to 500"),
        ({"decision": "maybe"}, "decision must be one of"),
        ({"since": "yesterday"}, "ISO 8601"),
        ({"verify": "everything"}, "verify must be"),
        ({"action": "a" * 129}, "longer than 128"),
        ({"target": "t" * 129}, "longer than 128"),
        ({"sql": "1=1"}, "unknown audit-log parameter"),
    ],
)
def test_unbounded_or_malformed_queries_are_refused(query: dict[str, str], message: str) -> None:
    with pytest.raises(Exception, match=message) as refused:
        parse_query(query)
    assert getattr(refused.value, "status", None) == 400


def test_pages_follow_the_cursor_to_the_start_without_gaps_or_repeats(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path, count=25)
    reader = AuditReader(path, None)
    seen: list[int] = []
    cursor: str | None = None
    for _ in range(10):
        page = reader.page(AuditQuery(limit=7, cursor=cursor))
        seen += _seqs(page)
        assert page["chain"]["status"] == "verified"
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(25, 0, -1))


def test_a_page_keeps_to_its_cursor_while_records_are_added(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path, count=10)
    reader = AuditReader(path, None)
    first = reader.page(AuditQuery(limit=4))
    with path.open("a") as out:  # a writer appends meanwhile (chain continuity not needed here)
        out.write(path.read_text().splitlines()[-1] + "\n")
    second = reader.page(AuditQuery(limit=4, cursor=first["next_cursor"]))
    assert _seqs(first) == [10, 9, 8, 7] and _seqs(second) == [6, 5, 4, 3]


@pytest.mark.parametrize("cursor", ["zz-10", "1-2-3", "", "0" * 17 + "-1", "1-" + "9" * 21])
def test_forged_cursor_is_refused(log: Path, cursor: str) -> None:
    query = parse_query({"cursor": cursor}) if cursor else AuditQuery(cursor="x")
    with pytest.raises(Exception, match="cursor") as refused:
        AuditReader(log, None).page(query)
    assert getattr(refused.value, "status", None) == 400


def test_cursor_into_the_middle_of_a_line_or_past_the_end_is_refused(log: Path) -> None:
    inode = os.stat(log).st_ino
    reader = AuditReader(log, None)
    for offset in (5, log.stat().st_size + 10):
        with pytest.raises(Exception, match="not one this endpoint gave"):
            reader.page(AuditQuery(cursor=f"{inode:x}-{offset}"))


def test_cursor_of_a_rotated_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path, count=10)
    cursor = AuditReader(path, None).page(AuditQuery(limit=3))["next_cursor"]
    path.rename(tmp_path / "audit.log.1")
    _log(path, count=10)
    with pytest.raises(Exception, match="rotated away"):
        AuditReader(path, None).page(AuditQuery(cursor=cursor))


def test_one_request_reads_at_most_scan_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    _log(path, count=60)
    monkeypatch.setattr(audit_read, "SCAN_BYTES", 2000)
    page = AuditReader(path, None).page(AuditQuery(action="nothing-matches"))
    assert page["records"] == []
    assert 2000 <= page["scan"]["bytes"] < 2000 + 1000  # stops within a line of the bound
    assert page["next_cursor"] is not None and not page["scan"]["reached_start"]


def test_a_line_longer_than_the_bound_stops_the_scan_and_breaks_the_chain(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    _log(path, count=3)
    with path.open("ab") as out:
        out.write(b"x" * (audit_read.MAX_LINE_BYTES + 10) + b"\n")
    page = AuditReader(path, None).page(AuditQuery())
    assert page["records"] == [] and page["next_cursor"] is None
    assert page["chain"]["status"] == "broken"


def test_edited_record_is_reported_broken_at_its_seq(log: Path) -> None:
    lines = log.read_text().splitlines()
    record = json.loads(lines[3])
    record["decision"] = "deny"  # seq 4, edited without fixing its hash
    lines[3] = json.dumps(record)
    log.write_text("\n".join(lines) + "\n")
    for verify in ("window", "file"):
        chain = AuditReader(log, None).page(parse_query({"verify": verify}))["chain"]
        assert chain["status"] == "broken" and chain["broken_at_seq"] == 4
        assert chain["summary"].startswith("BROKEN at seq 4:")


def test_removed_first_records_break_the_whole_file_not_a_window(log: Path) -> None:
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[2:]))
    reader = AuditReader(log, None)
    assert reader.page(parse_query({"verify": "window", "limit": "2"}))["chain"]["status"] == (
        "verified"  # a window from the middle checks its records and links, not the start
    )
    whole = reader.page(parse_query({"verify": "file"}))["chain"]
    assert whole["status"] == "broken" and whole["broken_at_seq"] == 3
    assert whole["scope"] == "file"


def _keyed(tmp_path: Path, count: int) -> tuple[Path, bytes]:
    key_file, path = tmp_path / "audit.key", tmp_path / "audit.log"
    assert kbs_main(["audit", "keygen", "--out", str(key_file)]) == 0
    key = load_key(key_file)
    _log(path, key=key, count=count)
    return path, key


def test_keyed_log_verifies_with_the_key_up_to_its_checkpoint(tmp_path: Path) -> None:
    path, key = _keyed(tmp_path, 6)
    for verify in ("window", "file"):
        chain = AuditReader(path, key).page(parse_query({"verify": verify}))["chain"]
        assert chain["status"] == "verified" and chain["keyed"] is True
        assert chain["end_checked"] is True and "up to its checkpoint" in chain["summary"]


def test_keyed_record_rechained_without_the_key_is_broken(tmp_path: Path) -> None:
    path, key = _keyed(tmp_path, 6)
    lines = path.read_text().splitlines()
    forged = json.loads(lines[2])
    forged["decision"] = "allow"
    forged["hash"] = record_hash(forged)  # an attacker without the key: plain SHA-256
    lines[2] = json.dumps(forged)
    path.write_text("\n".join(lines) + "\n")
    chain = AuditReader(path, key).page(parse_query({"verify": "file"}))["chain"]
    assert chain["status"] == "broken" and chain["broken_at_seq"] == 3


def test_whole_file_verification_is_bounded(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_read, "VERIFY_MAX_BYTES", 100)
    chain = AuditReader(log, None).page(parse_query({"verify": "file"}))["chain"]
    assert chain["status"] == "unchecked" and "kbs audit verify" in chain["problem"]


def test_no_log_yet_is_an_empty_page(tmp_path: Path) -> None:
    page = AuditReader(tmp_path / "absent.log", None).page(AuditQuery())
    assert page["records"] == [] and page["chain"]["status"] == "unchecked"


# --- through the KBS ------------------------------------------------------------------------


@pytest.fixture
def kbs_with_file_log(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    path = tmp_path / "audit.log"
    with TestClient(create_app(kbs_config(audit={"path": str(path)}))) as client:
        yield client, path


def test_reading_the_log_is_an_audited_admin_call(
    kbs_with_file_log: tuple[TestClient, Path],
) -> None:
    client, path = kbs_with_file_log
    admin = AdminClient("http://testserver", http=client)
    admin.set_resource("default/key/one", b"never-in-the-log")
    page = admin.audit_log(limit=10)
    assert [r["action"] for r in objs(page["records"])] == ["admin POST resource"]
    assert at(page, "chain", "status") == "verified"
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["action"] == "admin GET audit-log" and last["decision"] == "allow"
    assert "never-in-the-log" not in json.dumps(admin.audit_log())


def test_reading_the_log_with_admin_access_denied_is_refused_and_recorded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    config = kbs_config(audit={"path": str(path)}, admin={"authorization_mode": "DenyAll"})
    with TestClient(create_app(config)) as client:
        reply = client.get("/kbs/v0/audit-log")
    assert reply.status_code == 403
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["action"] == "admin GET audit-log" and record["decision"] == "deny"


def test_stdout_sink_answers_404_saying_why() -> None:
    with TestClient(create_app(kbs_config())) as client:  # the tests' default: stdout
        reply = client.get("/kbs/v0/audit-log")
    assert reply.status_code == 404
    assert 'sink = "stdout"' in reply.json()["detail"]


def test_attestations_take_only_their_own_parameters(
    kbs_with_file_log: tuple[TestClient, Path],
) -> None:
    client, _ = kbs_with_file_log
    assert client.get("/kbs/v0/audit-log/attestations?limit=5&since=2026-01-01").status_code == 200
    reply = client.get("/kbs/v0/audit-log/attestations?action=admin")
    assert reply.status_code == 400 and "known: since, limit, cursor" in reply.json()["detail"]


def test_unknown_audit_log_subpath_and_methods_are_refused(
    kbs_with_file_log: tuple[TestClient, Path],
) -> None:
    client, _ = kbs_with_file_log
    assert client.get("/kbs/v0/audit-log/everything").status_code == 404
    reply = client.post("/kbs/v0/audit-log", content=b"{}")
    assert reply.status_code == 405 and reply.headers["allow"] == "GET"
    assert client.delete("/kbs/v0/audit-log/attestations").status_code == 405


def test_recent_attestations_are_counted_by_tee_and_status(
    kbs_with_file_log: tuple[TestClient, Path],
) -> None:
    client, _ = kbs_with_file_log
    admin = AdminClient("http://testserver", http=client)
    admin.set_resource_policy(builtin_policy("allow_all"))
    for _ in range(2):
        KbsClient("http://testserver", http=client).attest()
    client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample", "extra-params": {}})
    assert client.post("/kbs/v0/attest", content=b"{}").status_code >= 400  # a failed one
    page = admin.recent_attestations(limit=10)
    statuses = {(row["tee"], row["status"]): row["count"] for row in objs(page["by_tee"])}
    [(tee_status, count)] = [(k, v) for k, v in statuses.items() if k[0] == "sample"]
    assert count == 2 and tee_status[1] in ("affirming", "warning", "contraindicated")
    assert statuses[("unknown", "failure")] == 1
    newest = obj(at(page, "attestations", 0))
    assert newest["status"] == "failure" and newest["reason"]
    assert {row["decision"] for row in objs(page["attestations"])} == {"success", "failure"}


def test_the_documented_auditor_acl_admits_the_audit_log_only() -> None:
    pattern = r"^/kbs/v0/audit-log(/attestations)?(\?.*)?$"  # docs/admin.md
    assert pattern in Path(__file__).parents[3].joinpath("docs", "admin.md").read_text()
    acl = RegexAcl([AclRule(role="auditor", allowed_endpoints=pattern)])
    auditor = AdminIdentity(role="auditor", issuer=None, subject=None)
    for uri in ("/kbs/v0/audit-log", "/kbs/v0/audit-log?limit=5", "/kbs/v0/audit-log/attestations"):
        acl.authorize(auditor, uri)
    for uri in ("/kbs/v0/resource/a/b/c", "/kbs/v0/audit-logs", "/kbs/v0/resource-policy"):
        with pytest.raises(AdminDeniedError):
            acl.authorize(auditor, uri)

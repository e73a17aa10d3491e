"""One audit record of a fixed shape, numbered, for the audit-log tests."""

from __future__ import annotations

from keybroker.kbs.audit import AuditLog


async def record_attest(audit: AuditLog, number: int) -> None:
    await audit.record(
        action="attest",
        decision="success",
        target=str(number),
        subject=None,
        request_id=f"r{number}",
        peer=None,
    )

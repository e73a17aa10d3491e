"""Vault KV v2 metadata as Keybroker's resource versions: pure conversions, no I/O.

``keybroker.storage.vault`` reads a secret's metadata (``GET <mount>/metadata/<path>``) and
hands the ``data`` object here. Destroyed versions are left out (purged is gone for good); a
soft-deleted one keeps its deletion time. Vault reports no sizes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keybroker.errors import KeybrokerError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.versions import ResourceRecord, Version


def vault_time(value: object) -> float | None:
    """Vault's RFC 3339 times (nanoseconds, ``Z``) as seconds; "" or anything else: None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def vault_record(metadata: Any, where: str) -> ResourceRecord:
    """A secret's Vault KV v2 metadata as Keybroker's record of versions."""
    try:
        current = int(metadata["current_version"])
        versions = []
        for key, item in sorted(metadata["versions"].items(), key=lambda pair: int(pair[0])):
            if item.get("destroyed"):
                continue  # purged: gone for good
            created = vault_time(item.get("created_time"))
            deleted = vault_time(item.get("deletion_time"))
            versions.append(Version(int(key), "", created, None, deleted))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StorageError(f"Vault metadata of {where} is not KV v2 metadata") from None
    return ResourceRecord(
        current=current or None,
        next=current + 1,
        created=vault_time(metadata.get("created_time")),
        updated=vault_time(metadata.get("updated_time")),
        versions=tuple(versions),
    )


def is_resource_name(name: str) -> bool:
    try:
        ResourcePath.parse(name)
    except KeybrokerError:
        return False
    return True

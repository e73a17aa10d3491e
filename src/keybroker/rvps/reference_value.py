"""A reference value as stored: upstream's record ``{"version", "name", "expiration", "value"}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from keybroker.errors import StorageError
from keybroker.protocol.models import JsonValue

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class ReferenceValue:
    name: str
    expiration: float  # seconds since the epoch
    value: JsonValue
    version: str = "0.1.0"

    def to_bytes(self) -> bytes:
        expiration = datetime.fromtimestamp(self.expiration, UTC).strftime(_TIME_FORMAT)
        record = {
            "version": self.version,
            "name": self.name,
            "expiration": expiration,
            "value": self.value,
        }
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ReferenceValue:
        try:
            record = json.loads(raw)
            expiration = datetime.strptime(record["expiration"], _TIME_FORMAT).replace(tzinfo=UTC)
            return cls(
                name=str(record["name"]),
                expiration=expiration.timestamp(),
                value=record["value"],
                version=str(record.get("version", "0.1.0")),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"a stored reference value is corrupt: {e}") from None

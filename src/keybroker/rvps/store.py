"""The reference-value store: register provenance messages, query values by id.

A message is ``{"version": "0.1.0", "type": "<extractor>", "payload": "<string>"}``; the
extractor named by ``type`` verifies the payload and turns it into reference values. Each value
is stored under its name in the ``reference_value`` namespace as upstream's record
``{"version", "name", "expiration", "value"}``. An expired value is never returned: a stale
measurement must not keep vouching for a guest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from keybroker.errors import BadRequestError, ConfigError, StorageError
from keybroker.protocol.models import JsonValue
from keybroker.protocol.untrusted_json import parse_json
from keybroker.rvps.extractors import EXTRACTORS
from keybroker.rvps.reference_value import ReferenceValue
from keybroker.storage.base import KeyValueStorage, validate_key
from keybroker.storage.read_cache import AfterChange, no_stamp

NAMESPACE = "reference_value"
PARSED_REMEMBERED = 1024  # parsed stored values kept per store (see ReferenceValueStore._parsed)
_PARSED_MAX_BYTES = 64 << 10
MESSAGE_VERSION = "0.1.0"


class ReferenceValues(Protocol):
    """What an Attestation Service needs from an RVPS, local or remote."""

    async def register(self, message: str) -> list[str]: ...

    async def query(self, reference_value_id: str) -> JsonValue | None: ...

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]: ...

    async def all_ids(self) -> list[str]: ...


@runtime_checkable
class ManagedReferenceValues(ReferenceValues, Protocol):
    """What an operator can also do with them through the KBS (the local store; a remote
    RVPS says it cannot)."""

    async def names(self) -> list[str]:
        """Every stored value's name (expired ones too: they can be deleted)."""
        ...

    async def delete(self, reference_value_id: str) -> bool:
        """Remove one value; False when there was none."""
        ...


class ReferenceValueStore:
    def __init__(
        self,
        storage: KeyValueStorage,
        *,
        clock: Callable[[], float] = time.time,
        after_change: AfterChange = no_stamp,
    ) -> None:
        """``after_change`` is awaited once values were stored or deleted (the KBS passes its
        read cache's generation stamp, see ``keybroker.storage.read_cache``)."""
        self._storage = storage
        self._clock = clock
        self._after_change = after_change
        self._parsed_values: OrderedDict[bytes, ReferenceValue] = OrderedDict()

    async def register(self, message: str) -> list[str]:
        """Verify and store the values a provenance message carries; return their names."""
        document = parse_json(message, what="the reference-value message")
        if not isinstance(document, dict):
            raise BadRequestError("the reference-value message must be a JSON object")
        version = document.get("version", MESSAGE_VERSION)
        if version != MESSAGE_VERSION:
            raise BadRequestError(
                f"reference-value message version must be {MESSAGE_VERSION}, found {version!r}"
            )
        kind, payload = document.get("type"), document.get("payload")
        if not isinstance(kind, str) or not isinstance(payload, str):
            raise BadRequestError('the message needs string members "type" and "payload"')
        extractor = EXTRACTORS.get(kind)
        if extractor is None:
            raise BadRequestError(
                f"no reference-value extractor {kind[:32]!r}: expected one of {sorted(EXTRACTORS)}"
            )
        values = extractor(payload, self._clock())
        for value in values:  # all names checked before any is stored
            _checked_id(value.name)
        for value in values:
            await self._storage.set(value.name, value.to_bytes())
        if values:
            await self._after_change()
        return [value.name for value in values]

    async def query(self, reference_value_id: str) -> JsonValue | None:
        raw = await self._storage.get(_checked_id(reference_value_id))
        if raw is None:
            return None
        value = self._parsed(raw)
        if value.expiration <= self._clock():
            return None
        return value.value

    async def query_many(self, ids: list[str]) -> dict[str, JsonValue]:
        found: dict[str, JsonValue] = {}
        now = self._clock()
        for reference_value_id, raw in (await self._storage.get_many(ids)).items():
            value = self._parsed(raw)
            if value.expiration > now:
                found[reference_value_id] = value.value
        return found

    async def all_ids(self) -> list[str]:
        return await self._storage.list_keys()

    def _parsed(self, raw: bytes) -> ReferenceValue:
        """``raw`` parsed, remembered by its bytes (a bounded LRU; values over
        ``_PARSED_MAX_BYTES`` are parsed each time): every attestation reads the same stored
        values, and parsing their JSON and dates costs more than the look-up. The bytes are
        the key, so a changed value is parsed anew; the expiry is still checked on every
        query. Callers must not change the ``value`` they get (it is shared)."""
        known = self._parsed_values.get(raw)
        if known is not None:
            self._parsed_values.move_to_end(raw)
            return known
        value = ReferenceValue.from_bytes(raw)
        if len(raw) <= _PARSED_MAX_BYTES:
            self._parsed_values[raw] = value
            while len(self._parsed_values) > PARSED_REMEMBERED:
                self._parsed_values.popitem(last=False)
        return value

    async def names(self) -> list[str]:
        return await self._storage.list_keys()

    async def delete(self, reference_value_id: str) -> bool:
        removed = await self._storage.delete(_checked_id(reference_value_id)) is not None
        if removed:
            await self._after_change()
        return removed


def _checked_id(reference_value_id: str) -> str:
    """An id from a request or a message is untrusted: one the storage could not name is the
    caller's mistake (400), not a storage failure (500)."""
    try:
        return validate_key(reference_value_id)
    except StorageError as e:
        raise BadRequestError(f"reference value id: {e.detail}") from None


def remote_reference_values(address: str) -> ReferenceValues:
    """The client of a remote RVPS (``rvps_config = { type = "GrpcRemote", address }``)."""
    try:
        from keybroker.rvps.grpc_service import RemoteReferenceValues  # noqa: PLC0415
    except ImportError:  # gRPC is an optional extra
        raise ConfigError(
            "rvps_config type = GrpcRemote needs the grpc extra: pip install 'keybroker[grpc]'"
        ) from None
    return RemoteReferenceValues(address)

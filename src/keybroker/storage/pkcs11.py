"""Secret backend in a PKCS#11 token (an HSM, or SoftHSM2 for tests), through python-pkcs11.

Resource ``repo/type/tag`` is a generic secret key object (``CKO_SECRET_KEY``,
``CKK_GENERIC_SECRET``) labelled ``repo/type/tag`` whose ``CKA_VALUE`` is the resource, stored
on the token (it survives restarts) and private (readable only after login). These are the
attributes upstream Trustee's ``pkcs11`` plugin writes, so objects it created are read here.

Overwrites never lose a secret: the new object is created first, then older objects of the
label are destroyed. Each object carries a version in ``CKA_ID`` (nanosecond time plus random
bytes); a reader takes the highest, so a crash between the two steps, or two writers on two
replicas, still leaves one well-defined value. Objects without a Keybroker version (written by
upstream) rank below every versioned one; two of them under one label are ambiguous and refused.

Listing and metadata are offered (each label is an unversioned resource, version 1, its size
unknown: reading it would load the secret); versions are not. A token offers no atomic
compare-and-set, so version numbers could not be allocated safely across replicas sharing an
HSM: rollback, undelete, purge and ``?version=`` answer 501.

The token session is opened and logged in at start-up (a wrong PIN, module or slot stops the
KBS there) and reopened once if the token drops it. python-pkcs11 is synchronous and a session
is not thread-safe: calls run in a worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from keybroker.errors import (
    ConfigError,
    KeybrokerError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import MAX_PAGE
from keybroker.storage.secrets import DEFAULT_MAX_RESOURCE_BYTES, SecretBackend
from keybroker.storage.versions import ResourceRecord, Version

log = logging.getLogger(__name__)
T = TypeVar("T")
_VERSION_BYTES = 12
# (module, token serial) -> digest of the PIN that logged this process in (see _open)
_LOGINS: dict[tuple[str, bytes], bytes] = {}


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


class Pkcs11Config(BaseModel):
    """Upstream's settings. ``rsa_mechanism`` and ``lookup_label`` belong to upstream's
    wrap-key endpoint, which Keybroker does not serve; they are accepted and unused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: Path
    slot_index: int = Field(default=0, ge=0)
    pin: str = Field(repr=False)
    rsa_mechanism: str | None = None
    lookup_label: str = ""


class Pkcs11SecretBackend(SecretBackend):
    def __init__(
        self, config: Pkcs11Config, *, max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        try:
            import pkcs11  # noqa: PLC0415 - optional extra
        except ImportError:
            raise ConfigError(
                "the pkcs11 backend needs the pkcs11 extra: pip install 'keybroker[pkcs11]'"
            ) from None
        self._p11: Any = pkcs11
        self._config = config
        self._lock = threading.Lock()
        self._session: Any = None
        with self._lock:
            self._open()

    @classmethod
    def from_config(cls, config: Pkcs11Config) -> Pkcs11SecretBackend:
        return cls(config)

    # --- session ---------------------------------------------------------------------------

    def _open(self) -> None:
        """Load the module, pick the slot, log in; configuration mistakes are ConfigErrors."""
        p11, config = self._p11, self._config
        try:
            library = p11.lib(str(config.module))
        except (RuntimeError, OSError, p11.exceptions.PKCS11Error) as e:
            raise ConfigError(f"cannot load PKCS#11 module {config.module}: {e}") from None
        try:
            slots = library.get_slots(token_present=True)
            token = slots[config.slot_index].get_token() if config.slot_index < len(slots) else None
        except p11.exceptions.PKCS11Error as e:
            raise ConfigError(
                f"cannot read the slots of PKCS#11 module {config.module}: {type(e).__name__}"
            ) from None
        if token is None:
            raise ConfigError(
                f"PKCS#11 slot_index {config.slot_index} is out of range: the module "
                f"{config.module} has {len(slots)} slot(s) with a token"
            )
        try:
            self._session = token.open(user_pin=config.pin, rw=True)
        except p11.exceptions.PinIncorrect:
            raise ConfigError(
                f"PKCS#11 login to slot index {config.slot_index} ({token.label!r}) failed: "
                "incorrect PIN"
            ) from None
        except p11.exceptions.UserAlreadyLoggedIn:
            # PKCS#11 login is per process and token: another backend of this process logged
            # in already. Join its login only with the PIN that login proved.
            proven = _LOGINS.get((str(config.module), token.serial))
            if proven is None or not hmac.compare_digest(proven, _pin_digest(config.pin)):
                raise ConfigError(
                    f"PKCS#11 login to slot index {config.slot_index} ({token.label!r}) "
                    "failed: incorrect PIN"
                ) from None
            self._session = token.open(rw=True)
        except p11.exceptions.PKCS11Error as e:
            raise ConfigError(
                f"cannot open a session on PKCS#11 slot index {config.slot_index}: "
                f"{type(e).__name__}"
            ) from None
        else:
            _LOGINS[(str(config.module), token.serial)] = _pin_digest(config.pin)

    def _call(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` on the session, reopening it once if the token dropped it."""
        p11 = self._p11
        with self._lock:
            try:
                return operation()
            except (p11.exceptions.SessionHandleInvalid, p11.exceptions.SessionClosed):
                log.warning("the PKCS#11 session was closed by the token: opening a new one")
                try:
                    self._open()
                except ConfigError as e:  # the token went away: the request may be retried
                    raise ServiceUnavailableError(f"the HSM is unavailable: {e.detail}") from None
                return operation()
            except p11.exceptions.PKCS11Error as e:
                raise StorageError(f"PKCS#11 operation failed: {type(e).__name__}") from e

    async def _run(self, operation: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._call, operation)

    # --- objects ---------------------------------------------------------------------------

    def _objects(self, label: str) -> list[tuple[bytes, Any]]:
        """``(version, object)`` of every secret key labelled ``label``, newest first."""
        attribute = self._p11.Attribute
        found = list(
            self._session.get_objects(
                {attribute.CLASS: self._p11.ObjectClass.SECRET_KEY, attribute.LABEL: label}
            )
        )
        versioned = []
        for item in found:
            try:
                version = bytes(item[attribute.ID])
            except self._p11.exceptions.AttributeTypeInvalid:
                version = b""
            versioned.append((version if len(version) == _VERSION_BYTES else b"", item))
        versioned.sort(key=lambda pair: pair[0], reverse=True)
        return versioned

    def _read_sync(self, label: str) -> bytes | None:
        objects = self._objects(label)
        if not objects:
            return None
        if len(objects) > 1 and objects[0][0] == objects[1][0]:
            raise StorageError(
                f"PKCS#11 token holds {len(objects)} unversioned secrets labelled {label}: "
                "refusing to guess which one to release"
            )
        value = objects[0][1][self._p11.Attribute.VALUE]
        return bytes(value)

    def _write_sync(self, label: str, data: bytes) -> None:
        attribute = self._p11.Attribute
        version = time.time_ns().to_bytes(8, "big") + os.urandom(_VERSION_BYTES - 8)
        self._session.create_object(
            {
                attribute.CLASS: self._p11.ObjectClass.SECRET_KEY,
                attribute.KEY_TYPE: self._p11.KeyType.GENERIC_SECRET,
                attribute.TOKEN: True,
                attribute.PRIVATE: True,
                attribute.SENSITIVE: False,  # CKA_VALUE must be readable to be released
                attribute.EXTRACTABLE: True,
                attribute.LABEL: label,
                attribute.ID: version,
                attribute.VALUE: data,
            }
        )
        for older_version, item in self._objects(label):
            if older_version < version:
                item.destroy()

    def _delete_sync(self, label: str) -> bool:
        objects = self._objects(label)
        for _version, item in objects:
            item.destroy()
        return bool(objects)

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._run(lambda: self._read_sync(str(path)))

    def _labels_sync(self) -> list[str]:
        """The labels of the token's secret keys that are resource paths, sorted, unique."""
        attribute = self._p11.Attribute
        labels = set()
        for item in self._session.get_objects({attribute.CLASS: self._p11.ObjectClass.SECRET_KEY}):
            try:
                label = str(item[attribute.LABEL])
                ResourcePath.parse(label)
            except (self._p11.exceptions.AttributeTypeInvalid, KeybrokerError):
                continue  # not one of ours (a wrapping key, say)
            labels.add(label)
        return sorted(labels)

    async def list_resources(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        labels = await self._run(self._labels_sync)
        names = [
            label
            for label in labels
            if label.startswith(prefix) and (after is None or label > after)
        ][: min(limit, MAX_PAGE)]
        page = [(name, _unversioned()) for name in names]
        return page, names[-1] if len(names) == limit else None

    async def metadata(self, path: ResourcePath) -> ResourceRecord:
        if not await self._run(lambda: bool(self._objects(str(path)))):
            raise ResourceNotFoundError(f"resource not found: {path}")
        return _unversioned()

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._run(lambda: self._write_sync(str(path), data))

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._run(lambda: self._delete_sync(str(path)))

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None


def _unversioned() -> ResourceRecord:
    return ResourceRecord(1, 2, None, None, (Version(1, "", None, None),), legacy=True)

"""A PKCS#11 token (an HSM, or SoftHSM2 for tests) as a key-value store, through python-pkcs11.

:class:`Pkcs11Token` is one logged-in session on the configured slot. :class:`Pkcs11KeyValueStorage`
is a :class:`~keybroker.storage.base.KeyValueStorage` over it: key ``k`` is a generic secret key
object (``CKO_SECRET_KEY``, ``CKK_GENERIC_SECRET``) labelled ``k`` whose ``CKA_VALUE`` is the
value, stored on the token (it survives restarts) and private (readable only after login). These
are the attributes upstream Trustee's ``pkcs11`` plugin writes, so objects it created are read.

Overwrites never lose a value: the new object is created first, then older objects of the label
are destroyed. Each object carries a write stamp in ``CKA_ID`` (nanosecond time plus random
bytes); a reader takes the highest, so a crash between the two steps, or two writers on two
replicas, still leaves one well-defined value (an extra object such a race leaves is removed by
the label's next write). Objects without a Keybroker stamp (written by
upstream) rank below every stamped one; two of them under one label are ambiguous and refused.

What a token cannot do is refused, never emulated: it has no atomic compare-and-set and no
conditional create, so ``compare_and_set``, ``set(overwrite=False)`` and TTLs raise
:class:`StorageError`. Versioned resources need neither of these on the stores of bytes (only
on the record store, which is the KBS's own key-value store; see ``keybroker.storage.pkcs11``).

Each store sees only keys of a fixed number of ``/``-separated segments (``depth``), so the
resource store (``repo/type/tag``) and the version store (``repo/type/tag/<id>``) share one
token without seeing each other's objects. A store with ``stamped_only`` also ignores objects
without a Keybroker stamp: the version store never reads or destroys an object it did not write,
even one an operator labelled like a version.

The session is opened and logged in at start-up (a wrong PIN, module or slot stops the KBS
there) and reopened once if the token drops it. python-pkcs11 is synchronous and initializes
the module without OS locking: calls run in a worker thread, one at a time per module in the
process (over all its sessions). Listing reads the label of every secret key on the token
(PKCS#11 has no prefix search): O(objects) per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from keybroker.errors import ConfigError, KeybrokerError, ServiceUnavailableError, StorageError
from keybroker.storage.base import KeyValueStorage, validate_key

log = logging.getLogger(__name__)
T = TypeVar("T")
_STAMP_BYTES = 12
# Another process may destroy an object between a search finding it and a read of it (an
# overwrite on another replica): the search is made again, a bounded number of times.
_ATTEMPTS = 5
_PLAIN_SERIAL = re.compile(r"[A-Za-z0-9]{1,32}")
# (module, token serial) -> digest of the PIN that logged this process in (see _open)
_LOGINS: dict[tuple[str, bytes], bytes] = {}
# module -> the lock every call into it takes. python-pkcs11 initializes a module with
# C_Initialize(NULL): no OS locking, so two threads must never be inside it at once, even on
# two sessions (the resource and pkcs11 plugins each hold one). A crash, not an error, if not.
_MODULE_LOCKS: dict[str, threading.Lock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def _module_lock(module: Path) -> threading.Lock:
    with _MODULE_LOCKS_GUARD:
        return _MODULE_LOCKS.setdefault(str(module), threading.Lock())


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


class Pkcs11Token:
    """One logged-in read-write session on the configured slot, shared by the stores over it."""

    def __init__(self, config: Pkcs11Config) -> None:
        try:
            import pkcs11  # noqa: PLC0415 - optional extra
        except ImportError:
            raise ConfigError(
                "the pkcs11 backend needs the pkcs11 extra: pip install 'keybroker[pkcs11]'"
            ) from None
        self.p11: Any = pkcs11
        self._config = config
        self._lock = _module_lock(config.module)
        self.session: Any = None
        self.serial = b""
        with self._lock:
            self._open()

    @property
    def identity(self) -> str:
        """The token's serial number as a name of ``[A-Za-z0-9]`` (hashed if it has anything
        else): the same on every replica that opens this token."""
        serial = self.serial.decode("ascii", "replace").strip(" \x00")
        if _PLAIN_SERIAL.fullmatch(serial):
            return serial
        return hashlib.sha256(self.serial).hexdigest()[:16]

    def _open(self) -> None:
        """Load the module, pick the slot, log in; configuration mistakes are ConfigErrors."""
        p11, config = self.p11, self._config
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
            self.session = token.open(user_pin=config.pin, rw=True)
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
            self.session = token.open(rw=True)
        except p11.exceptions.PKCS11Error as e:
            raise ConfigError(
                f"cannot open a session on PKCS#11 slot index {config.slot_index}: "
                f"{type(e).__name__}"
            ) from None
        else:
            _LOGINS[(str(config.module), token.serial)] = _pin_digest(config.pin)
        self.serial = bytes(token.serial)

    def call(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` on the session, reopening it once if the token dropped it."""
        p11 = self.p11
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

    async def run(self, operation: Callable[[], T]) -> T:
        """``call`` in a worker thread: PKCS#11 calls block, never on the event loop."""
        return await asyncio.to_thread(self.call, operation)

    def close(self) -> None:
        with self._lock:
            if self.session is not None:
                self.session.close()
                self.session = None


class Pkcs11KeyValueStorage(KeyValueStorage):
    """Keys of exactly ``depth`` segments as secret key objects labelled with the key."""

    def __init__(self, token: Pkcs11Token, *, depth: int, stamped_only: bool = False) -> None:
        self._token = token
        self._depth = depth
        self._stamped_only = stamped_only

    def storable(self, key: str) -> bool:
        return key.count("/") + 1 == self._depth

    def _check(self, key: str) -> str:
        if not self.storable(key):
            raise StorageError(
                f"this PKCS#11 store holds keys of {self._depth} segments, found {key[:64]!r}"
            )
        return key

    # --- on the session (worker thread, under the token's lock) ----------------------------

    def _search(self, template: dict[Any, Any]) -> list[Any]:
        """The objects matching ``template`` (python-pkcs11 reads each one's class while
        searching, which fails if another process destroyed it meanwhile: search again)."""
        for _ in range(_ATTEMPTS):
            try:
                return list(self._token.session.get_objects(template))
            except self._token.p11.exceptions.ObjectHandleInvalid:
                continue
        raise StorageError("PKCS#11 objects kept changing during a search: retry later")

    def _objects(self, label: str) -> list[tuple[bytes, Any]]:
        """``(stamp, object)`` of every secret key labelled ``label``, newest first (an object
        destroyed by another writer while it is looked at is left out)."""
        p11 = self._token.p11
        attribute = p11.Attribute
        found = self._search({attribute.CLASS: p11.ObjectClass.SECRET_KEY, attribute.LABEL: label})
        stamped = []
        for item in found:
            try:
                stamp = bytes(item[attribute.ID])
            except p11.exceptions.AttributeTypeInvalid:
                stamp = b""
            except p11.exceptions.ObjectHandleInvalid:
                continue
            stamp = stamp if len(stamp) == _STAMP_BYTES else b""
            if stamp or not self._stamped_only:
                stamped.append((stamp, item))
        stamped.sort(key=lambda pair: pair[0], reverse=True)
        return stamped

    def _read_sync(self, label: str) -> bytes | None:
        for _ in range(_ATTEMPTS):
            objects = self._objects(label)
            if not objects:
                return None
            if len(objects) > 1 and objects[0][0] == objects[1][0]:
                raise StorageError(
                    f"PKCS#11 token holds {len(objects)} unversioned secrets labelled {label}: "
                    "refusing to guess which one to release"
                )
            try:
                return bytes(objects[0][1][self._token.p11.Attribute.VALUE])
            except self._token.p11.exceptions.ObjectHandleInvalid:
                continue  # overwritten by another writer since the search: look again
        raise StorageError(f"PKCS#11 objects labelled {label} kept changing while being read")

    def _write_sync(self, label: str, data: bytes) -> None:
        p11 = self._token.p11
        attribute = p11.Attribute
        stamp = time.time_ns().to_bytes(8, "big") + os.urandom(_STAMP_BYTES - 8)
        template = {
            attribute.CLASS: p11.ObjectClass.SECRET_KEY,
            attribute.KEY_TYPE: p11.KeyType.GENERIC_SECRET,
            attribute.TOKEN: True,
            attribute.PRIVATE: True,
            attribute.SENSITIVE: False,  # CKA_VALUE must be readable to be released
            attribute.EXTRACTABLE: True,
            attribute.LABEL: label,
            attribute.ID: stamp,
            attribute.VALUE: data,
        }
        # ObjectHandleInvalid: created, then destroyed by another writer before python-pkcs11
        # read its class back; a newer write (or a delete) superseded it, as if it came after.
        with contextlib.suppress(p11.exceptions.ObjectHandleInvalid):
            self._token.session.create_object(template)
        # The newest stamp wins, whoever wrote it: this writer also removes its own object when
        # a newer one is already there (a writer that stamped earlier but created later). An
        # object another process created after this search (SoftHSM shows other processes'
        # objects only once it rereads the token) can outlive a race; readers take the newest
        # meanwhile, and the next write of the label removes it.
        objects = self._objects(label)
        newest = max([stamp, *(found for found, _ in objects)])
        for older, item in objects:
            if older < newest:
                self._destroy(label, older, item)

    def _delete_sync(self, label: str) -> bytes | None:
        objects = self._objects(label)
        value = None
        if objects:
            try:
                value = bytes(objects[0][1][self._token.p11.Attribute.VALUE])
            except self._token.p11.exceptions.ObjectHandleInvalid:
                value = b""  # destroyed by another writer meanwhile: it existed
        for stamp, item in objects:
            self._destroy(label, stamp, item)
        return value

    def _destroy(self, label: str, stamp: bytes, item: Any) -> None:
        """Destroy ``item``; that another writer destroyed it first is what was wanted."""
        exceptions = self._token.p11.exceptions
        try:
            item.destroy()
        except exceptions.ObjectHandleInvalid:
            return
        except exceptions.FunctionFailed:
            # SoftHSM's answer when another process removed the object first: look again,
            # and fail only if it is still there.
            if any(other == stamp for other, _item in self._objects(label)):
                raise

    def _labels_sync(self, prefix: str) -> list[str]:
        """The labels of this store's objects starting with ``prefix``, sorted, unique."""
        p11 = self._token.p11
        attribute = p11.Attribute
        labels = set()
        for item in self._search({attribute.CLASS: p11.ObjectClass.SECRET_KEY}):
            try:
                label = str(item[attribute.LABEL])
                if self._stamped_only and len(bytes(item[attribute.ID])) != _STAMP_BYTES:
                    continue
                if label.startswith(prefix) and self.storable(validate_key(label)):
                    labels.add(label)
            except (
                p11.exceptions.AttributeTypeInvalid,
                p11.exceptions.ObjectHandleInvalid,
                KeybrokerError,
            ):
                continue  # not one of ours (a wrapping key, say), or gone since
        return sorted(labels)

    # --- KeyValueStorage -------------------------------------------------------------------

    async def _get(self, key: str) -> bytes | None:
        if not self.storable(key):
            return None
        return await self._token.run(lambda: self._read_sync(key))

    async def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        def read_all() -> dict[str, bytes]:
            found = {}
            for key in keys:
                value = self._read_sync(key) if self.storable(key) else None
                if value is not None:
                    found[key] = value
            return found

        return await self._token.run(read_all)

    def creates_conditionally(self) -> bool:
        return False

    async def _set(self, key: str, value: bytes, overwrite: bool, ttl: float | None) -> bool:
        self._check(key)
        if not overwrite or ttl is not None:
            # Emulating either would race across replicas sharing the token: refuse.
            raise StorageError(
                "a PKCS#11 token has no conditional create and no expiry: "
                "set(overwrite=False) and TTLs are not offered"
            )
        await self._token.run(lambda: self._write_sync(key, value))
        return True

    async def _delete(self, key: str) -> bytes | None:
        if not self.storable(key):
            return None
        return await self._token.run(lambda: self._delete_sync(key))

    async def _list(self) -> list[str]:
        return await self._token.run(lambda: self._labels_sync(""))

    async def _list_page(self, prefix: str, after: str | None, limit: int) -> list[str]:
        labels = await self._token.run(lambda: self._labels_sync(prefix))
        return [label for label in labels if after is None or label > after][:limit]

    async def _compare_and_set(self, key: str, expected: bytes | None, new: bytes | None) -> bool:
        raise StorageError(
            "a PKCS#11 token has no atomic compare-and-set: keep records that need one in the "
            "KBS's key-value store"
        )

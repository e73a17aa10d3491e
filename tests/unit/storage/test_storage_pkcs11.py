"""The PKCS#11 secret backend on a real SoftHSM2 token."""

from __future__ import annotations

import asyncio
import uuid

import pkcs11
import pytest

from keybroker.errors import ConfigError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend
from softhsm import LABEL, SoftHsm


def _backend(softhsm: SoftHsm, **changes: object) -> Pkcs11SecretBackend:
    settings: dict[str, object] = {"module": softhsm.module, "pin": softhsm.pin, **changes}
    return Pkcs11SecretBackend.from_config(Pkcs11Config.model_validate(settings))


def _path(tag: str = "key") -> ResourcePath:
    return ResourcePath.parse(f"r{uuid.uuid4().hex[:10]}/hsm/{tag}")


def test_wrong_pin_stops_start_up(softhsm: SoftHsm) -> None:
    with pytest.raises(ConfigError, match="incorrect PIN"):
        _backend(softhsm, pin="not-the-pin")


def test_slot_index_out_of_range_is_named(softhsm: SoftHsm) -> None:
    with pytest.raises(ConfigError, match="slot_index 7 is out of range"):
        _backend(softhsm, slot_index=7)


def test_missing_module_is_named(softhsm: SoftHsm) -> None:
    with pytest.raises(ConfigError, match=r"cannot load PKCS#11 module /nonexistent/lib\.so"):
        _backend(softhsm, module="/nonexistent/lib.so")


def test_pin_never_in_repr(softhsm: SoftHsm) -> None:
    config = Pkcs11Config(module=softhsm.module, pin=softhsm.pin)
    assert softhsm.pin not in repr(config)


def test_values_persist_on_the_token(softhsm: SoftHsm) -> None:
    path = _path()
    asyncio.run(_backend(softhsm).write(path, b"\x00persistent\xff"))
    assert asyncio.run(_backend(softhsm).read(path)) == b"\x00persistent\xff"


def test_overwrite_keeps_exactly_one_object(softhsm: SoftHsm) -> None:
    backend, path = _backend(softhsm), _path()

    async def scenario() -> None:
        for value in (b"one", b"two", b"three"):
            await backend.write(path, value)
        assert await backend.read(path) == b"three"

    asyncio.run(scenario())
    assert _objects_labelled(softhsm, str(path)) == 1


def test_object_written_by_upstream_is_read(softhsm: SoftHsm) -> None:
    """Upstream's plugin writes a generic secret labelled with the path and no CKA_ID."""
    path = _path()
    with _session(softhsm) as session:
        session.create_object(
            {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.PRIVATE: True,
                pkcs11.Attribute.EXTRACTABLE: True,
                pkcs11.Attribute.SENSITIVE: False,
                pkcs11.Attribute.LABEL: str(path),
                pkcs11.Attribute.VALUE: b"from upstream",
            }
        )
    backend = _backend(softhsm)
    assert asyncio.run(backend.read(path)) == b"from upstream"
    asyncio.run(backend.write(path, b"replaced"))  # the unversioned object goes
    assert asyncio.run(backend.read(path)) == b"replaced"
    assert _objects_labelled(softhsm, str(path)) == 1


def test_two_unversioned_objects_under_one_label_are_refused(softhsm: SoftHsm) -> None:
    path = _path()
    with _session(softhsm) as session:
        for value in (b"a", b"b"):
            session.create_object(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                    pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                    pkcs11.Attribute.TOKEN: True,
                    pkcs11.Attribute.SENSITIVE: False,
                    pkcs11.Attribute.LABEL: str(path),
                    pkcs11.Attribute.VALUE: value,
                }
            )
    with pytest.raises(StorageError, match="refusing to guess"):
        asyncio.run(_backend(softhsm).read(path))


def test_delete_then_missing(softhsm: SoftHsm) -> None:
    backend, path = _backend(softhsm), _path()
    asyncio.run(backend.write(path, b"gone"))
    asyncio.run(backend.delete(path))
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(backend.read(path))
    assert _objects_labelled(softhsm, str(path)) == 0


def _session(softhsm: SoftHsm) -> pkcs11.Session:
    """A session of the test's own (joining the process's login if a backend holds one)."""
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=LABEL)
    try:
        return token.open(user_pin=softhsm.pin, rw=True)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=True)


def _objects_labelled(softhsm: SoftHsm, label: str) -> int:
    with _session(softhsm) as session:
        return len(list(session.get_objects({pkcs11.Attribute.LABEL: label})))


# python-pkcs11 finalizes the failed search on the dead session and reports that as unraisable
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_session_dropped_by_the_token_is_reopened(softhsm: SoftHsm) -> None:
    backend, path = _backend(softhsm), _path()
    asyncio.run(backend.write(path, b"still here"))
    backend._session.close()  # what a token reset does to the session behind our back
    assert asyncio.run(backend.read(path)) == b"still here"

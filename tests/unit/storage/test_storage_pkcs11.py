"""The PKCS#11 secret backend on a real SoftHSM2 token: bytes on the token, version records in
a key-value store of the KBS's (in memory here; PostgreSQL in the conformance suite)."""

from __future__ import annotations

import asyncio
import uuid

import pkcs11
import pytest

from keybroker.errors import ConfigError, ResourceNotFoundError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend, meta_namespace
from keybroker.storage.pkcs11_token import Pkcs11KeyValueStorage
from softhsm import LABEL, SoftHsm


def _backend(
    softhsm: SoftHsm, meta: KeyValueStorage | None = None, **changes: object
) -> Pkcs11SecretBackend:
    settings: dict[str, object] = {"module": softhsm.module, "pin": softhsm.pin, **changes}
    store = meta or MemoryKeyValueStorage()
    return Pkcs11SecretBackend.from_config(
        Pkcs11Config.model_validate(settings), namespace=lambda _name: store
    )


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


def _upstream_object(softhsm: SoftHsm, label: str, value: bytes) -> None:
    """What upstream's plugin writes: a generic secret labelled with the path, no CKA_ID."""
    with _session(softhsm) as session:
        session.create_object(
            {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.PRIVATE: True,
                pkcs11.Attribute.EXTRACTABLE: True,
                pkcs11.Attribute.SENSITIVE: False,
                pkcs11.Attribute.LABEL: label,
                pkcs11.Attribute.VALUE: value,
            }
        )


def test_legacy_object_is_served_then_migrated(softhsm: SoftHsm) -> None:
    """An object written before versioning (here by upstream) is version 1 until the first
    versioned write, which keeps it as version 1 and makes the new bytes version 2."""
    path = _path()
    _upstream_object(softhsm, str(path), b"from upstream")
    backend = _backend(softhsm)

    async def scenario() -> None:
        assert await backend.read(path) == b"from upstream"
        before = await backend.metadata(path)
        assert before.legacy and before.current == 1
        listed, _ = await backend.list_resources(f"{path.repository}/", None, 10)
        assert [(name, record.legacy) for name, record in listed] == [(str(path), True)]
        assert await backend.write(path, b"replaced") == 2
        assert await backend.read(path) == b"replaced"
        first = await backend.resolve(path, 1)
        assert first is not None and await backend.read(path, first) == b"from upstream"
        after = await backend.metadata(path)
        assert not after.legacy and [v.number for v in after.versions] == [1, 2]

    asyncio.run(scenario())
    # the upstream object was replaced by the current value, which upstream still reads
    assert _objects_labelled(softhsm, str(path)) == 1
    assert _value_labelled(softhsm, str(path)) == b"replaced"


def test_records_live_in_the_kbs_store_keyed_by_the_token_serial(softhsm: SoftHsm) -> None:
    names: list[str] = []
    store = MemoryKeyValueStorage()

    def namespace(name: str) -> KeyValueStorage:
        names.append(name)
        return store

    config = Pkcs11Config(module=softhsm.module, pin=softhsm.pin)
    backend = Pkcs11SecretBackend.from_config(config, namespace=namespace)
    path = _path()
    asyncio.run(backend.write(path, b"SECRET-bytes"))
    assert names == [meta_namespace(backend.token)] and names[0].startswith("pkcs11_meta_")
    record = asyncio.run(store.get(str(path)))
    assert record is not None and b"SECRET-bytes" not in record  # the record, never the value


def test_two_backends_on_one_token_and_one_record_store_number_contiguously(
    softhsm: SoftHsm,
) -> None:
    """Two replicas' worth of backends (each its own session) writing one resource at once."""
    meta = MemoryKeyValueStorage()
    first, second, path = _backend(softhsm, meta), _backend(softhsm, meta), _path()

    async def scenario() -> list[int | None]:
        writes = [(first if i % 2 else second).write(path, b"w%d" % i) for i in range(12)]
        return list(await asyncio.gather(*writes))

    numbers = asyncio.run(scenario())
    assert sorted(n for n in numbers if n is not None) == list(range(1, 13))
    record = asyncio.run(first.metadata(path))
    assert record.current == 12 and [v.number for v in record.versions] == list(range(3, 13))
    assert asyncio.run(second.read(path)) == asyncio.run(first.read(path))


def test_purge_never_destroys_an_object_it_did_not_write(softhsm: SoftHsm) -> None:
    """An operator's object labelled like a version of a resource (no Keybroker stamp) is
    neither read as a version nor destroyed when the resource is purged."""
    backend, path = _backend(softhsm), _path()
    asyncio.run(backend.write(path, b"ours"))
    _upstream_object(softhsm, f"{path}/0123456789abcdef", b"the operator's")
    asyncio.run(backend.purge(path, None))
    assert _objects_labelled(softhsm, str(path)) == 0
    assert _value_labelled(softhsm, f"{path}/0123456789abcdef") == b"the operator's"


def test_purge_removes_versions_left_without_a_record(softhsm: SoftHsm) -> None:
    """A record store that lost its records (the memory store after a restart) leaves version
    objects on the token; with the current version soft-deleted nothing is served, and a purge
    still destroys them."""
    path = _path()
    before = _backend(softhsm)
    for value in (b"one", b"two"):
        asyncio.run(before.write(path, value))
    asyncio.run(before.delete(path))  # soft: the copy under the path goes, the versions stay
    assert _objects_labelled(softhsm, str(path)) == 0
    restarted = _backend(softhsm)  # a fresh, empty record store
    with pytest.raises(ResourceNotFoundError):
        asyncio.run(restarted.metadata(path))
    asyncio.run(restarted.purge(path, None))
    assert _labels_under(softhsm, f"{path}/") == []
    with pytest.raises(ResourceNotFoundError):  # nothing left: now it is not found
        asyncio.run(restarted.purge(path, None))


def test_compare_and_set_on_a_token_is_refused(softhsm: SoftHsm) -> None:
    """A token cannot compare-and-set atomically: emulating it would race across replicas."""
    token = _backend(softhsm).token
    store = Pkcs11KeyValueStorage(token, depth=3)
    key = str(_path())
    with pytest.raises(StorageError, match="no atomic compare-and-set"):
        asyncio.run(store.compare_and_set(key, None, b"x"))
    with pytest.raises(StorageError, match="no conditional create"):
        asyncio.run(store.set(key, b"x", overwrite=False))
    with pytest.raises(StorageError, match="no expiry"):
        asyncio.run(store.set(key, b"x", ttl=60))
    with pytest.raises(StorageError, match="keys of 3 segments"):
        asyncio.run(store.set(f"{key}/extra", b"x"))
    assert asyncio.run(store.get(key)) is None


def test_object_destroyed_by_another_session_meanwhile_is_not_an_error(softhsm: SoftHsm) -> None:
    """Two replicas overwriting one label each destroy the older objects; one finding an
    object already gone (or its own new object superseded) carries on."""
    ours = Pkcs11KeyValueStorage(_backend(softhsm).token, depth=3)
    theirs = Pkcs11KeyValueStorage(_backend(softhsm).token, depth=3)
    key = str(_path())
    asyncio.run(ours.set(key, b"old"))
    ((stamp, stale),) = ours._objects(key)
    asyncio.run(theirs.delete(key))
    ours._destroy(key, stamp, stale)  # already gone: nothing to do, no error
    asyncio.run(ours.set(key, b"new"))
    assert asyncio.run(theirs.get(key)) == b"new"


def test_token_store_keys_values_and_pages(softhsm: SoftHsm) -> None:
    store = Pkcs11KeyValueStorage(_backend(softhsm).token, depth=3)
    repo = f"r{uuid.uuid4().hex[:10]}"
    keys = [f"{repo}/kv/{tag}" for tag in ("a", "b", "c")]

    async def scenario() -> None:
        for i, key in enumerate(keys):
            assert await store.set(key, b"v%d" % i)
        assert await store.get_many([*keys, f"{repo}/kv/none"]) == {
            key: b"v%d" % i for i, key in enumerate(keys)
        }
        assert await store.list_page(f"{repo}/", None, 2) == keys[:2]
        assert await store.list_page(f"{repo}/", keys[1], 2) == keys[2:]
        assert await store.delete(keys[0]) == b"v0"
        assert await store.delete(keys[0]) is None
        assert await store.get(keys[0]) is None

    asyncio.run(scenario())


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


def _labels_under(softhsm: SoftHsm, prefix: str) -> list[str]:
    with _session(softhsm) as session:
        found = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        labels = (str(item[pkcs11.Attribute.LABEL]) for item in found)
        return sorted(label for label in labels if label.startswith(prefix))


def _value_labelled(softhsm: SoftHsm, label: str) -> bytes:
    with _session(softhsm) as session:
        (item,) = session.get_objects({pkcs11.Attribute.LABEL: label})
        return bytes(item[pkcs11.Attribute.VALUE])


# python-pkcs11 finalizes the failed search on the dead session and reports that as unraisable
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_session_dropped_by_the_token_is_reopened(softhsm: SoftHsm) -> None:
    backend, path = _backend(softhsm), _path()
    asyncio.run(backend.write(path, b"still here"))
    backend.token.session.close()  # what a token reset does to the session behind our back
    assert asyncio.run(backend.read(path)) == b"still here"

r"""A symlink planted in a local store never makes the KBS read or write a file outside it.

The attack: whoever can write to the storage directory (a shared volume, a careless backup
restore) plants ``repository/default\x2Fkey\x2Fhost -> /etc/hostname``; a guest allowed
``default/key/host`` would receive the host's file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError, StorageError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.local_json import LocalJsonKeyValueStorage

OUTSIDE = b"a host file outside the store"
KEY = "default/key/host"
LOCAL_FS_NAME = KEY.replace("/", "\\x2F")


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "hostname"
    target.parent.mkdir()
    target.write_bytes(OUTSIDE)
    return target


def _local_fs(root: Path, target: Path) -> KeyValueStorage:
    (root / "repository").mkdir(parents=True)
    (root / "repository" / LOCAL_FS_NAME).symlink_to(target)
    return LocalFsKeyValueStorage(root, "repository")


def _local_fs_deadline(root: Path, target: Path) -> KeyValueStorage:
    (root / "repository").mkdir(parents=True)
    (root / "repository" / LOCAL_FS_NAME).write_bytes(b"inside")
    (root / "repository" / f".{LOCAL_FS_NAME}.expires").symlink_to(target)
    return LocalFsKeyValueStorage(root, "repository")


def _local_json(root: Path, target: Path) -> KeyValueStorage:
    target.write_text('{"default/key/host": "b3V0c2lkZQ=="}')  # a valid file, outside
    root.mkdir()
    (root / "repository").symlink_to(target)
    return LocalJsonKeyValueStorage(root, "repository")


PLANTED: dict[str, Callable[[Path, Path], KeyValueStorage]] = {
    "local_fs value": _local_fs,
    "local_fs deadline": _local_fs_deadline,
    "local_json file": _local_json,
}


@pytest.mark.parametrize("plant", PLANTED.values(), ids=PLANTED.keys())
def test_symlink_out_of_the_store_is_not_followed(
    tmp_path: Path, plant: Callable[[Path, Path], KeyValueStorage]
) -> None:
    target = _outside(tmp_path)
    storage = plant(tmp_path / "store", target)
    before = target.read_bytes()
    with pytest.raises(StorageError, match="symbolic link"):
        asyncio.run(storage.get(KEY))
    with pytest.raises(StorageError, match="symbolic link"):  # writing through it
        asyncio.run(storage.set(KEY, b"written through the link"))
    with pytest.raises(StorageError, match="symbolic link"):
        asyncio.run(storage.delete(KEY))
    assert target.read_bytes() == before  # the file outside is untouched


def test_symlink_out_of_the_store_is_not_listed(tmp_path: Path) -> None:
    storage = _local_fs(tmp_path / "store", _outside(tmp_path))
    assert asyncio.run(storage.list_keys()) == []


def test_symlinked_namespace_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "repository").symlink_to(_outside(tmp_path).parent)
    with pytest.raises(StorageError, match="symbolic link"):
        LocalFsKeyValueStorage(tmp_path / "store", "repository")


def test_symlink_out_of_the_store_is_not_served_to_a_guest(tmp_path: Path) -> None:
    storage = {
        "storage_type": "LocalFs",
        "backends": {"local_fs": {"dir_path": str(tmp_path / "store")}},
    }
    config = kbs_config(storage_backend=storage)
    with TestClient(create_app(config)) as client:
        AdminClient("http://testserver", http=client).set_resource_policy(
            builtin_policy("allow_all")
        )
        (tmp_path / "store" / "repository" / LOCAL_FS_NAME).symlink_to(_outside(tmp_path))
        guest = KbsClient("http://testserver", http=client)
        with pytest.raises(KbsRejectedError) as refused:
            guest.get_resource(KEY)
    assert refused.value.http_status == 500
    assert OUTSIDE.decode() not in str(refused.value)

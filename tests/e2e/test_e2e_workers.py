"""``worker_count > 1``: real ``kbs`` processes whose workers share sessions and keep the
configuration's secrets out of their environment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kbs_process import running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"shared by every worker"
MARKER = "marker-6f1d2c-not-for-the-environment"

# Every way a configuration can put the RCAR sessions in memory: (top level, [storage_backend]).
SESSION_SPELLINGS = {
    "everything in memory": ("", 'storage_type = "Memory"'),
    "top-level session_storage_type": (
        'session_storage_type = "Memory"',
        'storage_type = "LocalFs"',
    ),
    "session_storage_type in [storage_backend]": (
        "",
        'storage_type = "LocalFs"\nsession_storage_type = "memory"',
    ),
}
LOCAL_FS = ("", 'storage_type = "LocalFs"')


def _config(tmp_path: Path, port: int, storage: tuple[str, str], extra: str = "") -> Path:
    top, section = storage
    config = tmp_path / "kbs.toml"
    config.write_text(
        f"{top}\n\n"
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n'
        "worker_count = 2\n\n"
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n\n'
        '[attestation_service]\ntype = "coco_as_builtin"\ntimeout = 5\n\n'
        f"[storage_backend]\n{section}\n"
        f'backends.local_fs.dir_path = "{tmp_path / "storage"}"\n{extra}'
    )
    return config


def _guest_round(url: str) -> bytes:
    # A fresh client per handshake, no keep-alive: each request may land on either worker.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    # httpx's 5 s default is too short for a first policy compilation on a loaded CI machine.
    http = httpx.Client(base_url=url, limits=no_keepalive, timeout=60.0)
    guest = KbsClient(url, http=http)
    try:
        return guest.get_resource("default/key/one")
    finally:
        guest.close()


@pytest.mark.parametrize("storage", SESSION_SPELLINGS.values(), ids=SESSION_SPELLINGS.keys())
def test_sessions_are_shared_by_workers_in_every_spelling(
    tmp_path: Path, storage: tuple[str, str]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(_config(tmp_path, port, storage))], tmp_path, url):
        admin = AdminClient(url)
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: _guest_round(url), range(64)))
    assert results == [SECRET] * 64


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def test_worker_config_is_not_in_the_environment(tmp_path: Path) -> None:
    """A database password in the configuration is not readable in /proc/<pid>/environ."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    postgres = f'\n[storage_backend.backends.postgres]\npassword = "{MARKER}"\n'
    config = _config(tmp_path, port, LOCAL_FS, postgres)
    with running_kbs(["-c", str(config)], tmp_path, url) as server:
        AdminClient(url).set_resource("default/key/one", SECRET)  # the workers are serving
        workers = _children(server.pid)
        assert len(workers) >= 2
        for pid in [server.pid, *workers]:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert MARKER.encode() not in environ
            assert b"KEYBROKER_WORKER_CONFIG_FILE=" in environ or pid == server.pid
            assert MARKER.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_worker_config_file_is_private(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(_config(tmp_path, port, LOCAL_FS))], tmp_path, url) as server:
        worker = _children(server.pid)[0]
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        (entry,) = [e for e in environ if e.startswith(b"KEYBROKER_WORKER_CONFIG_FILE=")]
        path = Path(entry.partition(b"=")[2].decode())
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
    assert not path.exists()  # removed with the server's runtime directory

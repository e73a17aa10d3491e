"""Secrets kept in an HSM (SoftHSM2): a real ``kbs`` process, ``kbs-client`` as the user.

The test session initializes its own SoftHSM token (tests/softhsm.py); the KBS runs with the
resource plugin on the ``pkcs11`` backend and upstream's ``pkcs11`` plugin beside it. Versions:
the bytes on the token, the records in PostgreSQL; two ``kbs`` processes sharing the token
directory (SoftHSM's file store serves several processes) and one database race writes.
"""

from __future__ import annotations

import base64
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pkcs11
import psycopg
import pytest
from psycopg import sql

from databases import fresh_postgres_database
from kbs_process import kbs_client, open_kbs_config, running_kbs
from keybroker.client.admin import AdminClient
from ports import free_port
from softhsm import LABEL, SoftHsm

pytestmark = pytest.mark.e2e

SECRET = b"\x00hsm-held secret\xff" * 40
WRITES_PER_REPLICA = 20
POSTGRES = """[storage_backend]
storage_type = "Postgres"

[storage_backend.backends.postgres]
db = "{database}"
host = "127.0.0.1"
port = 5432
timeout = 5

"""


def _config(tmp_path: Path, port: int, softhsm: SoftHsm, database: str | None = None) -> Path:
    config = tmp_path / f"kbs-config-{port}.toml"
    hsm = f'module = "{softhsm.module}"\nslot_index = 0\npin = "{softhsm.pin}"'
    storage = "" if database is None else POSTGRES.format(database=database)
    config.write_text(
        open_kbs_config(
            port,
            storage
            + f"""[[plugins]]
name = "resource"
storage_backend_type = "pkcs11"
{hsm}

[[plugins]]
name = "pkcs11"
{hsm}
""",
        )
    )
    config.chmod(0o600)  # it holds the PIN
    return config


def test_secrets_round_trip_through_the_http_api(tmp_path: Path, softhsm: SoftHsm) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(SECRET)
    with running_kbs(
        ["-c", str(_config(tmp_path, port, softhsm))], tmp_path, url, env=softhsm.env()
    ):
        stored = kbs_client(
            "--url",
            url,
            "config",
            "set-resource",
            "--path",
            "hsm/keys/one",
            "--resource-file",
            str(secret_file),
        )
        assert stored.returncode == 0, stored.stderr
        allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
        assert allow.returncode == 0, allow.stderr
        got = kbs_client("--url", url, "get-resource", "--path", "hsm/keys/one")
        assert got.returncode == 0, got.stderr
        assert base64.b64decode(got.stdout.strip()) == SECRET

        # upstream's plugin path reaches the same token
        plugin = httpx.post(f"{url}/kbs/v0/pkcs11/resource/hsm/keys/two", content=b"two")
        assert plugin.status_code == 200, plugin.text
        assert httpx.post(f"{url}/kbs/v0/pkcs11/wrap-key", content=b"x").status_code == 404

        missing = kbs_client("--url", url, "get-resource", "--path", "hsm/keys/absent")
        assert missing.returncode == 1 and "404" in missing.stderr

    log = (tmp_path / "kbs.log").read_text()
    assert softhsm.pin not in log and SECRET.decode("latin-1") not in log

    # the secrets are objects on the token, labelled with their paths
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=LABEL)
    try:
        session = token.open(user_pin=softhsm.pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        session = token.open()
    with session:
        labels = {
            str(item[pkcs11.Attribute.LABEL])
            for item in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        }
    assert {"hsm/keys/one", "hsm/keys/two"} <= labels


def _cli(url: str, *args: str) -> str:
    done = kbs_client("--url", url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _upload(url: str, workdir: Path, path: str, content: bytes) -> None:
    (workdir / "upload").write_bytes(content)
    _cli(url, "config", "set-resource", "--path", path, "--resource-file", str(workdir / "upload"))


def _session(softhsm: SoftHsm) -> pkcs11.Session:
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=LABEL)
    try:
        return token.open(user_pin=softhsm.pin, rw=True)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=True)


def _labels(softhsm: SoftHsm, prefix: str) -> list[str]:
    with _session(softhsm) as session:
        found = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        return sorted(
            label
            for label in (str(item[pkcs11.Attribute.LABEL]) for item in found)
            if label.startswith(prefix)
        )


def test_versions_on_the_hsm_through_kbs_client(tmp_path: Path, softhsm: SoftHsm) -> None:
    """Write twice, list, read version 1, roll back, delete, undelete, purge: as an operator."""
    path = f"v{uuid.uuid4().hex[:10]}/keys/one"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        fresh_postgres_database() as database,
        running_kbs(
            ["-c", str(_config(tmp_path, port, softhsm, database))],
            tmp_path,
            url,
            env=softhsm.env(),
        ),
    ):
        _upload(url, tmp_path, path, b"first-SECRET")
        _upload(url, tmp_path, path, b"second-SECRET")
        _cli(url, "config", "set-resource-policy", "--allow-all")

        listed = json.loads(_cli(url, "config", "list-resources", "--prefix", path[:11]))
        assert [(r["name"], r["current_version"]) for r in listed["resources"]] == [(path, 2)]
        assert "SECRET" not in json.dumps(listed)  # names and versions, never values
        got = _cli(url, "get-resource", "--path", path, "--version", "1")
        assert base64.b64decode(got.strip()) == b"first-SECRET"

        _cli(url, "config", "rollback-resource", "--path", path, "--version", "1")
        assert base64.b64decode(_cli(url, "get-resource", "--path", path)) == b"first-SECRET"
        meta = json.loads(_cli(url, "config", "get-resource-meta", "--path", path))
        assert meta["current_version"] == 3 and meta["versioned"] is True
        assert [v["version"] for v in meta["versions"]] == [1, 2, 3]

        _cli(url, "config", "delete-resource", "--path", path)
        gone = kbs_client("--url", url, "get-resource", "--path", path)
        assert gone.returncode == 1 and "404" in gone.stderr
        _cli(url, "config", "undelete-resource", "--path", path, "--version", "3")
        assert base64.b64decode(_cli(url, "get-resource", "--path", path)) == b"first-SECRET"

        # on the token: the current value under the path (upstream's layout), a version object
        # per distinct bytes (the rollback names version 1's)
        labels = _labels(softhsm, path)
        assert labels[0] == path and len(labels) == 3
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}") as db:
            tables = [row[0] for row in db.execute("SELECT tablename FROM pg_tables")]
            (meta_table,) = [t for t in tables if t.startswith("pkcs11_meta_")]
            records = db.execute(
                sql.SQL("SELECT value FROM {}").format(sql.Identifier(meta_table))
            ).fetchall()
        assert records and all(b"SECRET" not in bytes(row[0]) for row in records)

        _cli(url, "config", "purge-resource", "--path", path)
        missing = kbs_client("--url", url, "config", "get-resource-meta", "--path", path)
        assert missing.returncode == 1 and "404" in missing.stderr
        assert _labels(softhsm, path) == []
    log = (tmp_path / "kbs.log").read_text()
    assert softhsm.pin not in log and "SECRET" not in log


def test_legacy_hsm_object_is_served_then_migrated_by_a_real_kbs(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    """An object upstream's plugin wrote (no Keybroker stamp, no record) is version 1; the
    first write through the KBS keeps it as version 1 and adds version 2."""
    path = f"v{uuid.uuid4().hex[:10]}/keys/legacy"
    with _session(softhsm) as session:
        session.create_object(
            {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.PRIVATE: True,
                pkcs11.Attribute.SENSITIVE: False,
                pkcs11.Attribute.EXTRACTABLE: True,
                pkcs11.Attribute.LABEL: path,
                pkcs11.Attribute.VALUE: b"from upstream",
            }
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        fresh_postgres_database() as database,
        running_kbs(
            ["-c", str(_config(tmp_path, port, softhsm, database))],
            tmp_path,
            url,
            env=softhsm.env(),
        ),
    ):
        _cli(url, "config", "set-resource-policy", "--allow-all")
        assert base64.b64decode(_cli(url, "get-resource", "--path", path)) == b"from upstream"
        meta = json.loads(_cli(url, "config", "get-resource-meta", "--path", path))
        assert meta["versioned"] is False and meta["current_version"] == 1
        _upload(url, tmp_path, path, b"new")
        got = _cli(url, "get-resource", "--path", path, "--version", "1")
        assert base64.b64decode(got.strip()) == b"from upstream"
        assert base64.b64decode(_cli(url, "get-resource", "--path", path)) == b"new"
        meta = json.loads(_cli(url, "config", "get-resource-meta", "--path", path))
        assert meta["versioned"] is True and meta["current_version"] == 2


@pytest.mark.slow
def test_two_kbs_on_one_token_and_one_postgres_racing_writes_lose_no_version(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    path = f"v{uuid.uuid4().hex[:10]}/keys/raced"
    total = 2 * WRITES_PER_REPLICA
    with ExitStack() as stack:
        database = stack.enter_context(fresh_postgres_database())
        urls = []
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = _config(tmp_path, port, softhsm, database)
            stack.enter_context(
                running_kbs(
                    ["-c", str(config)], tmp_path, url, env=softhsm.env(), log_name=f"{port}.log"
                )
            )
            urls.append(url)

        def write(index: int) -> int | None:
            admin = AdminClient(urls[index % 2])
            try:
                return admin.set_resource(path, b"write %d" % index)
            finally:
                admin.close()

        with ThreadPoolExecutor(max_workers=8) as pool:
            numbers = list(pool.map(write, range(total)))
        assert sorted(n for n in numbers if n is not None) == list(range(1, total + 1))

        meta = json.loads(_cli(urls[1], "config", "get-resource-meta", "--path", path))
        assert meta["current_version"] == total
        assert [v["version"] for v in meta["versions"]] == list(range(total - 9, total + 1))
        _cli(urls[0], "config", "set-resource-policy", "--allow-all")
        current = {base64.b64decode(_cli(url, "get-resource", "--path", path)) for url in urls}
        assert len(current) == 1 and current <= {b"write %d" % i for i in range(total)}
        # racing mirror writes on two processes may each miss the other's new object: the
        # next write of the label removes what they left
        _upload(urls[0], tmp_path, path, b"last")
        assert base64.b64decode(_cli(urls[1], "get-resource", "--path", path)) == b"last"
        # retention removed the bytes of retired versions from the token: 10 kept, plus the
        # current value under the path itself
        assert len(_labels(softhsm, path)) == 11
    # objects destroyed by the other replica meanwhile are not failures (no tidying up failed)
    for log in tmp_path.glob("*.log"):
        assert "tidying up failed" not in log.read_text(), log.name

"""The typed registries: ``storage_type`` -> key-value provider, backend kind -> secret backend.

A config file must parse with no optional extra installed, and a backend whose extra is missing
must stop start-up with the ``pip install`` line, never a traceback. Those two run in a fresh
interpreter where the extras' packages cannot be imported (``sys.modules`` entries None).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FakeClock
from keybroker.config import StorageBackends, StorageType
from keybroker.errors import ConfigError
from keybroker.storage.aws_secrets import AwsSecretsConfig
from keybroker.storage.local_fs import LocalFsKeyValueStorage
from keybroker.storage.memory import MemoryKeyValueStorage
from keybroker.storage.provider import memory_provider
from keybroker.storage.registry import STAMPED_CACHE, STORAGE_PROVIDERS, storage_provider
from keybroker.storage.secret_registry import SECRET_BACKENDS, BuildContext
from keybroker.storage.vault_settings import VaultConfig

_CONTEXT = BuildContext(memory_provider().get)

# The settings of one backend of each kind, valid without touching its service.
SETTINGS: dict[str, dict[str, object]] = {
    "pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so", "pin": "1234"},
    "vault": {"vault_url": "http://127.0.0.1:1", "token": "t"},
    "aliyun": {
        "client_key": "{}",
        "kms_instance_id": "kst-test",
        "password": "p",
        "cert_pem": "-----BEGIN CERTIFICATE-----",
    },
    "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1"},
    "gcp": {"project_id": "test-project", "endpoint_url": "http://127.0.0.1:1"},
}
# backend kind (or storage type) -> (extra, top-level packages it brings)
EXTRAS = {
    "pkcs11": ("pkcs11", ["pkcs11"]),
    "vault": ("vault", ["hvac"]),
    "aws": ("aws", ["boto3", "botocore"]),
    "gcp": ("gcp", ["google", "grpc"]),
    "Postgres": ("postgres", ["psycopg", "psycopg_pool"]),
    "Redis": ("redis", ["redis"]),
}


def test_every_storage_type_has_a_provider() -> None:
    assert set(STORAGE_PROVIDERS) == set(StorageType)


def test_every_storage_type_says_whether_the_stamped_read_cache_serves_it() -> None:
    assert set(STAMPED_CACHE) == set(StorageType)
    assert not STAMPED_CACHE[StorageType.MEMORY]  # in-process: no round trip to save


def test_the_memory_and_local_fs_providers(tmp_path: Path) -> None:
    clock = FakeClock()
    memory = storage_provider(StorageType.MEMORY, StorageBackends(), clock, None)
    assert isinstance(memory.get("repository"), MemoryKeyValueStorage)
    backends = StorageBackends.model_validate({"local_fs": {"dir_path": str(tmp_path)}})
    local = storage_provider(StorageType.LOCAL_FS, backends, clock, None)
    assert isinstance(local.get("repository"), LocalFsKeyValueStorage)


def test_a_secret_backend_parses_its_own_settings_only() -> None:
    aws = SECRET_BACKENDS["aws"]
    assert aws.parse({"region": "eu-west-3"}) == AwsSecretsConfig(region="eu-west-3")
    with pytest.raises(TypeError, match="expected AwsSecretsConfig, got VaultConfig"):
        aws.build(VaultConfig(vault_url="http://127.0.0.1:1", token="t"), _CONTEXT)


def test_settings_of_every_secret_backend_parse() -> None:
    assert set(SETTINGS) == set(SECRET_BACKENDS)
    for kind, values in SETTINGS.items():
        parsed = SECRET_BACKENDS[kind].parse(values)
        assert isinstance(parsed, SECRET_BACKENDS[kind].settings)


_PROBE = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # the extra is "not installed"
from keybroker.config import parse_config
from keybroker.errors import ConfigError
from keybroker.kbs.services import build_services
from keybroker.storage.provider import memory_provider
from keybroker.storage.secret_registry import SECRET_BACKENDS, BuildContext

kind, settings = sys.argv[2], json.loads(sys.argv[3])
base = {"admin": {"authorization_mode": "InsecureAllowAll"}, "audit": {"sink": "stdout"}}
try:
    if kind in ("Postgres", "Redis"):
        backends = {kind.lower(): settings}
        storage = {"storage_type": kind, "backends": backends}
        build_services(parse_config({**base, "storage_backend": storage}, environ={}))
    else:
        plugin = {"name": "resource", "storage_backend_type": kind, **settings}
        config = parse_config({**base, "plugins": [plugin]}, environ={})
        print("parsed", flush=True)  # the file is checked without the extra
        context = BuildContext(memory_provider().get)
        SECRET_BACKENDS[kind].build(config.plugins[0].backend_settings(), context)
except ConfigError as e:
    print(e.detail)
    sys.exit(3)
"""


@pytest.mark.parametrize("kind", sorted(EXTRAS))
def test_a_missing_extra_is_the_pip_line(kind: str) -> None:
    extra, packages = EXTRAS[kind]
    settings = SETTINGS.get(kind, {"url": "redis://127.0.0.1:1"} if kind == "Redis" else {})
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(packages), kind, json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"pip install 'keybroker[{extra}]'" in done.stdout
    assert "Traceback" not in done.stderr
    if kind not in ("Postgres", "Redis"):
        assert done.stdout.startswith("parsed\n")


def test_a_storage_section_missing_names_its_keys_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"backends\.postgres.*POSTGRES_URL"):
        storage_provider(StorageType.POSTGRES, StorageBackends(), FakeClock(), None)
    with pytest.raises(ConfigError, match=r"backends\.redis.*REDIS_URL"):
        storage_provider(StorageType.REDIS, StorageBackends(), FakeClock(), None)

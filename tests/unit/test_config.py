"""Configuration: upstream files load; typos are named; unserved features are refused clearly."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import kbs_config, vector
from keybroker.attestation.intel_ta import IntelTrustAuthority
from keybroker.config import (
    AdminDenyAll,
    BuiltinAsConfig,
    GrpcAsConfig,
    IntelTaConfig,
    KbsConfig,
    ResourcePluginConfig,
    StorageType,
    load_config,
    parse_config,
)
from keybroker.errors import ConfigError
from keybroker.kbs.services import build_services
from keybroker.kbs.tls import self_signed_certificate
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.jws import jwk_of
from keybroker.protocol.models import Tee

# Why each upstream vector does not start here: a feature no issue has served yet ("not
# supported yet"), a file it names that this machine does not have, or upstream's own rule that
# a KBS must be able to trust some attestation token.
NO_TRUST = "could not accept any attestation token"
EXPECTED_REFUSAL = {
    "coco-as-builtin-1.toml": None,
    "coco-as-builtin-2.toml": None,
    "coco-as-builtin-3.toml": "needs at least one entry in [admin.authentication.bearer_jwt]",
    "coco-as-grpc-1.toml": "cannot read trusted certificate /etc/ca",
    "coco-as-grpc-2.toml": "cannot read key material /opt/confidential-containers/trustee",
    "coco-as-grpc-3.toml": NO_TRUST,
    "intel-ta-1.toml": "cannot read key material /etc/ita-cert.pem",
    "intel-ta-2.toml": None,  # ITA's keys are fetched on first use, not at start-up
    "intel-ta-3.toml": None,
    "tls-profile-custom-pqc.toml": NO_TRUST,
    "tls-profile-custom.toml": NO_TRUST,
    "tls-profile-intermediate.toml": NO_TRUST,
    "tls-profile-modern.toml": NO_TRUST,
    "tls-profile-old.toml": NO_TRUST,
}


def _vector_configs() -> list[Path]:
    return sorted(vector("kbs", "configs").iterdir())


def test_every_upstream_config_is_listed() -> None:
    assert sorted(p.name for p in _vector_configs()) == sorted(EXPECTED_REFUSAL)


@pytest.mark.parametrize("name", sorted(EXPECTED_REFUSAL))
def test_upstream_config_loads(name: str, tmp_path: Path) -> None:
    config = load_config(vector("kbs", "configs", name))
    expected = EXPECTED_REFUSAL[name]
    if expected is None:
        services = build_services(config)
        assert "resource" in services.plugins
        return
    with pytest.raises(ConfigError) as refused:
        build_services(config)
    assert expected in refused.value.detail


def test_upstream_sections_parse_to_their_meaning() -> None:
    base = vector("kbs", "configs")
    builtin = load_config(base / "coco-as-builtin-1.toml")
    assert isinstance(builtin.attestation_service, BuiltinAsConfig)
    assert builtin.attestation_service.attestation_token_broker.duration_min == 5
    assert isinstance(builtin.admin, AdminDenyAll)
    assert builtin.storage_backend.storage_type is StorageType.LOCAL_JSON
    local_json = builtin.storage_backend.backends.local_json
    assert local_json is not None and str(local_json.file_dir_path).endswith("trustee")
    grpc = load_config(base / "coco-as-grpc-1.toml")
    assert isinstance(grpc.attestation_service, GrpcAsConfig)
    assert grpc.attestation_service.pool_size == 100 and grpc.attestation_service.timeout == 600
    assert grpc.attestation_token.trusted_certs_paths == ["/etc/ca", "/etc/ca2"]
    assert [p.name for p in grpc.plugins] == ["sample", "resource"]
    ita = load_config(base / "intel-ta-1.toml")
    assert isinstance(ita.attestation_service, IntelTaConfig)
    assert "this-is-a-key" not in repr(ita.attestation_service)  # secrets stay out of logs
    builtin2 = load_config(base / "coco-as-builtin-2.toml")
    assert builtin2.http_server.payload_limit_bytes == 2 * 1024 * 1024
    assert builtin2.session_storage_type is StorageType.MEMORY


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"http_server": {"socket": ["127.0.0.1:1"]}}, "http_server.socket"),
        ({"attestation_service": {"type": "coco_as_builtin", "timout": 5}}, "timout"),
        ({"admin": {"authorization_mode": "DenyAll", "auth_public_key": "x"}}, "auth_public_key"),
        ({"plugins": [{"name": "resource", "dirpath": "/x"}]}, "dirpath"),
        ({"storage_backend": {"storage_type": "Memory", "backend": {}}}, "backend"),
        ({"unknown_section": {}}, "unknown_section"),
        ({"storage_cache": {"max_entry": 10}}, "max_entry"),
    ],
)
def test_unknown_key_is_named_with_file(
    tmp_path: Path, document: dict[str, object], named: str
) -> None:
    path = tmp_path / "kbs-config.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert named in error.value.detail and str(path) in error.value.detail


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[http_server\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(path)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "absent.toml")


def test_defaults_fail_closed() -> None:
    config = load_config_text("")
    assert isinstance(config.admin, AdminDenyAll)
    assert config.http_server.insecure_http is False
    assert isinstance(config.attestation_service, BuiltinAsConfig)
    assert config.attestation_service.timeout == 5
    assert [type(p) for p in config.plugins] == [ResourcePluginConfig]


def test_seed_era_resource_plugin_form() -> None:
    config = kbs_config(plugins=[{"name": "resource", "type": "LocalFs", "dir_path": "/srv/r"}])
    plugin = config.plugins[0]
    assert isinstance(plugin, ResourcePluginConfig)
    assert plugin.backend_kind() == "legacy_local_fs" and str(plugin.legacy_dir()) == "/srv/r"


@pytest.mark.parametrize("kind", ["Postgres", "Redis", "LocalJson", "LocalFs"])
def test_storage_type_without_its_backend_section_is_refused(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    config = kbs_config(storage_backend={"storage_type": kind})
    with pytest.raises(ConfigError, match=f"storage_type = {kind} needs"):
        build_services(config)


@pytest.mark.parametrize(
    ("kind", "variable", "url"),
    [
        ("Postgres", "POSTGRES_URL", "postgresql://kbs:pw@db.example:6543/kbs"),
        ("Redis", "REDIS_URL", "redis://:pw@cache.example:6380/2"),
    ],
)
def test_storage_url_from_environment(
    kind: str, variable: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As upstream: the URL variable replaces the config section (so a password need never
    sit in a config file)."""
    monkeypatch.setenv(variable, url)
    section: dict[str, object] = {
        kind.lower(): {}
    }  # defaults would point elsewhere: the variable wins
    services = build_services(
        kbs_config(storage_backend={"storage_type": kind, "backends": section})
    )
    store = services.providers[0].get("repository")
    assert type(store).__name__ == f"{kind}KeyValueStorage"
    assert url in vars(store).values()


def test_session_storage_type_in_either_place() -> None:
    backends = {"local_fs": {"dir_path": "/srv/kbs-unused"}}
    inner = kbs_config(
        storage_backend={
            "storage_type": "LocalFs",
            "session_storage_type": "Memory",
            "backends": backends,
        }
    )
    outer = kbs_config(
        storage_backend={"storage_type": "LocalFs", "backends": backends},
        session_storage_type="memory",
    )
    assert inner.session_storage is outer.session_storage is StorageType.MEMORY
    with pytest.raises(ConfigError, match="session_storage_type is set twice"):
        kbs_config(
            storage_backend={"storage_type": "LocalFs", "session_storage_type": "Redis"},
            session_storage_type="Memory",
        )


def test_postgres_settings_keep_the_user_with_a_password() -> None:
    """Upstream built its URL without the user name once a password was set."""
    from keybroker.storage.postgres import conninfo_from_config  # noqa: PLC0415

    conninfo = conninfo_from_config(
        db="kbs", username="broker", password="s3cret", host="db", port=5433
    )
    assert "user=broker" in conninfo and "password=s3cret" in conninfo


def load_config_text(text: str) -> KbsConfig:
    return parse_config(tomllib.loads(text))


def test_unknown_key_beside_the_kvstorage_backend_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*`vault_url`.*kvstorage"):
        kbs_config(
            plugins=[{"name": "resource", "storage_backend_type": "kvstorage", "vault_url": "x"}]
        )


# Upstream's Intel Trust Authority configs, with the files they name replaced by real ones.
ITA_CONFIGS = {
    ("kbs", "configs", "intel-ta-1.toml"): "base_url must be an https:// URL",  # "example.io"
    ("kbs", "configs", "intel-ta-2.toml"): None,
    ("kbs", "configs", "intel-ta-3.toml"): None,
    ("kbs", "config", "kbs-config-intel-trust-authority.toml"): None,
    ("kbs", "config", "kubernetes", "ita", "kbs-config.toml"): None,
}


def _local_files_replaced(document: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """``document`` with every local file or directory it names moved under ``tmp_path``."""
    key = rsa.generate_private_key(65537, 3072)
    jwks = tmp_path / "ita-certs.json"
    jwks.write_text(json.dumps({"keys": [{**jwk_of(key.public_key()), "kid": "ita-1"}]}))
    token = document.get("attestation_token", {})
    token["trusted_jwk_sets"] = [
        uri if uri.startswith("https://") else str(jwks)
        for uri in token.get("trusted_jwk_sets", [])
    ]
    service = document["attestation_service"]
    if not service["certs_file"].startswith("https://"):
        service["certs_file"] = f"file://{jwks}"
    server = document.get("http_server", {})
    if "private_key" in server:
        key_pem, cert_pem = self_signed_certificate(["127.0.0.1"])
        (tmp_path / "kbs.key").write_bytes(key_pem)
        (tmp_path / "kbs.pem").write_bytes(cert_pem)
        server.update(private_key=str(tmp_path / "kbs.key"), certificate=str(tmp_path / "kbs.pem"))
    backends = document.get("storage_backend", {}).get("backends", {})
    for name, setting in (("local_json", "file_dir_path"), ("local_fs", "dir_path")):
        if name in backends:
            backends[name][setting] = str(tmp_path / name)
    return document


@pytest.mark.parametrize("parts", sorted(ITA_CONFIGS), ids="/".join)
def test_upstream_ita_configs_start_with_their_files_replaced(
    parts: tuple[str, ...], tmp_path: Path
) -> None:
    document = tomllib.loads(vector(*parts).read_text())
    config = parse_config(_local_files_replaced(document, tmp_path), source=parts[-1])
    service = config.attestation_service
    assert isinstance(service, IntelTaConfig) and service.timeout == 5
    assert service.request_timeout == 30.0  # Keybroker's own ITA deadline, not `timeout`
    expected = ITA_CONFIGS[parts]
    if expected is not None:
        with pytest.raises(ConfigError, match=expected):
            build_services(config)
        return
    services = build_services(config)
    assert isinstance(services.attestation, IntelTrustAuthority)
    assert services.handshake is not None and services.attestation.supports(Tee.TDX)
    assert services.attestation.required_hash_algorithm(Tee.TDX) is HashAlgorithm.SHA512


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"attestation_service": {"timeout": 5}}, "`attestation_service` needs its `type` key"),
        ({"admin": {"x": 1}}, "`admin` needs its `authorization_mode` key"),
    ],
)
def test_a_missing_kind_key_is_named_in_the_configs_words(
    document: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(document, source="test")
    assert named in refused.value.detail
    assert "discriminator" not in refused.value.detail


def test_storage_cache_defaults_and_bounds() -> None:
    cache = KbsConfig().storage_cache
    assert cache.enabled
    assert (cache.max_entries, cache.max_bytes, cache.max_value_bytes) == (
        4096,
        16 * 1024 * 1024,
        256 * 1024,
    )
    assert cache.max_age_seconds == 5.0
    with pytest.raises(ConfigError, match="max_value_bytes"):
        parse_config({"storage_cache": {"max_bytes": 4096, "max_value_bytes": 8192}}, source="test")
    with pytest.raises(ConfigError, match="max_age_seconds"):
        parse_config({"storage_cache": {"max_age_seconds": 0}}, source="test")
    off = parse_config({"storage_cache": {"enabled": False}}, source="test")
    assert not off.storage_cache.enabled

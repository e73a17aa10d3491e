"""The environment is mapped into the configuration once, at load time (``keybroker.config_env``):
each variable of the table lands in its config key, with the documented precedence."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keybroker.config import (
    BuiltinAsConfig,
    GrpcAsConfig,
    KbsConfig,
    NoAsConfig,
    load_as_config,
    parse_config,
)
from keybroker.config_env import AS_VARIABLES, KBS_VARIABLES, SE_VARIABLES, Wins

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@dataclass(frozen=True)
class Case:
    """One variable: a document without the key, the same with the key set in the file, the
    values of both sources, and where the value lands."""

    without: dict[str, Any]
    with_file_value: dict[str, Any]
    env_value: str
    file_value: object
    read: Callable[[KbsConfig], object]
    expected_from_env: object = None  # when it differs from env_value


def _verifiers(config: KbsConfig) -> dict[str, Any]:
    service = config.attestation_service
    assert isinstance(service, BuiltinAsConfig)
    return service.verifier_config or {}


def _builtin(verifier_config: dict[str, Any]) -> dict[str, Any]:
    return {"attestation_service": {"type": "coco_as_builtin", "verifier_config": verifier_config}}


def _cases(tmp_path: Path) -> dict[str, Case]:
    cca_file = tmp_path / "cca-config.json"
    cca_env_section = {"type": "remote", "address": "https://veraison.example"}
    cca_file.write_text(json.dumps({"cca-verifier": cca_env_section}))
    cca_file_section = {"type": "remote", "address": "https://mine.example"}

    def storage(kind: str, url: str | None) -> dict[str, Any]:
        section = {"url": url} if url else {}
        return {"storage_backend": {"storage_type": kind, "backends": {kind.lower(): section}}}

    def aws(region: str | None) -> dict[str, Any]:
        plugin = {"name": "resource", "storage_backend_type": "aws"}
        return {"plugins": [{**plugin, "region": region} if region else plugin]}

    def grpc(ca: str | None) -> dict[str, Any]:
        section = {"type": "coco_as_grpc", "as_addr": "https://as.example:50004"}
        return {"attestation_service": {**section, "ca_cert_path": ca} if ca else section}

    def metrics(key: str, value: str | None) -> dict[str, Any]:
        return {"metrics": {key: value} if value else {}}

    def grpc_ca(config: KbsConfig) -> object:
        assert isinstance(config.attestation_service, GrpcAsConfig)
        return config.attestation_service.ca_cert_path

    cases = {
        "POSTGRES_URL": Case(
            storage("Postgres", None),
            storage("Postgres", "postgresql://file@db/kbs"),
            "postgresql://env@db/kbs",
            "postgresql://file@db/kbs",
            lambda c: c.storage_backend.backends.postgres.url,  # type: ignore[union-attr]
        ),
        "REDIS_URL": Case(
            storage("Redis", None),
            storage("Redis", "redis://file:6379/0"),
            "redis://env:6379/1",
            "redis://file:6379/0",
            lambda c: c.storage_backend.backends.redis.url,  # type: ignore[union-attr]
        ),
        "AWS_REGION": Case(
            aws(None),
            aws("eu-west-3"),
            "us-east-1",
            "eu-west-3",
            lambda c: c.plugins[0].backend_settings().region,  # type: ignore[union-attr]
        ),
        "SSL_CERT_FILE": Case(
            grpc(None),
            grpc("/etc/kbs/as-ca.pem"),
            "/etc/ssl/env-ca.pem",
            Path("/etc/kbs/as-ca.pem"),
            grpc_ca,
            expected_from_env=Path("/etc/ssl/env-ca.pem"),
        ),
        "KBS_GIT_HASH": Case(
            {},
            metrics("git_hash", "filehash"),
            "0123456789abcdef0123456789abcdef01234567-and-more",
            "filehash",
            lambda c: c.metrics.git_hash,
            expected_from_env="0123456789abcdef0123456789abcdef01234567",  # 40 at most
        ),
        "KBS_BUILD_DATE": Case(
            {},
            metrics("build_date", "2026-01-01"),
            "2026-12-07",
            "2026-01-01",
            lambda c: c.metrics.build_date,
        ),
        "SE_SKIP_CERTS_VERIFICATION": Case(
            {},
            _builtin({"se": {"insecure_skip_certs_verification": False}}),
            "TRUE",
            False,
            lambda c: _verifiers(c)["se"]["insecure_skip_certs_verification"],
            expected_from_env=True,
        ),
        "CCA_CONFIG_FILE": Case(
            {},
            _builtin({"cca": cca_file_section}),
            str(cca_file),
            cca_file_section,
            lambda c: _verifiers(c)["cca"],
            expected_from_env=cca_env_section,
        ),
    }
    for name, key in SE_VARIABLES.items():
        cases[name] = Case(
            {},
            _builtin({"se": {key: "/from/file"}}),
            "/from/env",
            "/from/file",
            lambda c, key=key: _verifiers(c)["se"][key],  # type: ignore[misc]
        )
    return cases


def test_every_variable_of_the_table_has_a_case(tmp_path: Path) -> None:
    assert set(_cases(tmp_path)) == {variable.name for variable in KBS_VARIABLES}


@pytest.mark.parametrize("variable", KBS_VARIABLES, ids=lambda v: v.name)
def test_each_variable_lands_in_its_key_with_its_precedence(variable: Any, tmp_path: Path) -> None:
    case = _cases(tmp_path)[variable.name]
    environ = {variable.name: case.env_value}
    from_env = case.env_value if case.expected_from_env is None else case.expected_from_env
    assert case.read(parse_config(case.without, environ=environ)) == from_env
    both = case.read(parse_config(case.with_file_value, environ=environ))
    assert both == (from_env if variable.wins is Wins.ENVIRONMENT else case.file_value)
    assert case.read(parse_config(case.with_file_value, environ={})) == case.file_value


def test_an_empty_variable_counts_as_unset() -> None:
    config = parse_config({}, environ={"POSTGRES_URL": "", "AWS_REGION": "", "KBS_GIT_HASH": ""})
    assert config.storage_backend.backends.postgres is None
    assert config.metrics.git_hash is None  # the label says "unknown"
    assert config.plugins[0].backend_kind() == "kvstorage"  # type: ignore[union-attr]


def test_variables_for_a_part_that_is_not_configured_are_not_applied() -> None:
    """SSL_CERT_FILE is for a gRPC AS and the verifier variables for a builtin one: another
    AS type (which has no such key) still loads."""
    environ = {"SSL_CERT_FILE": "/etc/ssl/ca.pem", "SE_CERTIFICATES_ROOT": "/se/certs"}
    builtin = parse_config({}, environ=environ)
    assert _verifiers(builtin) == {"se": {"certificates_dir": "/se/certs"}}
    passport = parse_config({"attestation_service": {"type": "none"}}, environ=environ)
    assert isinstance(passport.attestation_service, NoAsConfig)


def test_the_document_given_is_not_changed() -> None:
    document: dict[str, object] = {"storage_backend": {"storage_type": "Redis"}}
    parse_config(document, environ={"REDIS_URL": "redis://env:6379/0"})
    assert document == {"storage_backend": {"storage_type": "Redis"}}


def test_workers_get_the_mapped_config_without_mapping_again() -> None:
    """The server writes its loaded config for its workers (kbs/server.py), which parse it with
    no environment: every mapped value survives the round trip."""
    environ = {"REDIS_URL": "redis://env:6379/0", "KBS_BUILD_DATE": "2026-12-07"}
    loaded = parse_config({"storage_backend": {"storage_type": "Redis"}}, environ=environ)
    again = parse_config(json.loads(loaded.model_dump_json()), environ={})
    assert again == loaded
    assert again.storage_backend.backends.redis is not None
    assert again.storage_backend.backends.redis.url == "redis://env:6379/0"


def test_the_attestation_service_file_maps_the_verifier_variables(tmp_path: Path) -> None:
    assert {v.name for v in AS_VARIABLES} == {
        v.name for v in KBS_VARIABLES if v.field.startswith("attestation_service.verifier_config")
    }
    path = tmp_path / "as-config.json"
    path.write_text(json.dumps({"verifier_config": {"se": {"crls_dir": "/file/crls"}}}))
    environ = {"SE_CERTIFICATE_REVOCATION_LISTS_ROOT": "/env/crls", "SE_IMAGE_HEADER_FILE": "/h"}
    config = load_as_config(path, environ=environ)
    assert config.verifier_config == {"se": {"crls_dir": "/file/crls", "image_header": "/h"}}


def test_the_documented_table_is_the_code_table() -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `([A-Z0-9_]+)` \| `([^`]+)`[^|]*\| (environment|file) \|$", section, re.M
    )
    assert rows == [(v.name, v.field, v.wins.value) for v in KBS_VARIABLES]

"""The environment variables of a KBS or an Attestation Service, mapped into the configuration
once, when it is loaded.

Upstream Trustee reads some settings from the environment (``POSTGRES_URL``, ``REDIS_URL``,
the IBM SE verifier's paths, ``CCA_CONFIG_FILE``...); operators have others in their
deployments (``AWS_REGION``, ``SSL_CERT_FILE``, ``KBS_GIT_HASH``). Each is mapped here, by
:data:`KBS_VARIABLES` and :data:`AS_VARIABLES`, into the key of the config document it stands
for, before the document is validated: the code below ``keybroker.config`` reads its settings
from the one config object and never from ``os.environ``.

Precedence, as before this mapping: ``POSTGRES_URL`` and ``REDIS_URL`` win over the file (as
upstream's, so a password need never sit in a file); every other variable fills a key the file
leaves unset (the file wins). docs/configuration.md holds the same table.

This module does not read process plumbing (the server's variables for its own workers) nor a
client's defaults, and libraries keep reading their own standard variables (boto3's credential
chain, Google's application default credentials, httpx's ``SSL_CERT_FILE`` and proxies).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from keybroker.config import as_type_name, resource_backend_kind
from keybroker.errors import BadRequestError, ConfigError
from keybroker.protocol.untrusted_json import parse_json

MAX_CCA_CONFIG_BYTES = 4 * 1024 * 1024


class Wins(StrEnum):
    """Which value is used when both the file and the environment set one."""

    ENVIRONMENT = "environment"
    FILE = "file"


@dataclass(frozen=True)
class Variable:
    name: str
    field: str  # the config key it sets, as docs/configuration.md spells it
    wins: Wins


# upstream's IBM SE variables -> the key of [attestation_service.verifier_config.se] each fills
SE_VARIABLES = {
    "DEFAULT_SE_HOST_KEY_DOCUMENTS_ROOT": "host_key_documents_dir",
    "SE_CERTIFICATES_ROOT": "certificates_dir",
    "SE_CERTIFICATE_REVOCATION_LISTS_ROOT": "crls_dir",
    "SE_CERTIFICATE_ROOT_CA": "root_ca",
    "SE_IMAGE_HEADER_FILE": "image_header",
    "SE_MEASUREMENT_ENCR_KEY_PRIVATE": "measurement_key_private",
    "SE_MEASUREMENT_ENCR_KEY_PUBLIC": "measurement_key_public",
}
SE_SKIP_VARIABLE = "SE_SKIP_CERTS_VERIFICATION"  # "true" (any case) sets the key true
CCA_CONFIG_VARIABLE = "CCA_CONFIG_FILE"

_VERIFIERS = "attestation_service.verifier_config"  # of a builtin AS (coco_as_builtin)
_VERIFIER_VARIABLES = (
    *(Variable(name, f"{_VERIFIERS}.se.{key}", Wins.FILE) for name, key in SE_VARIABLES.items()),
    Variable(SE_SKIP_VARIABLE, f"{_VERIFIERS}.se.insecure_skip_certs_verification", Wins.FILE),
    Variable(CCA_CONFIG_VARIABLE, f"{_VERIFIERS}.cca", Wins.FILE),
)

KBS_VARIABLES: tuple[Variable, ...] = (
    Variable("POSTGRES_URL", "storage_backend.backends.postgres.url", Wins.ENVIRONMENT),
    Variable("REDIS_URL", "storage_backend.backends.redis.url", Wins.ENVIRONMENT),
    Variable("AWS_REGION", "[[plugins]].region", Wins.FILE),  # resource entries, aws
    Variable("SSL_CERT_FILE", "attestation_service.ca_cert_path", Wins.FILE),
    Variable("KBS_GIT_HASH", "metrics.git_hash", Wins.FILE),
    Variable("KBS_BUILD_DATE", "metrics.build_date", Wins.FILE),
    *_VERIFIER_VARIABLES,
)
# grpc-as and restful-as: the same verifier variables, at the top of their file
AS_VARIABLES: tuple[Variable, ...] = tuple(
    Variable(v.name, v.field.removeprefix("attestation_service."), v.wins)
    for v in _VERIFIER_VARIABLES
)


def kbs_environment(document: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of a KBS config document with :data:`KBS_VARIABLES` applied from ``environ``.
    A part of the document that is not a table is left for validation to report."""
    mapped = copy.deepcopy(dict(document))
    for variable, backend in (("POSTGRES_URL", "postgres"), ("REDIS_URL", "redis")):
        if url := environ.get(variable):
            backends = _table(_table(mapped, "storage_backend"), "backends")
            if (section := _table(backends, backend)) is not None:
                section["url"] = url  # the environment wins, as upstream
    if region := environ.get("AWS_REGION"):
        for plugin in mapped.get("plugins") or []:
            if _is_aws_resource_plugin(plugin, resource_backend_kind):
                _fill(plugin, "region", region)
    for variable, key in (("KBS_GIT_HASH", "git_hash"), ("KBS_BUILD_DATE", "build_date")):
        if value := environ.get(variable):
            _fill(_table(mapped, "metrics"), key, value[:40])
    service = mapped.get("attestation_service")
    kind = as_type_name(service.get("type")) if isinstance(service, dict) else "coco_as_builtin"
    if kind == "coco_as_grpc" and (ca_file := environ.get("SSL_CERT_FILE")):
        _fill(service, "ca_cert_path", ca_file)
    if kind == "coco_as_builtin" and _verifier_variables_set(environ):
        _verifier_environment(_table(mapped, "attestation_service", "coco_as_builtin"), environ)
    return mapped


def as_environment(document: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of an Attestation Service config document with :data:`AS_VARIABLES` applied."""
    mapped = copy.deepcopy(dict(document))
    if _verifier_variables_set(environ):
        _verifier_environment(mapped, environ)
    return mapped


def _verifier_variables_set(environ: Mapping[str, str]) -> bool:
    names = (*SE_VARIABLES, SE_SKIP_VARIABLE, CCA_CONFIG_VARIABLE)
    return any(environ.get(name) for name in names)


def _verifier_environment(holder: dict[str, Any] | None, environ: Mapping[str, str]) -> None:
    """Upstream's SE and CCA variables into ``holder["verifier_config"]``; the file wins."""
    verifiers = _table(holder, "verifier_config")
    if verifiers is None:
        return
    se_values: dict[str, str | bool] = {
        key: environ[name] for name, key in SE_VARIABLES.items() if environ.get(name)
    }
    if environ.get(SE_SKIP_VARIABLE):
        se_values["insecure_skip_certs_verification"] = environ[SE_SKIP_VARIABLE].lower() == "true"
    if se_values:
        se = _table(verifiers, "se")
        for key, value in se_values.items():
            _fill(se, key, value)
    upstream_file = environ.get(CCA_CONFIG_VARIABLE)
    if upstream_file and verifiers.get("cca") is None:
        verifiers["cca"] = _upstream_cca_section(Path(upstream_file))


def _upstream_cca_section(path: Path) -> object:
    """The ``cca-verifier`` table of upstream's CCA config file (read now, at load time);
    the CCA verifier checks its keys as those of a ``cca`` section."""
    what = f"the CCA config file {path} ({CCA_CONFIG_VARIABLE})"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CCA_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}") from None
    if len(data) > MAX_CCA_CONFIG_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_CCA_CONFIG_BYTES} bytes")
    try:
        document = parse_json(data, what=what)
    except BadRequestError as e:
        raise ConfigError(e.detail) from None
    if not isinstance(document, dict) or set(document) != {"cca-verifier"}:
        raise ConfigError(f'{what} must hold one table, {{"cca-verifier": {{...}}}}')
    return document["cca-verifier"]


def _is_aws_resource_plugin(
    plugin: object, kind_of: Callable[[str | None, str | None], str]
) -> bool:
    if not isinstance(plugin, dict) or plugin.get("name") != "resource":
        return False
    backend_type, seed_era_type = plugin.get("storage_backend_type"), plugin.get("type")
    if not all(value is None or isinstance(value, str) for value in (backend_type, seed_era_type)):
        return False
    return kind_of(backend_type, seed_era_type) == "aws"


def _table(holder: object, key: str, as_type: str | None = None) -> dict[str, Any] | None:
    """``holder[key]``, created when absent (with ``type = as_type`` when given); None when
    either is not a table."""
    if not isinstance(holder, dict):
        return None
    if holder.get(key) is None:
        holder[key] = {} if as_type is None else {"type": as_type}
    value = holder[key]
    return value if isinstance(value, dict) else None


def _fill(table: object, key: str, value: object) -> None:
    """``table[key] = value`` unless the file set it: the file wins."""
    if isinstance(table, dict) and table.get(key) is None:
        table[key] = value

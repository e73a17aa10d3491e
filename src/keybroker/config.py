"""The KBS configuration: upstream Trustee's file format, parsed once into frozen models.

Section and key names, defaults and accepted spellings are upstream's, so an operator's
upstream ``kbs-config.toml`` loads unchanged (TOML, JSON or YAML, chosen by the file's suffix).
An unknown key is an error that names the key and the file: a typo in a security setting must
never be silently ignored. The one exception is :data:`STALE_KEYS`, keys that upstream's own
shipped files still carry although upstream no longer reads them: each is logged as a warning
and ignored. Sections under ``verifier_config`` must be ones a verifier reads
(:data:`VERIFIER_SECTIONS`); each verifier checks the keys inside its own section.

This module only parses and checks shapes. Whether a parsed feature is served is decided when
the app is built (``keybroker.kbs.app``), which refuses what this version cannot serve with
``UnsupportedFeatureError``.

Deliberate differences from upstream, each failing closed:

- ``[admin]`` omitted means ``DenyAll`` (upstream: ``InsecureAllowAll``).
- ``[[plugins]]`` omitted means one ``resource`` plugin on the key-value store (upstream: no
  plugins at all, so every resource request answers 404).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    model_validator,
)

from keybroker.errors import BadRequestError, ConfigError
from keybroker.protocol.untrusted_json import parse_json, parse_toml, parse_yaml
from keybroker.storage.secret_registry import SECRET_BACKENDS
from keybroker.storage.versions import DEFAULT_MAX_VERSIONS, MAX_VERSIONS_LIMIT

if TYPE_CHECKING:
    from keybroker.plugins.nebula_ca import NebulaCaConfig
    from keybroker.plugins.provisioner import ProvisionerConfig

log = logging.getLogger("keybroker.config")

DEFAULT_SOCKET = "127.0.0.1:8080"
DEFAULT_PAYLOAD_REQUEST_SIZE_MB = 2
DEFAULT_SESSION_TIMEOUT_MIN = 5
DEFAULT_LEGACY_REPOSITORY_DIR = "/opt/confidential-containers/kbs/repository"
DEFAULT_LOCAL_FS_DIR = "/opt/confidential-containers/storage/local_fs"
DEFAULT_LOCAL_JSON_DIR = "/opt/confidential-containers/storage/local_json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _spelling(aliases: dict[str, str]) -> BeforeValidator:
    """Accept every upstream spelling of an enum value (``LocalFs``, ``local_fs``...)."""

    def normalize(value: object) -> object:
        if isinstance(value, str):
            return aliases.get(value, aliases.get(value.lower(), value))
        return value

    return BeforeValidator(normalize)


class StorageType(StrEnum):
    MEMORY = "Memory"
    LOCAL_JSON = "LocalJson"
    LOCAL_FS = "LocalFs"
    POSTGRES = "Postgres"
    REDIS = "Redis"


_STORAGE_SPELLINGS = {
    "memory": "Memory",
    "localjson": "LocalJson",
    "local_json": "LocalJson",
    "localfs": "LocalFs",
    "local_fs": "LocalFs",
    "postgres": "Postgres",
    "redis": "Redis",
}
StorageTypeField = Annotated[StorageType, _spelling(_STORAGE_SPELLINGS)]


# --- [http_server] ---------------------------------------------------------------------------


class TlsProfile(StrEnum):
    OLD = "old"
    INTERMEDIATE = "intermediate"
    MODERN = "modern"
    CUSTOM = "custom"


class HttpServerConfig(_Model):
    sockets: list[str] = Field(default_factory=lambda: [DEFAULT_SOCKET])
    insecure_http: bool = False
    payload_request_size: int = Field(default=DEFAULT_PAYLOAD_REQUEST_SIZE_MB, ge=1, le=1024)
    worker_count: int | None = Field(default=None, ge=1, le=256)
    private_key: Path | None = None
    certificate: Path | None = None
    tls_profile: TlsProfile = TlsProfile.INTERMEDIATE
    tls_min_version: Literal["1.2", "1.3"] | None = None
    tls_max_version: Literal["1.2", "1.3"] | None = None
    tls_ciphers: str | None = None
    tls_groups: str | None = None

    @property
    def payload_limit_bytes(self) -> int:
        return self.payload_request_size * 1024 * 1024


# --- [attestation_token] ---------------------------------------------------------------------


class AttestationTokenConfig(_Model):
    extra_teekey_paths: list[str] = Field(default_factory=list)
    trusted_certs_paths: list[str] = Field(default_factory=list)
    trusted_jwk_sets: list[str] = Field(default_factory=list)
    insecure_header_jwk: bool = False


# --- [attestation_service] -------------------------------------------------------------------


class TokenSignerConfig(_Model):
    key_path: Path
    cert_path: Path | None = None
    cert_url: str | None = None


# Keys that upstream's own shipped files still carry although upstream no longer reads them:
# "dotted.path" -> why it is ignored. Each is logged as a warning and dropped before validation;
# every other unknown key is refused (see the module docstring).
STALE_KEYS = {
    "attestation_token_broker.type": "the token broker is always EAR",
    "attestation_token_broker.policy_dir": "policies live in the policy store",
    "policy_engine": "the policy engine is always Rego",
    "policy_dir": "policies live in the policy store",
    "storage.type": "upstream's RVPS ignores this earlier form: set storage.storage_type",
    "storage.file_path": "upstream's RVPS ignores this earlier form: set storage.backends",
}

# The sections of `verifier_config` some verifier reads: upstream's names (`*_verifier`) and
# Keybroker's own. A section not named here is refused; each verifier checks its own section.
VERIFIER_SECTIONS = frozenset(
    {
        "dcap",
        "dcap_verifier",
        "snp",
        "snp_verifier",
        "tpm_verifier",
        "nvidia_verifier",
        "nvidia_dpu_verifier",
        "cca",
        "hygon",
        "se",
    }
)


def _without_stale(data: object, prefix: str) -> object:
    """``data`` without the :data:`STALE_KEYS` under ``prefix`` (each logged as a warning)."""
    if not isinstance(data, dict):
        return data
    kept = dict(data)
    for key in list(kept):
        path = f"{prefix}{key}"
        if path in STALE_KEYS:
            del kept[key]
            log.warning("ignoring stale configuration key `%s`: %s", path, STALE_KEYS[path])
    return kept


def _known_verifier_sections(value: dict[str, Any] | None) -> dict[str, Any] | None:
    unknown = sorted(set(value or {}) - VERIFIER_SECTIONS)
    if unknown:
        names = ", ".join(f"`verifier_config.{name}`" for name in unknown)
        raise ValueError(
            f"unknown verifier section(s) {names}: expected one of {sorted(VERIFIER_SECTIONS)}"
        )
    return value


VerifierConfigField = Annotated[dict[str, Any] | None, AfterValidator(_known_verifier_sections)]


class AttestationTokenBrokerConfig(_Model):
    duration_min: int = Field(default=5, ge=1)
    issuer_name: str = "CoCo-Attestation-Service"
    developer_name: str = "https://confidentialcontainers.org"
    build_name: str = "keybroker-attestation-service 0.1.0"
    profile_name: str = "tag:github.com,2024:confidential-containers/Trustee"
    signer: TokenSignerConfig | None = None
    verbose_token: bool = True

    @model_validator(mode="before")
    @classmethod
    def _stale(cls, data: object) -> object:
        return _without_stale(data, "attestation_token_broker.")


class SwidExtractorConfig(_Model):
    """Upstream's ``swid_extractor`` settings: none yet (an empty table)."""


class RvpsExtractorsConfig(_Model):
    swid_extractor: SwidExtractorConfig | None = None


class RvpsBuiltInConfig(_Model):
    type: Literal["BuiltIn"] = "BuiltIn"
    extractors: RvpsExtractorsConfig | None = None
    storage_type: StorageTypeField | None = None


class RvpsGrpcConfig(_Model):
    type: Literal["GrpcRemote"]
    address: str = "127.0.0.1:50003"


class _AttestationServiceBase(_Model):
    timeout: int = Field(default=DEFAULT_SESSION_TIMEOUT_MIN, ge=1, le=24 * 60)


class BuiltinAsConfig(_AttestationServiceBase):
    type: Literal["coco_as_builtin"] = "coco_as_builtin"
    rvps_config: Annotated[RvpsBuiltInConfig | RvpsGrpcConfig, Field(discriminator="type")] = (
        RvpsBuiltInConfig()
    )
    attestation_token_broker: AttestationTokenBrokerConfig = AttestationTokenBrokerConfig()
    # Section names are checked here; each verifier validates the keys of its own section.
    verifier_config: VerifierConfigField = None
    storage_type: StorageTypeField | None = None

    @model_validator(mode="before")
    @classmethod
    def _stale(cls, data: object) -> object:
        return _without_stale(data, "")


class GrpcAsConfig(_AttestationServiceBase):
    type: Literal["coco_as_grpc"]
    as_addr: str = "http://127.0.0.1:50004"
    pool_size: int = Field(default=100, ge=1)
    # Keybroker: seconds one call to the remote AS may take before the KBS answers 503.
    request_timeout: float = Field(default=30.0, gt=0, le=600)
    # Keybroker: the remote AS's RVPS, so /kbs/v0/reference-value reaches it.
    rvps_addr: str | None = None
    # Keybroker: the CA bundle an https:// as_addr is checked against (else the system's);
    # env SSL_CERT_FILE fills it when unset (keybroker.config_env).
    ca_cert_path: Path | None = None


class IntelTaConfig(_AttestationServiceBase):
    """Intel Trust Authority (``keybroker.attestation.intel_ta``): upstream's keys; ``timeout``
    stays the session lifetime in minutes, as for every attestation service."""

    type: Literal["intel_ta"]
    base_url: str
    api_key: str = Field(repr=False)
    # ITA's token-signing keys: a JWK set file (path or file://) or https:// URL
    certs_file: str
    allow_unmatched_policy: bool | None = None
    policy_ids: list[str] = Field(default_factory=list, max_length=64)
    # Keybroker: seconds one ITA appraisal may take before the KBS answers 503.
    request_timeout: float = Field(default=30.0, gt=0, le=600)


class NoAsConfig(_AttestationServiceBase):
    """A resource-only (passport) KBS: ``/auth`` and ``/attest`` answer 404."""

    type: Literal["none"]


_AS_SPELLINGS = {
    "cocoasbuiltin": "coco_as_builtin",
    "coco_as_builtin": "coco_as_builtin",
    "cocoasgrpc": "coco_as_grpc",
    "coco_as_grpc": "coco_as_grpc",
    "intelta": "intel_ta",
    "intel_ta": "intel_ta",
    "none": "none",
}


def as_type_name(value: object) -> str | None:
    """The ``[attestation_service] type`` that ``value`` spells (None: not a string)."""
    if not isinstance(value, str):
        return None
    return _AS_SPELLINGS.get(value.lower(), value)


def _normalize_as(value: object) -> object:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        spelled = value["type"].lower()
        return {**value, "type": _AS_SPELLINGS.get(spelled, value["type"])}
    return value


AttestationServiceConfig = Annotated[
    BuiltinAsConfig | GrpcAsConfig | IntelTaConfig | NoAsConfig,
    Field(discriminator="type"),
    BeforeValidator(_normalize_as),
]


# --- [admin] ---------------------------------------------------------------------------------


class IdentityProvider(_Model):
    issuer: str | None = None
    audience: str | None = None
    public_key_uri: str | None = None
    jwk_set_uri: str | None = None


class BearerJwtConfig(_Model):
    identity_providers: list[IdentityProvider] = Field(default_factory=list)


class AuthenticationConfig(_Model):
    bearer_jwt: BearerJwtConfig


class AclRule(_Model):
    role: str
    allowed_endpoints: str


class RegexAclConfig(_Model):
    acls: list[AclRule] = Field(default_factory=list)


class AuthorizationConfig(_Model):
    regex_acl: RegexAclConfig


class AdminInsecureAllowAll(_Model):
    authorization_mode: Literal["InsecureAllowAll"]


class AdminDenyAll(_Model):
    authorization_mode: Literal["DenyAll"] = "DenyAll"


class AdminAuthenticated(_Model):
    authorization_mode: Literal["AuthenticatedAuthorization"]
    authentication: AuthenticationConfig
    authorization: AuthorizationConfig


AdminConfig = Annotated[
    AdminInsecureAllowAll | AdminDenyAll | AdminAuthenticated,
    Field(discriminator="authorization_mode"),
]


# --- [storage_backend] -----------------------------------------------------------------------


class LocalFsBackendConfig(_Model):
    dir_path: Path = Path(DEFAULT_LOCAL_FS_DIR)


class LocalJsonBackendConfig(_Model):
    file_dir_path: Path = Path(DEFAULT_LOCAL_JSON_DIR)


class PostgresBackendConfig(_Model):
    """Upstream's fields, or Keybroker's ``url`` (a libpq URL) which replaces them all; env
    ``POSTGRES_URL`` sets ``url`` and wins over the file (``keybroker.config_env``).
    ``timeout`` is Keybroker's: how long a request waits for the database before it is
    answered 503."""

    url: str | None = Field(default=None, repr=False)
    db: str = "postgres"
    username: str = "postgres"
    password: str | None = Field(default=None, repr=False)
    host: str = "localhost"
    port: int = Field(default=5432, ge=1, le=65535)
    timeout: float = Field(default=5.0, gt=0, le=300)


class RedisBackendConfig(_Model):
    """Upstream's ``url``; env ``REDIS_URL`` sets it and wins over the file
    (``keybroker.config_env``). ``timeout`` is Keybroker's."""

    url: str = Field(default="redis://127.0.0.1:6379", repr=False)
    timeout: float = Field(default=5.0, gt=0, le=300)


class StorageBackends(_Model):
    local_fs: LocalFsBackendConfig | None = None
    local_json: LocalJsonBackendConfig | None = None
    postgres: PostgresBackendConfig | None = None
    redis: RedisBackendConfig | None = None


class StorageBackendConfig(_Model):
    storage_type: StorageTypeField = StorageType.MEMORY
    # Where RCAR sessions live when not with everything else (e.g. Redis beside PostgreSQL).
    # Also accepted at the top level of the file, as earlier Keybroker releases wrote it.
    session_storage_type: StorageTypeField | None = None
    backends: StorageBackends = StorageBackends()


# --- [[plugins]] -----------------------------------------------------------------------------


_SECRET_BACKEND_SPELLINGS = {
    "kvstorage": "kvstorage",
    "kv_storage": "kvstorage",
    "pkcs11": "pkcs11",
    "vault": "vault",
    "vault_kv": "vault",
    "aliyun": "aliyun",
    "aliyun_kms": "aliyun",
    "aliyunkms": "aliyun",
    "aws": "aws",
    "gcp": "gcp",
}


def resource_backend_kind(storage_backend_type: str | None, seed_era_type: str | None) -> str:
    """``kvstorage``, ``legacy_local_fs`` or a key of :data:`SECRET_BACKENDS`, from the
    resource plugin's ``storage_backend_type`` or its seed-era ``type`` (any upstream spelling)."""
    if seed_era_type is not None:
        if seed_era_type.lower() in ("localfs", "local_fs"):
            return "legacy_local_fs"
        return _SECRET_BACKEND_SPELLINGS.get(seed_era_type.lower(), seed_era_type.lower())
    kind = (storage_backend_type or "kvstorage").lower()
    return _SECRET_BACKEND_SPELLINGS.get(kind, kind)


class ResourcePluginConfig(_Model):
    """The ``resource`` plugin, in the forms operators have.

    - current upstream: ``storage_backend_type = "kvstorage"`` (the shared key-value store), or
      another secret backend (``pkcs11``, ``vault``, ``aliyun``, ``aws``, ``gcp``) whose
      settings sit beside it in the same table and are checked by that backend's own model;
    - seed-era upstream: ``type = "LocalFs"`` with ``dir_path`` (files at
      ``<dir_path>/<repo>/<type>/<tag>``), or ``type = "Aliyun"`` / ``"Vault"`` / ...
    """

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    name: Literal["resource"]
    storage_backend_type: str | None = None
    type: str | None = None
    dir_path: Path | None = None
    # Keybroker only: how many versions of a resource the kvstorage and pkcs11 backends keep.
    max_versions: int | None = Field(default=None, ge=1, le=MAX_VERSIONS_LIMIT)

    def backend_kind(self) -> str:
        """``kvstorage``, ``legacy_local_fs`` or a key of :data:`SECRET_BACKENDS`."""
        if self.type is not None and self.storage_backend_type is not None:
            raise ValueError("set either `type` (seed-era form) or `storage_backend_type`")
        if self.type is None and self.dir_path is not None:
            raise ValueError('`dir_path` belongs to the seed-era form: add `type = "LocalFs"`')
        return resource_backend_kind(self.storage_backend_type, self.type)

    def backend_settings(self) -> BaseModel | None:
        """The validated settings of a secret backend from :data:`SECRET_BACKENDS`."""
        entry = SECRET_BACKENDS.get(self.backend_kind())
        return None if entry is None else entry.parse(self.model_extra or {})

    @model_validator(mode="after")
    def _known_settings(self) -> ResourcePluginConfig:
        kind = self.backend_kind()
        if self.max_versions is not None and kind not in ("kvstorage", "pkcs11"):
            raise ValueError(
                "`max_versions` applies to the kvstorage and pkcs11 resource backends, "
                f"not to {kind}"
            )
        if kind in SECRET_BACKENDS:
            self.backend_settings()  # unknown or missing keys are named here, at load time
        elif self.model_extra:
            unknown = ", ".join(f"`{key}`" for key in sorted(self.model_extra))
            raise ValueError(f"unknown key(s) {unknown} for the {kind} resource backend")
        return self

    def kv_max_versions(self) -> int:
        return self.max_versions or DEFAULT_MAX_VERSIONS

    def legacy_dir(self) -> Path:
        return self.dir_path or Path(DEFAULT_LEGACY_REPOSITORY_DIR)


class Pkcs11PluginConfig(BaseModel):
    """Upstream's ``pkcs11`` plugin: resources under ``/kbs/v0/pkcs11/<repo>/<type>/<tag>``
    kept as secret keys in an HSM; ``module``, ``slot_index`` and ``pin`` as upstream."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Literal["pkcs11"]

    def backend_settings(self) -> BaseModel:
        settings: BaseModel = SECRET_BACKENDS["pkcs11"].parse(self.model_extra or {})
        return settings

    @model_validator(mode="after")
    def _known_settings(self) -> Pkcs11PluginConfig:
        self.backend_settings()
        return self


class SamplePluginConfig(_Model):
    name: Literal["sample"]
    item: str


class ExternalBackendConfig(_Model):
    """One gRPC plugin process behind upstream's ``external`` plugin, answering
    ``/kbs/v0/external/<name>/...``. ``http://`` is plaintext, ``https://`` is TLS against
    ``ca_cert_path`` (upstream). ``client_cert_path`` + ``client_key_path`` add a client
    certificate (mTLS, a Keybroker extension)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    endpoint: str = Field(pattern=r"^https?://[^/\s]+/?$")
    timeout_ms: int | None = Field(default=None, gt=0, le=600_000)
    tls_mode: Literal["tls", "insecure"] | None = None  # upstream's older, explicit form
    ca_cert_path: Path | None = None
    client_cert_path: Path | None = None
    client_key_path: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExternalBackendConfig:
        tls = self.endpoint.startswith("https://")
        if self.tls_mode is not None and (self.tls_mode == "tls") != tls:
            raise ValueError(f"backend {self.name}: tls_mode {self.tls_mode} vs {self.endpoint}")
        if tls and self.ca_cert_path is None:
            raise ValueError(f"backend {self.name}: an https:// endpoint needs `ca_cert_path`")
        if (self.client_cert_path is None) != (self.client_key_path is None):
            raise ValueError(f"backend {self.name}: set both client_cert_path and client_key_path")
        if not tls and (self.ca_cert_path or self.client_cert_path):
            raise ValueError(f"backend {self.name}: TLS files need an https:// endpoint")
        return self


class ExternalPluginConfig(_Model):
    """Upstream's ``external`` plugin: a gateway to gRPC plugin processes (``KbsPlugin``)."""

    name: Literal["external"]
    backends: list[ExternalBackendConfig] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _unique(self) -> ExternalPluginConfig:
        names = [backend.name for backend in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("duplicate backend name in the external plugin")
        return self


class NebulaCaPluginConfig(BaseModel):
    """Upstream's ``nebula-ca`` plugin; its keys are checked by
    :class:`keybroker.plugins.nebula_ca.NebulaCaConfig` at load time."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Literal["nebula-ca", "nebula_ca"]

    def settings(self) -> NebulaCaConfig:
        from keybroker.plugins.nebula_ca import NebulaCaConfig  # noqa: PLC0415 - lazy, as above

        return NebulaCaConfig.model_validate(self.model_extra or {})

    @model_validator(mode="after")
    def _known_settings(self) -> NebulaCaPluginConfig:
        self.settings()
        return self


class ProvisionerPluginConfig(BaseModel):
    """Upstream's ``provisioner`` plugin; its keys are checked by
    :class:`keybroker.plugins.provisioner.ProvisionerConfig` at load time."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Literal["provisioner"]

    def settings(self) -> ProvisionerConfig:
        from keybroker.plugins.provisioner import ProvisionerConfig  # noqa: PLC0415 - lazy

        return ProvisionerConfig.model_validate(self.model_extra or {})

    @model_validator(mode="after")
    def _known_settings(self) -> ProvisionerPluginConfig:
        self.settings()
        return self


PluginConfig = Annotated[
    ResourcePluginConfig
    | Pkcs11PluginConfig
    | SamplePluginConfig
    | ExternalPluginConfig
    | NebulaCaPluginConfig
    | ProvisionerPluginConfig,
    Field(discriminator="name"),
]


# --- [audit] (Keybroker) ---------------------------------------------------------------------


class AuditConfig(_Model):
    """Keybroker's audit log (no upstream counterpart)."""

    sink: Literal["file", "stdout"] = "file"
    path: Path = Path("kbs-audit.log")
    fsync: Literal["always", "never"] = "always"
    # HMAC-SHA256 key file (``kbs audit keygen``, mode 0600), like the token signer's key_path.
    # Without it the chain is plain SHA-256: it detects corruption, not tampering.
    key_path: Path | None = None
    # a keyed chain gets a checkpoint every this many records or seconds, whichever comes first
    checkpoint_records: int = Field(default=1000, ge=2, le=1_000_000)
    checkpoint_seconds: float = Field(default=300.0, gt=0, le=86_400)


# --- [rate_limit] (Keybroker) ----------------------------------------------------------------


class RateLimitConfig(_Model):
    """Keybroker's limits on the unauthenticated handshake endpoints (no upstream counterpart;
    see ``keybroker.kbs.limits``). The defaults are generous: a guest makes two requests per
    handshake, so they throttle only a client that floods."""

    enabled: bool = True
    # Token bucket per client address, over /auth and /attest together.
    requests_per_second: float = Field(default=20.0, gt=0, le=1_000_000)
    burst: int = Field(default=2000, ge=1, le=10_000_000)
    # IPv6 clients are counted per prefix: one host usually holds a whole /64.
    ipv6_prefix_length: int = Field(default=64, ge=16, le=128)
    # Direct peers whose X-Forwarded-For is believed (addresses or networks). Empty: none.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256)
    # Live sessions that have not attested; past this, the oldest is shed.
    max_unattested_sessions: int = Field(default=10_000, ge=1, le=10_000_000)


class PolicyConfig(_Model):
    """Bounds of every policy compilation and evaluation (no upstream counterpart): each runs
    in one of ``workers`` worker processes, killed past ``timeout_seconds`` or when its
    resident memory passes ``memory_mib``."""

    timeout_seconds: float = Field(default=2.0, gt=0, le=300)
    memory_mib: int = Field(default=512, ge=64, le=65536)
    workers: int = Field(default=2, ge=1, le=64)


# --- [storage_cache] (Keybroker) ------------------------------------------------------------


class StorageCacheConfig(_Model):
    """The in-process caches of a guest release's store reads (no upstream counterpart;
    ``keybroker.storage.read_cache``, docs/storage.md): version bytes by their immutable key,
    and resource records and resource policies for one generation stamp of the store. Used
    only when the shared store is LocalFs, LocalJson, PostgreSQL or Redis, never for the
    in-process Memory store nor for external secret backends. Each of the two caches holds
    at most ``max_entries`` entries and ``max_bytes`` bytes; a value larger than
    ``max_value_bytes`` is never cached. A record or policy read more than
    ``max_age_seconds`` ago is read again, which bounds staleness when a change was stored
    but its stamp could not be written (the admin was told, with a 503)."""

    enabled: bool = True
    max_entries: int = Field(default=4096, ge=1, le=1_000_000)
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    max_value_bytes: int = Field(default=256 * 1024, ge=1, le=16 * 1024 * 1024)
    max_age_seconds: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _value_fits(self) -> StorageCacheConfig:
        if self.max_value_bytes > self.max_bytes:
            raise ValueError(
                f"[storage_cache] max_value_bytes ({self.max_value_bytes}) is larger than "
                f"max_bytes ({self.max_bytes})"
            )
        return self


# --- [metrics] (Keybroker) ------------------------------------------------------------------


class MetricsConfig(_Model):
    """Who may read ``GET /metrics`` (upstream serves it to anyone; no upstream key).

    - ``loopback``: clients connecting from 127.0.0.0/8 or ::1 only (the default). Behind a
      reverse proxy on the same host every client looks local: use ``admin`` there.
    - ``admin``: a request the ``[admin]`` rules admit for the path ``/kbs/v0/metrics``.
    - ``off``: ``/metrics`` answers 404.
    """

    access: Literal["loopback", "admin", "off"] = "loopback"
    # the ``kbs_build_info`` labels (else "unknown"); env KBS_GIT_HASH and KBS_BUILD_DATE fill
    # them when unset, as an image build sets them (keybroker.config_env)
    git_hash: str | None = Field(default=None, max_length=40)
    build_date: str | None = Field(default=None, max_length=40)


# --- [console] (Keybroker) ------------------------------------------------------------------


class ConsoleConfig(_Model):
    """Keybroker's admin web console at ``/kbs/v0/console/`` (no upstream counterpart): static
    pages that call the admin API with the operator's admin token (``keybroker.kbs.console``).
    Off by default: then ``/kbs/v0/console/`` answers 404."""

    enabled: bool = False


# --- the whole file --------------------------------------------------------------------------


class AttestationServiceFileConfig(_Model):
    """The config file of a standalone Attestation Service (``grpc-as -c FILE``)."""

    work_dir: Path | None = None
    attestation_token_broker: AttestationTokenBrokerConfig = AttestationTokenBrokerConfig()
    rvps_config: Annotated[RvpsBuiltInConfig | RvpsGrpcConfig, Field(discriminator="type")] = (
        RvpsBuiltInConfig()
    )
    verifier_config: VerifierConfigField = None
    storage_backend: StorageBackendConfig = StorageBackendConfig()
    policy: PolicyConfig = PolicyConfig()
    # Keybroker only, as in the KBS config: start although others may read the signer's key
    insecure_key_permissions: bool = False

    @model_validator(mode="before")
    @classmethod
    def _stale(cls, data: object) -> object:
        return _without_stale(data, "")


def load_as_config(
    path: Path | None, *, environ: Mapping[str, str] | None = None
) -> AttestationServiceFileConfig:
    """The file at ``path`` (None: every default) with the environment mapped in
    (``keybroker.config_env``; ``environ`` defaults to the process environment)."""
    from keybroker.config_env import as_environment  # noqa: PLC0415 - it imports this module

    document = {} if path is None else read_document(path)
    document = as_environment(document, os.environ if environ is None else environ)
    try:
        return AttestationServiceFileConfig.model_validate(document)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration in {path}: {_describe(e)}") from None


class RvpsFileConfig(_Model):
    """The config file of a standalone RVPS (``rvps -c FILE``), upstream's
    ``{"storage": {...}, "extractors": {"swid_extractor": {}}}``. Every extractor (``sample``,
    ``swid``) is always available, as upstream's; ``extractors`` only carries their settings.
    Earlier Keybroker releases spelled ``storage`` as ``storage_backend``: still accepted."""

    storage: StorageBackendConfig = StorageBackendConfig()
    extractors: RvpsExtractorsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        if "storage_backend" in data:
            if "storage" in data:
                raise ValueError("set `storage` (upstream's name) or `storage_backend`, not both")
            data = {**data, "storage": data["storage_backend"]}
            del data["storage_backend"]
        if "storage" in data:
            data = {**data, "storage": _without_stale(data["storage"], "storage.")}
        return data


def load_rvps_config(path: Path | None) -> RvpsFileConfig:
    if path is None:
        return RvpsFileConfig()
    document = read_document(path)
    try:
        return RvpsFileConfig.model_validate(document)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration in {path}: {_describe(e)}") from None


def _default_plugins() -> list[PluginConfig]:
    return [ResourcePluginConfig(name="resource")]


class KbsConfig(_Model):
    http_server: HttpServerConfig = HttpServerConfig()
    attestation_token: AttestationTokenConfig = AttestationTokenConfig()
    attestation_service: AttestationServiceConfig = BuiltinAsConfig()
    admin: AdminConfig = AdminDenyAll()
    storage_backend: StorageBackendConfig = StorageBackendConfig()
    session_storage_type: StorageTypeField | None = None
    # Keybroker's: start even if a private key file is readable by other users (logged)
    insecure_key_permissions: bool = False
    audit: AuditConfig = AuditConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    policy: PolicyConfig = PolicyConfig()
    storage_cache: StorageCacheConfig = StorageCacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    console: ConsoleConfig = ConsoleConfig()
    plugins: list[PluginConfig] = Field(default_factory=_default_plugins)

    @property
    def session_timeout_min(self) -> int:
        return self.attestation_service.timeout

    @property
    def session_storage(self) -> StorageType:
        """Where sessions live: ``[storage_backend] session_storage_type``, the top-level
        spelling, or else the shared ``storage_type``."""
        return (
            self.storage_backend.session_storage_type
            or self.session_storage_type
            or self.storage_backend.storage_type
        )

    @model_validator(mode="after")
    def _one_session_storage(self) -> KbsConfig:
        inner, outer = self.storage_backend.session_storage_type, self.session_storage_type
        if inner is not None and outer is not None and inner != outer:
            raise ValueError(
                "session_storage_type is set twice with different values "
                f"([storage_backend] {inner.value}, top level {outer.value}): keep one"
            )
        return self


_LEGACY_ADMIN_KEYS = ("type", "auth_public_key", "insecure_api")


def parse_config(
    document: dict[str, object],
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
) -> KbsConfig:
    """Validate a parsed document, with the environment mapped in first
    (``keybroker.config_env``; ``environ`` defaults to the process environment, ``{}`` maps
    nothing); errors name the offending key and the source."""
    from keybroker.config_env import kbs_environment  # noqa: PLC0415 - it imports this module

    admin = document.get("admin")
    if isinstance(admin, dict) and any(key in admin for key in _LEGACY_ADMIN_KEYS):
        raise ConfigError(
            f"{source}: the legacy [admin] form (type / auth_public_key / insecure_api) is no "
            'longer accepted. Migrate to authorization_mode = "AuthenticatedAuthorization" '
            "with [admin.authentication.bearer_jwt] identity_providers = "
            '[{ public_key_uri = "<your admin public key PEM>" }] and '
            '[admin.authorization.regex_acl] acls = [{ role = "...", '
            'allowed_endpoints = "^/kbs/v0/.+$" }], or to "DenyAll" / "InsecureAllowAll"'
        )
    document = kbs_environment(document, os.environ if environ is None else environ)
    try:
        return KbsConfig.model_validate(document)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration in {source}: {_describe(e)}") from None


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> KbsConfig:
    """Read a TOML, JSON (``.json``) or YAML (``.yaml``, ``.yml``) config file; ``environ``
    as for :func:`parse_config`."""
    return parse_config(read_document(path), source=str(path), environ=environ)


def read_document(path: Path) -> dict[str, object]:
    """The table of a config file: JSON for ``.json``, YAML for ``.yaml``/``.yml``, else TOML
    (as upstream's loader, which picks the format by suffix). Parsed with the depth bound of
    ``keybroker.protocol.untrusted_json``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    what = f"configuration file {path}"
    try:
        if suffix == ".json":
            document = parse_json(text, what=what)
        elif suffix in (".yaml", ".yml"):
            document = parse_yaml(text, what=what)
        else:
            document = parse_toml(text, what=what)
    except BadRequestError as e:
        raise ConfigError(e.detail) from None
    if document is None:  # an empty YAML file: every default
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"configuration file {path} must hold a table (mapping) at the top")
    return document


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"] if not _is_union_tag(part))
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key `{where}`")
        elif item["type"] == "missing":
            problems.append(f"missing required key `{where}`")
        elif item["type"] == "union_tag_not_found":
            tag = item.get("ctx", {}).get("discriminator", "type").strip("'")
            problems.append(f"`{where}` needs its `{tag}` key (it says which kind this is)")
        elif item["type"] in ("union_tag_invalid", "literal_error"):
            problems.append(f"`{where}`: {item['msg']}")
        else:
            problems.append(f"`{where}`: {item['msg']}")
    more = len(error.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _is_union_tag(part: object) -> bool:
    # pydantic inserts the discriminator value into error locations; it is not a key name.
    return isinstance(part, str) and (
        part in _AS_SPELLINGS.values()
        or part
        in (
            "InsecureAllowAll",
            "DenyAll",
            "AuthenticatedAuthorization",
            "BuiltIn",
            "GrpcRemote",
            "resource",
            "sample",
        )
    )

"""Builds the KBS's services from its configuration, once, at start-up.

This is where a configuration that parses but cannot be served is refused, with
``UnsupportedFeatureError`` naming the setting, before the server accepts a single request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keybroker.attestation.policy import NAMESPACE as AS_POLICY_NAMESPACE
from keybroker.attestation.policy import AttestationPolicies
from keybroker.attestation.service import AttestationBackend, BuiltinAttestationService
from keybroker.attestation.signer import TokenSigner
from keybroker.config import (
    BuiltinAsConfig,
    ExternalPluginConfig,
    GrpcAsConfig,
    IdentityProvider,
    IntelTaConfig,
    KbsConfig,
    NebulaCaPluginConfig,
    NoAsConfig,
    Pkcs11PluginConfig,
    ProvisionerPluginConfig,
    ResourcePluginConfig,
    RvpsGrpcConfig,
    SamplePluginConfig,
    StorageType,
)
from keybroker.errors import ConfigError, ServiceUnavailableError, UnsupportedFeatureError
from keybroker.kbs.admin import AdminGuard
from keybroker.kbs.admin_auth import IdentityProviderKeys
from keybroker.kbs.audit import AuditLog, audit_key, audit_log
from keybroker.kbs.audit_read import AuditReader
from keybroker.kbs.limits import (
    RATE_LIMIT_NAMESPACE,
    UNATTESTED_NAMESPACE,
    GuestLimits,
    UnattestedSessions,
    build_limits,
)
from keybroker.kbs.metrics import KbsMetrics
from keybroker.kbs.rcar import Handshake
from keybroker.kbs.resource_policy import KBS_NAMESPACE, ResourcePolicy
from keybroker.kbs.sessions import SESSION_NAMESPACE, SessionStore
from keybroker.kbs.tokens import TokenVerifier
from keybroker.plugins.base import Plugin
from keybroker.plugins.nebula_ca import NebulaCaPlugin
from keybroker.plugins.pkcs11 import Pkcs11Plugin
from keybroker.plugins.provisioner import STORAGE_NAMESPACE as PROVISIONER_NAMESPACE
from keybroker.plugins.provisioner import ProvisionerPlugin
from keybroker.plugins.resource import ResourcePlugin
from keybroker.plugins.sample import SamplePlugin
from keybroker.policy.workers import PolicyLimits, PolicyWorkers
from keybroker.rvps.store import NAMESPACE as RVPS_NAMESPACE
from keybroker.rvps.store import ReferenceValues, ReferenceValueStore, remote_reference_values
from keybroker.storage.provider import StorageProvider
from keybroker.storage.read_cache import STAMP_NAMESPACE, CacheBounds, ReadCache
from keybroker.storage.registry import STAMPED_CACHE, storage_provider
from keybroker.storage.secret_registry import SECRET_BACKENDS, BuildContext
from keybroker.storage.secrets import DirectoryTreeSecretBackend, KvSecretBackend, SecretBackend

log = logging.getLogger(__name__)

RESOURCE_NAMESPACE = "repository"


@dataclass
class KbsServices:
    admin: AdminGuard
    handshake: Handshake | None
    sessions: SessionStore | None
    resource_policy: ResourcePolicy
    plugins: dict[str, Plugin]
    tokens: TokenVerifier
    payload_limit: int
    https: bool
    clock: Callable[[], float]
    providers: list[StorageProvider]
    audit: AuditLog
    policy_workers: PolicyWorkers
    metrics: KbsMetrics
    attestation: AttestationBackend | None = None
    limits: GuestLimits | None = None
    audit_reader: AuditReader | None = None  # None: the stdout sink cannot be read back
    # the release path's read caches (storage/read_cache.py); disabled unless configured
    read_cache: ReadCache = field(default_factory=ReadCache.disabled)

    async def start(self) -> None:
        try:
            self.audit.ensure_writable()
        except ServiceUnavailableError as e:  # serve, but refuse releases until it recovers
            log.error("%s", e.detail)
        try:
            await self.resource_policy.initialize()
            if self.attestation is not None:
                await self.attestation.start()
        except ServiceUnavailableError as e:  # a replica may start before its database
            log.error("%s; serving anyway: default policies are installed on first use", e.detail)

    async def stop(self) -> None:
        if self.limits is not None:
            self.limits.close()
        self.policy_workers.close()
        for provider in self.providers:
            await provider.close()


def build_services(
    config: KbsConfig,
    *,
    clock: Callable[[], float] = time.time,
    storage: StorageProvider | None = None,
    memory_dir: Path | None = None,
    metrics_dir: Path | None = None,
) -> KbsServices:
    """``memory_dir``: where "memory" stores live when several worker processes must share
    them (a private directory the server creates and removes); None means process memory.
    ``metrics_dir``: likewise for the workers' metrics (``keybroker.kbs.metrics``)."""
    _refuse_unserved(config)
    metrics = KbsMetrics(
        multiprocess=metrics_dir,
        git_hash=config.metrics.git_hash,
        build_date=config.metrics.build_date,
    )
    storage = storage or _provider(config.storage_backend.storage_type, config, clock, memory_dir)
    session_type = config.session_storage
    session_storage = (
        storage
        if session_type == config.storage_backend.storage_type
        else _provider(session_type, config, clock, memory_dir)
    )
    providers = [storage] if session_storage is storage else [storage, session_storage]
    admin = AdminGuard(config.admin, clock=clock)
    limits, unattested = _limits(config, session_storage, clock, memory_dir)
    workers = PolicyWorkers(PolicyLimits(**config.policy.model_dump()))
    # An injected clock (tests) drives the cache's max age too; the real one is monotonic, so a
    # wall-clock step cannot stretch how long an entry is trusted.
    read_cache = _read_cache(config, storage, time.monotonic if clock is time.time else clock)
    trusted_keys = []
    handshake: Handshake | None = None
    sessions: SessionStore | None = None
    attestation: AttestationBackend | None = None
    as_config = config.attestation_service
    if isinstance(as_config, BuiltinAsConfig):
        signer = TokenSigner.from_config(as_config.attestation_token_broker.signer)
        trusted_keys.append(signer.public_key)
        as_storage = _override(as_config.storage_type, storage, config, clock, memory_dir)
        rvps_type = getattr(as_config.rvps_config, "storage_type", None)
        rvps_storage = _override(rvps_type, as_storage, config, clock, memory_dir)
        providers += [p for p in (as_storage, rvps_storage) if p not in providers]
        # An attestation's policy text and reference values are read through the read cache
        # too, when they live in the KBS's own store (not an override of another type)
        as_reads = read_cache if as_storage is storage else ReadCache.disabled()
        rvps_reads = read_cache if rvps_storage is storage else ReadCache.disabled()
        reference_values: ReferenceValues = (
            remote_reference_values(as_config.rvps_config.address)
            if isinstance(as_config.rvps_config, RvpsGrpcConfig)
            else ReferenceValueStore(
                rvps_reads.stamped(rvps_storage.get(RVPS_NAMESPACE)),
                clock=clock,
                after_change=rvps_reads.changed,
            )
        )
        attestation = BuiltinAttestationService(
            as_config,
            signer,
            AttestationPolicies(
                as_reads.stamped(as_storage.get(AS_POLICY_NAMESPACE)),
                reference_values,
                workers,
                after_change=as_reads.changed,
            ),
            reference_values,
            clock=clock,
        )
        sessions = SessionStore(
            session_storage.get(SESSION_NAMESPACE),
            timeout_min=as_config.timeout,
            clock=clock,
            unattested=unattested,
        )
        handshake = Handshake(attestation, sessions, metrics, read_cache=read_cache)
    elif isinstance(as_config, GrpcAsConfig):
        attestation = _grpc_backend(as_config)
        sessions = SessionStore(
            session_storage.get(SESSION_NAMESPACE),
            timeout_min=as_config.timeout,
            clock=clock,
            unattested=unattested,
        )
        handshake = Handshake(attestation, sessions, metrics)
    elif isinstance(as_config, IntelTaConfig):
        attestation = _intel_ta_backend(as_config, config, clock)
        sessions = SessionStore(
            session_storage.get(SESSION_NAMESPACE),
            timeout_min=as_config.timeout,
            clock=clock,
            unattested=unattested,
        )
        handshake = Handshake(attestation, sessions, metrics)
    elif isinstance(as_config, NoAsConfig):
        log.info("no attestation service: /auth and /attest answer 404 (resource-only KBS)")
    tokens = TokenVerifier.from_config(config.attestation_token, trusted_keys, clock=clock)
    if not tokens.has_trust_anchors:
        raise ConfigError(
            "this KBS could not accept any attestation token: tokens from a remote or absent "
            "attestation service are trusted through [attestation_token] trusted_certs_paths "
            "or trusted_jwk_sets (insecure_header_jwk = true for tests only)"
        )
    audit, audit_reader = _audit(config, clock)
    return KbsServices(
        admin=admin,
        handshake=handshake,
        sessions=sessions,
        resource_policy=ResourcePolicy(
            read_cache.stamped(storage.get(KBS_NAMESPACE)),
            workers,
            after_change=read_cache.changed,
        ),
        plugins=_plugins(config, storage, metrics, read_cache),
        tokens=tokens,
        payload_limit=config.http_server.payload_limit_bytes,
        https=not config.http_server.insecure_http,
        clock=clock,
        providers=providers,
        audit=audit,
        audit_reader=audit_reader,
        policy_workers=workers,
        attestation=attestation,
        limits=limits,
        metrics=metrics,
        read_cache=read_cache,
    )


def _read_cache(
    config: KbsConfig, storage: StorageProvider, clock: Callable[[], float]
) -> ReadCache:
    """The read caches, over the shared store, when it is one every write reaches through a
    KBS (``STAMPED_CACHE``) and ``[storage_cache] enabled``; else a disabled one."""
    settings = config.storage_cache
    if not (settings.enabled and STAMPED_CACHE[config.storage_backend.storage_type]):
        return ReadCache.disabled()
    bounds = CacheBounds(
        max_entries=settings.max_entries,
        max_bytes=settings.max_bytes,
        max_value_bytes=settings.max_value_bytes,
        max_age=settings.max_age_seconds,
    )
    log.info(
        "storage cache on: resource records and policies per generation stamp (max age %g s), "
        "version bytes by key; at most %d entries and %d bytes each",
        bounds.max_age,
        bounds.max_entries,
        bounds.max_bytes,
    )
    return ReadCache(storage.get(STAMP_NAMESPACE), bounds, clock=clock)


def _limits(
    config: KbsConfig,
    session_storage: StorageProvider,
    clock: Callable[[], float],
    memory_dir: Path | None,
) -> tuple[GuestLimits, UnattestedSessions]:
    """In Redis, shared by workers and replicas, when sessions are there; else the rate in
    the workers' shared directory when there is one (see ``kbs.limits``)."""
    in_redis = config.session_storage is StorageType.REDIS
    return build_limits(
        config.rate_limit,
        clock=clock,
        session_lifetime=config.session_timeout_min * 60.0,
        buckets_store=session_storage.get(RATE_LIMIT_NAMESPACE) if in_redis else None,
        index_store=session_storage.get(UNATTESTED_NAMESPACE) if in_redis else None,
        workers_dir=memory_dir,
    )


def _audit(config: KbsConfig, clock: Callable[[], float]) -> tuple[AuditLog, AuditReader | None]:
    """The audit log, and its reader when it is a file the KBS can read back."""
    key = audit_key(config.audit)
    reader = AuditReader(config.audit.path, key) if config.audit.sink == "file" else None
    return audit_log(config.audit, clock=clock, key=key), reader


def _refuse_unserved(config: KbsConfig) -> None:
    as_config = config.attestation_service
    if not isinstance(as_config, BuiltinAsConfig | GrpcAsConfig | IntelTaConfig | NoAsConfig):
        raise UnsupportedFeatureError(f"[attestation_service] type = {as_config.type}")


def _grpc_backend(config: GrpcAsConfig) -> AttestationBackend:
    try:
        from keybroker.attestation.grpc_client import GrpcAttestationService  # noqa: PLC0415
    except ImportError:  # an optional extra: keep the builtin-only install small
        raise ConfigError(
            "type = coco_as_grpc needs the grpc extra: pip install 'keybroker[grpc]'"
        ) from None
    return GrpcAttestationService(config)


def _external_plugin(config: ExternalPluginConfig) -> Plugin:
    try:
        from keybroker.plugins.external import ExternalPlugin  # noqa: PLC0415
    except ImportError:  # an optional extra, as for coco_as_grpc
        raise ConfigError(
            "the external plugin needs the grpc extra: pip install 'keybroker[grpc]'"
        ) from None
    return ExternalPlugin(config)


def _intel_ta_backend(
    as_config: IntelTaConfig, config: KbsConfig, clock: Callable[[], float]
) -> AttestationBackend:
    from keybroker.attestation.intel_ta import IntelTrustAuthority  # noqa: PLC0415

    # ITA's tokens are checked at /attest with ITA's keys alone: never a key the token carries.
    ita_keys = IdentityProviderKeys(IdentityProvider(jwk_set_uri=as_config.certs_file))
    if as_config.certs_file not in config.attestation_token.trusted_jwk_sets:
        # ITA signs every customer's tokens with the same keys, so accepting them for resources
        # is the operator's explicit choice ([attestation_token], as upstream).
        log.warning(
            "type = intel_ta: certs_file is not in [attestation_token] trusted_jwk_sets, so "
            "resource requests accept ITA tokens only if another entry trusts ITA's keys"
        )
    return IntelTrustAuthority(as_config, TokenVerifier([], jwk_sets=[ita_keys], clock=clock))


def _override(
    kind: StorageType | None,
    default: StorageProvider,
    config: KbsConfig,
    clock: Callable[[], float],
    memory_dir: Path | None,
) -> StorageProvider:
    """A component's own ``storage_type`` setting, else the shared provider."""
    if kind is None or kind == config.storage_backend.storage_type:
        return default
    return _provider(kind, config, clock, memory_dir)


def _provider(
    kind: StorageType, config: KbsConfig, clock: Callable[[], float], memory_dir: Path | None
) -> StorageProvider:
    return storage_provider(kind, config.storage_backend.backends, clock, memory_dir)


def _resource_backend(
    entry: ResourcePluginConfig, storage: StorageProvider, read_cache: ReadCache
) -> SecretBackend:
    try:
        kind = entry.backend_kind()
    except ValueError as e:
        raise ConfigError(f"[[plugins]] resource: {e}") from None
    if kind == "kvstorage":
        # Records for the release's stamp, bytes by their immutable key; the mirror (which an
        # operator may edit, in upstream's layout) is never cached. External backends never are.
        return KvSecretBackend(
            storage.get(RESOURCE_NAMESPACE),
            meta=read_cache.stamped(storage.get(f"{RESOURCE_NAMESPACE}_meta")),
            versions=read_cache.immutable(storage.get(f"{RESOURCE_NAMESPACE}_versions")),
            max_versions=entry.kv_max_versions(),
            after_change=read_cache.changed,
        )
    if kind == "legacy_local_fs":
        return DirectoryTreeSecretBackend(entry.legacy_dir())
    settings = entry.backend_settings()
    if kind in SECRET_BACKENDS and settings is not None:
        context = BuildContext(storage.get, entry.max_versions)
        return SECRET_BACKENDS[kind].build(settings, context)
    raise UnsupportedFeatureError(f"resource plugin storage backend {kind}")


def _plugins(
    config: KbsConfig, storage: StorageProvider, metrics: KbsMetrics, read_cache: ReadCache
) -> dict[str, Plugin]:
    plugins: dict[str, Plugin] = {}
    for entry in config.plugins:
        if isinstance(entry, ResourcePluginConfig):
            backend = _resource_backend(entry, storage, read_cache)
            plugins["resource"] = ResourcePlugin(backend, metrics.resource)
        elif isinstance(entry, Pkcs11PluginConfig):
            context = BuildContext(storage.get)
            plugins["pkcs11"] = Pkcs11Plugin(
                SECRET_BACKENDS["pkcs11"].build(entry.backend_settings(), context)
            )
        elif isinstance(entry, SamplePluginConfig):
            plugins["sample"] = SamplePlugin(entry.item)
        elif isinstance(entry, ExternalPluginConfig):
            plugins["external"] = _external_plugin(entry)
        elif isinstance(entry, NebulaCaPluginConfig):
            plugins["nebula-ca"] = NebulaCaPlugin(entry.settings())
        elif isinstance(entry, ProvisionerPluginConfig):
            plugins["provisioner"] = ProvisionerPlugin(
                entry.settings(), storage.get(PROVISIONER_NAMESPACE)
            )
    return plugins

"""Serving the KBS app with uvicorn: sockets, worker processes, and the shared "memory" store.

Workers are processes. A "memory" store in one worker is invisible to the others, so an RCAR
handshake whose ``/auth`` and ``/attest`` land on different workers would fail at random. With
``worker_count > 1`` every store configured as memory therefore lives in a private directory
(mode 0700) that the server creates, shares with its workers and removes at exit: still
ephemeral, now shared. Which stores are memory stores is decided in one place only
(``services.build_services``, from ``KbsConfig``): the workers are always given the directory.

The workers' configuration (which may hold a database password or a PKCS#11 PIN) reaches them
as a 0600 file in that directory; only its path travels in the environment, which any process
of the same user can read in ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.types import ASGIApp
from uvicorn.supervisors import Multiprocess

from keybroker.config import (
    BuiltinAsConfig,
    GrpcAsConfig,
    HttpServerConfig,
    IntelTaConfig,
    KbsConfig,
    NoAsConfig,
    ResourcePluginConfig,
    TokenSignerConfig,
    parse_config,
)
from keybroker.errors import ConfigError
from keybroker.kbs.app import create_app
from keybroker.kbs.http_limits import BoundedHttpToolsProtocol
from keybroker.kbs.key_permissions import check_private_key_permissions
from keybroker.kbs.metrics import MULTIPROC_ENV, forget_worker, multiprocess_dir
from keybroker.kbs.tls import server_context
from keybroker.storage.secrets import DEFAULT_REPOSITORY_DIR

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_LEVEL_ENV = "KEYBROKER_LOG_LEVEL"
_CONFIG_ENV = "KEYBROKER_WORKER_CONFIG_FILE"
_MEMORY_DIR_ENV = "KEYBROKER_WORKER_MEMORY_DIR"
INSTANCE_ENV = "KBS_INSTANCE_ID"
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def instance_id() -> str:
    """This server's name in ``/healthz``: ``KBS_INSTANCE_ID`` when set (a pod name, a name a
    test chose), else random. It tells a client which server answered, never a secret."""
    chosen = os.environ.get(INSTANCE_ENV)
    if chosen is None:
        return secrets.token_hex(8)
    if not _INSTANCE.fullmatch(chosen):
        raise ConfigError(
            f"{INSTANCE_ENV} must be 1 to 64 letters, digits, '.', '_' or '-', not {chosen[:80]!r}"
        )
    return chosen


def parse_socket(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[http_server] sockets: {text!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"[http_server] sockets: {host!r} is not an IP address") from None
    return host, int(port)


def bind(text: str) -> socket.socket:
    host, port = parse_socket(text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {text}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def configure_logging(level: str = "info") -> None:
    """One format for the server and its workers: time, level, logger, message."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


def startup_summary(config: KbsConfig, scheme: str) -> str:
    """What this server is about to serve, in one line an operator can check at a glance."""
    http = config.http_server
    listen = ", ".join(f"{scheme}://{s}" for s in http.sockets)
    service = config.attestation_service
    if isinstance(service, BuiltinAsConfig):
        attestation = "builtin CoCo AS (in this process)"
    elif isinstance(service, GrpcAsConfig):
        attestation = f"CoCo AS over gRPC at {service.as_addr}"
    elif isinstance(service, IntelTaConfig):
        attestation = f"Intel Trust Authority at {service.base_url}"
    elif isinstance(service, NoAsConfig):
        attestation = "none (resource-only: /auth and /attest answer 404)"
    else:  # pragma: no cover - refused by services.build_services before serving
        attestation = service.type
    trust = config.attestation_token
    tokens = (
        f"{len(trust.trusted_certs_paths)} certificate file(s), "
        f"{len(trust.trusted_jwk_sets)} JWK set(s)"
        + (", this server's own signer" if isinstance(service, BuiltinAsConfig) else "")
    )
    resources = _resource_summary(config)
    audit = config.audit
    sink = "stdout" if audit.sink == "stdout" else str(audit.path)
    keyed = "keyed" if audit.key_path is not None else "unkeyed"
    return (
        f"serving {listen} with {http.worker_count or 1} worker(s); attestation: {attestation}; "
        f"resources: {resources}; "
        f"sessions: {config.session_storage}; admin: {config.admin.authorization_mode}; "
        f"tokens trusted: {tokens}; audit: {sink} ({keyed}, fsync {audit.fsync}); "
        f"/metrics: {config.metrics.access}; "
        f"console: {'/kbs/v0/console/' if config.console.enabled else 'off'}"
    )


def _resource_summary(config: KbsConfig) -> str:
    """Where the ``resource`` plugin keeps its secrets: the key-value store's type, or the
    secret backend it names; ``none`` without a resource plugin."""
    for plugin in config.plugins:
        if isinstance(plugin, ResourcePluginConfig):
            kind = plugin.backend_kind()
            if kind == "kvstorage":
                return str(config.storage_backend.storage_type)
            if kind == "legacy_local_fs":
                return f"LocalFs directory {plugin.dir_path or DEFAULT_REPOSITORY_DIR}"
            return kind
    return "none (no resource plugin)"


def serve(config: KbsConfig, *, log_level: str = "info", access_log: bool = False) -> None:
    """Run the KBS until interrupted. Raises ConfigError before serving if it cannot start.
    ``log_level`` is passed on to worker processes; ``access_log`` logs every request (method,
    path, status) through uvicorn's access logger."""
    http = config.http_server
    scheme = "http" if http.insecure_http else "https"
    check_private_key_permissions(config)  # before a key is read or a socket bound
    if http.insecure_http:
        log.warning(
            "insecure_http = true: secrets cross the network only JWE-encrypted, but "
            "sessions and admin tokens travel in clear; use TLS in production"
        )
    else:
        server_context(http)  # refuse a bad TLS setup before binding anything
    workers = http.worker_count or 1
    instance = instance_id()
    sockets = [bind(text) for text in http.sockets]
    log.info("Keybroker KBS (instance %s) %s", instance, startup_summary(config, scheme))
    if workers == 1:
        app = create_app(config, instance_id=instance)
        uvicorn.Server(uvicorn_config(app, workers, http, access_log)).run(sockets=sockets)
        return
    with worker_environment(config, instance=instance, log_level=log_level) as metrics_dir:
        uv_config = uvicorn_config("keybroker.kbs.server:worker_app", workers, http, access_log)
        if metrics_dir is None:
            Multiprocess(uv_config, sockets=sockets).run()
        else:
            _MetricsMultiprocess(uv_config, sockets=sockets, metrics_dir=metrics_dir).run()


@contextmanager
def worker_environment(
    config: KbsConfig, *, instance: str, log_level: str
) -> Iterator[Path | None]:
    """What worker processes started from :func:`worker_app` need, for as long as they run:
    the private runtime directory (their configuration, shared memory stores, a shared
    ephemeral signing key) and the environment naming it, inherited by every worker spawned
    inside the block. Yields the workers' shared metrics directory (None with metrics off).
    The directory is removed on exit. ``serve`` uses it for uvicorn's workers; the benchmark's
    granian trial (``bench/kbsbench/granian_server.py``), for granian's."""
    os.environ[_LOG_LEVEL_ENV] = log_level
    runtime_dir = _private_runtime_dir()
    try:
        config = _shared_signer(config, runtime_dir)
        os.environ[_CONFIG_ENV] = str(_write_private(runtime_dir / "worker-config.json", config))
        os.environ[INSTANCE_ENV] = instance  # every worker answers with the server's name
        log.info(
            "worker_count > 1: memory stores, if any, are shared by the workers in %s", runtime_dir
        )
        os.environ[_MEMORY_DIR_ENV] = str(runtime_dir / "memory")
        if config.metrics.access == "off":
            yield None
            return
        metrics_dir = runtime_dir / "metrics"
        metrics_dir.mkdir(mode=0o700)
        # read by prometheus-client when a worker imports it: every worker counts into files
        # here and a scrape on any of them sums them all (keybroker.kbs.metrics)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        yield metrics_dir
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


class _MetricsMultiprocess(Multiprocess):
    """uvicorn's supervisor, which also tells the metrics when a worker is gone, so its live
    gauges (``kbs_http_active_connections``) leave the sum with it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path):
        super().__init__(config, sockets)
        self._metrics_dir = metrics_dir

    def keep_subprocess_alive(self) -> None:
        with self._forgetting_replaced():
            super().keep_subprocess_alive()

    def restart_all(self) -> None:
        with self._forgetting_replaced():
            super().restart_all()

    @contextmanager
    def _forgetting_replaced(self) -> Iterator[None]:
        before = {p.pid for p in self.processes}
        try:
            yield
        finally:
            gone = before - {p.pid for p in self.processes}
            for pid in gone:
                if pid is not None:
                    forget_worker(pid, self._metrics_dir)


def worker_app() -> Starlette:
    """The app factory each worker process calls (uvicorn ``factory=True``)."""
    configure_logging(os.environ.get(_LOG_LEVEL_ENV, "info"))  # a spawned process starts bare
    path = Path(os.environ[_CONFIG_ENV])
    # the server mapped its environment into this config already (keybroker.config_env)
    config = parse_config(json.loads(path.read_bytes()), source="worker configuration", environ={})
    memory_dir = os.environ.get(_MEMORY_DIR_ENV)
    return create_app(
        config,
        memory_dir=Path(memory_dir) if memory_dir else None,
        instance_id=os.environ[INSTANCE_ENV],
        metrics_dir=multiprocess_dir(),
    )


def _write_private(path: Path, config: KbsConfig) -> Path:
    """``config`` as JSON in a new 0600 file at ``path`` (inside the 0700 runtime directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(config.model_dump_json())
    return path


def _private_runtime_dir() -> Path:
    """A 0700 directory shared with the workers, on tmpfs when available: what is kept there
    (memory stores, an ephemeral signing key) stays in memory and dies with the server."""
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp directory (0700) inside it
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="keybroker-", dir=base))


def _shared_signer(config: KbsConfig, runtime_dir: Path) -> KbsConfig:
    """Workers must sign with one key, or a token from one would not verify on another."""
    service = config.attestation_service
    if not isinstance(service, BuiltinAsConfig) or service.attestation_token_broker.signer:
        return config
    key_path = runtime_dir / "ephemeral-token-signer.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    log.info("no token signer configured: the workers share one ephemeral signing key")
    broker = service.attestation_token_broker.model_copy(
        update={"signer": TokenSignerConfig(key_path=key_path)}
    )
    return config.model_copy(
        update={
            "attestation_service": service.model_copy(update={"attestation_token_broker": broker})
        }
    )


WORKER_HEALTHCHECK_SECONDS = 30


def _tls_factory(http: HttpServerConfig, _config: object, _default: object) -> ssl.SSLContext:
    return server_context(http)


def uvicorn_config(
    app: ASGIApp | str, workers: int, http: HttpServerConfig, access_log: bool = False
) -> uvicorn.Config:
    """How ``serve`` runs uvicorn: ``app`` itself, or with several workers the factory it
    names. The benchmark's bare-HTTP ceiling (``bench/kbsbench/ceiling.py``) uses it too, so
    it measures the stack the KBS runs on."""
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        workers=workers,
        log_config=None,
        access_log=access_log,
        server_header=False,
        proxy_headers=False,
        # httptools, with a bounded request head and a deadline for it (kbs/http_limits.py)
        http=BoundedHttpToolsProtocol,
        # uvicorn replaces a worker that does not answer its supervisor's ping within this
        # many seconds (default 5). A worker still importing on a loaded node is not hung: a
        # short limit kills it mid-start, over and over. A hung worker is still replaced.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
        ssl_context_factory=None if http.insecure_http else partial(_tls_factory, http),
    )

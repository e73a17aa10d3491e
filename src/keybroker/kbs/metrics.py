"""Prometheus metrics of the KBS: upstream's names, types, buckets and labels (``GET /metrics``).

Upstream (trustee ``kbs/src/prometheus/mod.rs``) defines the metrics; this module defines the
same ones, with ``prometheus-client``, in one object (:class:`KbsMetrics`) that ``create_app``
builds and the services share: no module-level registry, so two apps in one process (tests)
never count into each other.

With several worker processes (``worker_count > 1``) each worker counts into its own files in
the directory named by ``PROMETHEUS_MULTIPROC_DIR`` (``server.serve`` points it inside its
private runtime directory), and a scrape on any worker sums all of them: the totals are the
server's, whichever worker answers. Counters of a worker that died stay in the sum; its live
gauges are dropped by the supervisor (``server._MetricsMultiprocess``).

What never becomes a label value (bounded cardinality, no secrets): request paths, queries,
tokens, cookies and bodies. ``resource_path`` (upstream's label on the resource counters)
names a resource only once the operation on it succeeded, so it names stored resources, which
the admin controls; a failed one counts under :data:`UNKNOWN_RESOURCE`; and past
:data:`MAX_RESOURCE_LABELS` distinct paths in one process the rest count under
:data:`OTHER_RESOURCES`. ``tee_type`` comes from the closed TEE enumeration, ``plugin_name``
from the configuration.

Differences from upstream, on purpose: response sizes go to ``kbs_http_response_size_bytes``
(upstream records them in the request-size histogram, a bug); the plugin metrics count every
plugin's requests, not only external gRPC plugins (Keybroker has none of those).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keybroker.protocol.resource_path import ResourcePath

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# upstream's buckets, exactly
REQUEST_DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.5, 1.0)
SIZE_BUCKETS = tuple(32.0 * 4.0**i for i in range(5))  # exponential_buckets(32, 4, 5)
PLUGIN_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)

MAX_RESOURCE_LABELS = 1024
UNKNOWN_RESOURCE = "unknown"
OTHER_RESOURCES = "other"


def multiprocess_dir() -> Path | None:
    """The shared metrics directory of this server's workers, if it runs several."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def forget_worker(pid: int, directory: Path) -> None:
    """A worker died: drop its live gauges (its counters stay in the totals)."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class KbsMetrics:
    """Every KBS metric. Methods are cheap and never raise into a request."""

    def __init__(
        self,
        *,
        multiprocess: Path | None = None,
        git_hash: str | None = None,
        build_date: str | None = None,
    ) -> None:
        """``git_hash`` and ``build_date``: the ``kbs_build_info`` labels (``[metrics]``,
        which env KBS_GIT_HASH and KBS_BUILD_DATE fill); None is "unknown"."""
        # Upstream's exposition has no ``*_created`` series; prometheus-client's switch for
        # them is process-wide, and no other code in this process wants them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._multiprocess = multiprocess
        # In multiprocess mode values live in files and the scrape reads them all; registering
        # the metrics themselves too would count this worker twice.
        own = None if multiprocess is not None else CollectorRegistry(auto_describe=True)
        self._registry = own
        self._resource_labels: set[str] = set()

        self.http_requests = Counter(
            "kbs_http_requests_total", "Total HTTP requests count", registry=own
        )
        self.http_duration = Histogram(
            "kbs_http_request_duration_seconds",
            "Distribution of request handling duration",
            buckets=REQUEST_DURATION_BUCKETS,
            registry=own,
        )
        self.http_request_size = Histogram(
            "kbs_http_request_size_bytes",
            "Distribution of request body sizes",
            buckets=SIZE_BUCKETS,
            registry=own,
        )
        self.http_response_size = Histogram(
            "kbs_http_response_size_bytes",
            "Distribution of response body sizes",
            buckets=SIZE_BUCKETS,
            registry=own,
        )
        self.active_connections = Gauge(
            "kbs_http_active_connections",
            "Count of HTTP connections being processed at the moment",
            multiprocess_mode="livesum",
            registry=own,
        )
        self.auth_requests = Counter(
            "kbs_auth_requests_total", "Total count of auth requests", registry=own
        )
        self.auth_successes = Counter(
            "kbs_auth_successes_total",
            "Total count of successfully authenticated requests",
            registry=own,
        )
        self.auth_errors = Counter(
            "kbs_auth_errors_total", "Total count of errors during auth processing", registry=own
        )
        self.attestation_requests = Counter(
            "kbs_attestation_requests_total", "Total count of attestation requests", registry=own
        )
        self.attestation_successes = Counter(
            "kbs_attestation_successes_total",
            "Total count of attestation successes",
            ["tee_type"],
            registry=own,
        )
        self.attestation_failures = Counter(
            "kbs_attestation_failures_total",
            "Total count of attestation failures",
            ["tee_type"],
            registry=own,
        )
        self.attestation_errors = Counter(
            "kbs_attestation_errors_total",
            "Total count of errors during attestation processing",
            registry=own,
        )
        self.resource_reads = Counter(
            "kbs_resource_reads_total", "KBS resource read count", ["resource_path"], registry=own
        )
        self.resource_writes = Counter(
            "kbs_resource_writes_total", "KBS resource write count", ["resource_path"], registry=own
        )
        self.resource_deletes = Counter(
            "kbs_resource_deletes_total",
            "KBS resource delete count",
            ["resource_path"],
            registry=own,
        )
        self.policy_evaluations = Counter(
            "kbs_policy_evaluations_total", "Total count of KBS policy evaluations", registry=own
        )
        self.policy_approvals = Counter(
            "kbs_policy_approvals_total",
            "Total count of requests approved by KBS policy",
            registry=own,
        )
        self.policy_violations = Counter(
            "kbs_policy_violations_total",
            "Total count of requests denied by KBS policy",
            registry=own,
        )
        self.policy_errors = Counter(
            "kbs_policy_errors_total", "Total count of errors during KBS evaluation", registry=own
        )
        self.plugin_requests = Counter(
            "kbs_plugin_requests_total",
            "Total requests handled by plugins",
            ["plugin_name"],
            registry=own,
        )
        self.plugin_duration = Histogram(
            "kbs_plugin_request_duration_seconds",
            "Plugin request latency in seconds",
            ["plugin_name"],
            buckets=PLUGIN_DURATION_BUCKETS,
            registry=own,
        )
        self.plugin_errors = Counter(
            "kbs_plugin_errors_total",
            "Total errors from plugins",
            ["plugin_name"],
            registry=own,
        )
        build = _build_labels(git_hash, build_date)
        self.build_info = Gauge(
            "kbs_build_info",
            "KBS binary build info",
            list(build),
            multiprocess_mode="max",
            registry=own,
        )
        self.build_info.labels(**build).set(1)

    # --- scraping ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text: this process's metrics, or every worker's summed."""
        if self._registry is not None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._multiprocess))  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    # --- recording --------------------------------------------------------------------------

    def resource(self, operation: str, path: ResourcePath | None) -> None:
        """Count one resource operation (``read``, ``write`` or ``delete``); ``path`` is None
        when it failed (see the module's docstring)."""
        counter = {
            "read": self.resource_reads,
            "write": self.resource_writes,
            "delete": self.resource_deletes,
        }.get(operation)
        if counter is None:
            return
        counter.labels(resource_path=self._resource_label(path)).inc()

    def _resource_label(self, path: ResourcePath | None) -> str:
        if path is None:
            return UNKNOWN_RESOURCE
        label = str(path)
        if label in self._resource_labels:
            return label
        if len(self._resource_labels) >= MAX_RESOURCE_LABELS:
            return OTHER_RESOURCES
        self._resource_labels.add(label)
        return label

    @contextmanager
    def plugin_call(self, name: str) -> Iterator[None]:
        """Count and time one plugin request; an exception counts as a plugin error."""
        self.plugin_requests.labels(plugin_name=name).inc()
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.plugin_errors.labels(plugin_name=name).inc()
            raise
        finally:
            self.plugin_duration.labels(plugin_name=name).observe(time.perf_counter() - start)


def _build_labels(git_hash: str | None, build_date: str | None) -> dict[str, str]:
    try:
        package_version = version("keybroker")
    except PackageNotFoundError:
        package_version = "unknown"
    return {
        "version": package_version,
        "git_hash": (git_hash or "unknown")[:40],
        "build_date": (build_date or "unknown")[:40],
    }


class HttpMetricsMiddleware:
    """Upstream's HTTP metrics, for requests under ``/kbs`` only (as upstream: scrapes and
    health checks would distort them). No label: nothing of the request reaches the metrics
    but its body's size and its duration."""

    def __init__(self, app: ASGIApp, metrics: KbsMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/kbs"):
            await self._app(scope, receive, send)
            return
        metrics = self._metrics
        start = time.perf_counter()
        metrics.active_connections.inc()
        metrics.http_requests.inc()
        declared = _content_length(scope)
        if declared is not None:
            metrics.http_request_size.observe(declared)
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self._app(scope, receive, counting_send)
        finally:
            metrics.http_duration.observe(time.perf_counter() - start)
            metrics.http_response_size.observe(sent)
            metrics.active_connections.dec()


def _content_length(scope: Scope) -> int | None:
    """The declared body size; no header counts as 0 and an unreadable one is not observed
    (upstream does the same)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            text = value.decode("latin-1")
            return int(text) if text.isdigit() and len(text) < 20 else None
    return 0

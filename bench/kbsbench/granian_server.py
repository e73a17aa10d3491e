"""The granian trial (issue 23): the Keybroker app, or the ceiling app, served by granian.

python -m kbsbench.granian_server -c KBS_CONFIG [--log-level LEVEL] [--access-log]
python -m kbsbench.granian_server --ceiling --port PORT --workers N

For the benchmark only: ``kbs`` serves with uvicorn (``keybroker.kbs.server.serve``) and this
module does not change that. It serves the same app from the same config file: the config is
loaded as ``kbs -c`` loads it, the worker environment is the one ``serve`` builds for uvicorn's
workers (``keybroker.kbs.server.worker_environment``: a private runtime directory with the
workers' configuration, the shared memory stores, a shared ephemeral signer when none is
configured, the shared metrics directory), and every granian worker builds its app with the
same factory as a uvicorn worker (``keybroker.kbs.server:worker_app``), under granian's
``asgi`` interface, which runs the app's lifespan startup and shutdown in each worker.

granian is started as the bench compares it: HTTP/1 only, uvloop, the backlog ``kbs`` binds
with, access log off unless asked. What it does not do as ``kbs`` does, and what it refuses
(fail closed) rather than serve differently from the config:

- it always runs its workers as processes, so with ``worker_count = 1`` the memory stores live
  in the shared directory too (``kbs`` keeps them in its one process);
- one socket only (``[http_server] sockets`` with more is refused), bound with SO_REUSEPORT:
  a port already in use is refused by a plain bind first, as ``kbs`` would refuse it;
- every reply carries ``server: granian`` (``kbs`` sends no ``server`` header);
- TLS is rustls, given only a certificate, a key and a minimum version (no maximum, no suites,
  no groups): ``tls_profile = "old"`` (CBC suites), ``tls_max_version = "1.2"`` and TLS 1.2
  names in ``tls_ciphers`` are refused; TLS 1.3 suites and ``tls_groups`` fall back to the
  library's defaults with a warning, as they do in ``kbs`` (Python's ``ssl`` cannot set them);
  ``intermediate`` is served as TLS 1.2 and 1.3 with rustls's suites, which are the profile's
  without its two DHE suites (rustls has no finite-field DHE);
- no client certificates (``kbs`` asks for none either);
- no worker health check (uvicorn's supervisor replaces a worker that stops answering its
  ping); a worker that exits stops the server with status 1 (granian's respawn is left off, so
  the metrics of a replaced worker are never left in the sum, as ``kbs`` ensures for uvicorn);
- granian's own HTTP/1 limits, left at their defaults: request headers beyond its 408 KiB
  buffer or more than 100 of them are answered 431, and headers must arrive within 30 s, a
  deadline that also closes an idle keep-alive connection (uvicorn with httptools, as ``kbs``
  runs it: no bound on header size or count, no deadline for headers, idle keep-alive closed
  after 5 s). The body limit (``payload_request_size``) is the app's, the same under both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from granian.constants import HTTPModes, Interfaces, Loops, SSLProtocols
from granian.server import MPServer

from keybroker.config import HttpServerConfig, TlsProfile, load_config
from keybroker.errors import ConfigError, KeybrokerError
from keybroker.kbs.key_permissions import check_private_key_permissions
from keybroker.kbs.server import (
    INSTANCE_ENV,
    LOG_LEVELS,
    bind,
    configure_logging,
    instance_id,
    parse_socket,
    worker_environment,
)

log = logging.getLogger("kbsbench.granian_server")

KBS_FACTORY = "keybroker.kbs.server:worker_app"
CEILING_FACTORY = "kbsbench.ceiling:make_app"
BACKLOG = 2048  # as keybroker.kbs.server.bind


def tls_options(http: HttpServerConfig) -> dict[str, Any]:
    """granian's TLS arguments for ``[http_server]``; ConfigError for what granian cannot
    apply as the config asks (see the module docstring). Plain HTTP: no arguments.

    What ``kbs`` itself cannot apply (TLS 1.3 suites, key-exchange groups: Python's ``ssl``)
    is a logged fallback to the TLS library's defaults there, and the same here."""
    if http.insecure_http:
        return {}
    if http.private_key is None or http.certificate is None:
        raise ConfigError("HTTPS needs [http_server] private_key and certificate")
    if http.tls_profile is TlsProfile.OLD:
        raise ConfigError('granian (rustls) has no CBC suites: tls_profile = "old" is refused')
    if http.tls_max_version == "1.2":
        raise ConfigError("granian cannot cap TLS at 1.2: tls_max_version = 1.2 is refused")
    names = [n for n in (http.tls_ciphers or "").split(":") if n]
    tls12 = [n for n in names if not n.startswith("TLS_")]
    if tls12:
        raise ConfigError(f"granian cannot choose TLS 1.2 suites: tls_ciphers {tls12} refused")
    if names or http.tls_groups:
        log.warning(
            "tls_ciphers (TLS 1.3 suites) and tls_groups are not applied: rustls's defaults "
            "are used, as kbs falls back to OpenSSL's"
        )
    minimum = http.tls_min_version or ("1.3" if http.tls_profile is TlsProfile.MODERN else "1.2")
    return {
        "ssl_cert": http.certificate,
        "ssl_key": http.private_key,
        "ssl_protocol_min": SSLProtocols.tls13 if minimum == "1.3" else SSLProtocols.tls12,
    }


def granian(
    target: str, http: HttpServerConfig, *, workers: int, access_log: bool = False
) -> MPServer:
    """A granian server for the app factory ``target`` on ``http``'s one socket. Its workers
    are processes (``MPServer``), as uvicorn's are (granian's ``MTServer`` runs them as threads,
    for free-threaded Python)."""
    if len(http.sockets) != 1:
        raise ConfigError("the granian trial serves one socket ([http_server] sockets)")
    host, port = parse_socket(http.sockets[0])
    # granian binds with SO_REUSEPORT: beside another granian on the port it would start and
    # share the connections with it, and beside any other server it panics. A plain bind
    # first refuses both with kbs's own error (the probe is closed before granian binds).
    bind(http.sockets[0]).close()
    return MPServer(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,  # with lifespan, as uvicorn runs it
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        backlog=BACKLOG,
        factory=True,
        log_access=access_log,
        **tls_options(http),
    )


def serve_kbs(config_path: Path, *, log_level: str, access_log: bool) -> None:
    """The KBS from ``config_path`` under granian, until interrupted."""
    config = load_config(config_path)
    http = config.http_server
    check_private_key_permissions(config)
    server = granian(KBS_FACTORY, http, workers=http.worker_count or 1, access_log=access_log)
    with worker_environment(config, instance=instance_id(), log_level=log_level):
        log.info("serving %s under granian with %d worker(s)", config_path, server.workers)
        server.serve()


def serve_ceiling(port: int, workers: int) -> None:
    """The bare-HTTP ceiling app (``kbsbench.ceiling``) under granian; its workers read
    ``KBS_INSTANCE_ID`` from the environment they inherit."""
    http = HttpServerConfig(sockets=[f"127.0.0.1:{port}"], insecure_http=True, worker_count=workers)
    granian(CEILING_FACTORY, http, workers=workers).serve()


def main() -> int:
    parser = argparse.ArgumentParser(description="the granian trial server (benchmark only)")
    parser.add_argument("-c", "--config-file", type=Path, help="a KBS config file")
    parser.add_argument("--ceiling", action="store_true", help="serve kbsbench.ceiling instead")
    parser.add_argument("--port", type=int, help="the ceiling's port")
    parser.add_argument("--workers", type=int, default=1, help="the ceiling's workers")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    configure_logging(args.log_level)
    try:
        if args.ceiling:
            if args.port is None:
                parser.error("--ceiling needs --port")
            serve_ceiling(args.port, args.workers)
        elif args.config_file is not None:
            serve_kbs(args.config_file, log_level=args.log_level, access_log=args.access_log)
        else:
            parser.error(f"give -c KBS_CONFIG or --ceiling (and {INSTANCE_ENV} to name it)")
    except KeybrokerError as e:
        print(f"kbsbench.granian_server: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve a stand-in (an ASGI app) on loopback for a test."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp


class ServedApp:
    """An ASGI app served by uvicorn in a background thread on a loopback port (HTTPS when given
    a certificate); ``stop()`` makes it unreachable, ``start()`` serves it again on the same
    port."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        """``client_ca``: require client certificates issued by this CA (mutual TLS)."""
        self.app = app
        self._tls = (certfile, keyfile)
        self._client_ca = client_ca
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._tls[0] else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        certfile, keyfile = self._tls
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            lifespan="off",  # stand-ins keep their state in the test, not in a lifespan
            timeout_graceful_shutdown=1,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            ssl_ca_certs=str(self._client_ca) if self._client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if self._client_ca else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise AssertionError("the stand-in did not start")
            time.sleep(0.01)
        if not self.port:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            # Do not wait for clients to close their keep-alive connections: a client whose
            # event loop has ended never will, and uvicorn would wait its whole grace period.
            self._server.force_exit = True
            self._thread.join(10)
            self._server = None

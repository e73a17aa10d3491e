"""nginx (Debian's ``nginx-light``) as a round-robin proxy in front of KBS replicas, started
in a directory of its own and stopped afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ports import free_port
from system_tools import require

# what a log line says: the method, the path, the status and which replica answered
UPSTREAM_LOG_FORMAT = "$request_method $uri $status $upstream_addr"


@contextmanager
def running_nginx(
    workdir: Path, upstream_ports: list[int], *, access_log: bool = False, prefix: str = ""
) -> Iterator[str]:
    """The URL of nginx balancing over ``upstream_ports`` on loopback, with keep-alive
    connections to them. ``access_log``: write ``workdir/access.log`` in
    :data:`UPSTREAM_LOG_FORMAT`. ``prefix`` (``/tenant``, say): the KBS is served under it,
    ``<prefix>/x`` proxied to ``/x``, and the URL yielded ends with it."""
    binary = str(require("nginx", "nginx-light", default="/usr/sbin/nginx"))
    port = free_port()
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstream_ports)
    logging = (
        f"log_format upstream '{UPSTREAM_LOG_FORMAT}';\n  access_log {workdir}/access.log upstream;"
        if access_log
        else "access_log off;"
    )
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  {logging}
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  upstream kbs {{
{servers}
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port};
    location {prefix}/ {{
      proxy_pass http://kbs{"/" if prefix else ""};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""
    )
    user = ["-g", "user root;"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log"), *user],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}{prefix}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(workdir / 'error.log').read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)

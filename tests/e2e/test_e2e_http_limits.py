"""A real ``kbs`` process refuses a request head past ``keybroker.kbs.http_limits``'s bound
with 431, and goes on serving (the bounds themselves: tests/integration/test_http_limits.py)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from kbs_process import running_kbs
from keybroker.kbs import http_limits
from ports import free_port

pytestmark = pytest.mark.e2e


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may close while a big head is sent
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_a_kbs_refuses_an_oversized_request_head_with_431_and_serves_on(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n'
    )
    with running_kbs(["-c", str(config)], tmp_path, url):
        big = b"cookie: " + b"a" * (4 * http_limits.MAX_HEAD_BYTES) + b"\r\n"
        reply = _exchange(
            port, b"GET /kbs/v0/resource/a/b/c HTTP/1.1\r\nhost: x\r\n" + big + b"\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 431 ")
        honest = _exchange(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert honest.startswith(b"HTTP/1.1 200")

"""The request-head bounds every kbs worker serves with (``keybroker.kbs.http_limits``),
against a real uvicorn server on a real socket: an oversized head or too many headers is 431
and a closed connection, a head that does not arrive in time closes the connection, and an
honest request on the same stack is served."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from keybroker.config import HttpServerConfig
from keybroker.kbs import http_limits
from keybroker.kbs.server import uvicorn_config
from ports import free_port


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _server() -> Iterator[int]:
    port = free_port()
    http = HttpServerConfig.model_validate(
        {"insecure_http": True, "sockets": [f"127.0.0.1:{port}"]}
    )
    config = uvicorn_config(_app, 1, http)  # the stack kbs serves with
    config.host, config.port, config.lifespan = "127.0.0.1", port, "off"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes; the server must close within 30 s."""
    reply, closed = _talk(port, data)
    assert closed, "the server kept the connection open"
    return reply


def _talk(port: int, data: bytes) -> tuple[bytes, bool]:
    """What the server answered to ``data``, and whether it closed the connection (rather than
    leaving it open for the 30 s this waits)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(OSError):  # the server may close while a big head is sent
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        except TimeoutError:
            return b"".join(chunks), False
        return b"".join(chunks), True


def test_an_honest_request_is_served() -> None:
    with _server() as port:
        reply = _exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")


def test_an_oversized_header_is_refused_431_and_the_connection_closed() -> None:
    big = b"x-big: " + b"a" * (2 * http_limits.MAX_HEAD_BYTES) + b"\r\n"
    with _server() as port:
        reply = _exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + big + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"connection: close" in reply


def test_an_oversized_request_line_is_refused_431() -> None:
    path = b"/" + b"p" * (2 * http_limits.MAX_HEAD_BYTES)
    with _server() as port:
        reply = _exchange(port, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_too_many_header_fields_are_refused_431() -> None:
    fields = b"".join(b"x-%d: 1\r\n" % i for i in range(http_limits.MAX_HEADERS + 1))
    with _server() as port:
        reply = _exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n" + fields + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_a_head_that_never_completes_is_closed_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_limits, "HEAD_SECONDS", 0.5)
    with _server() as port:
        # a slow client: a request line and one header, then nothing more
        reply = _exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n")
        silent = _exchange(port, b"")  # a client that connects and never sends a byte
    assert reply == b"" and silent == b""  # closed, without an answer

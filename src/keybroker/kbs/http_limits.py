"""Bounds on a request's head that uvicorn's httptools protocol does not set.

uvicorn parses HTTP/1.1 with httptools (llhttp) and keeps every header it is sent: with no
bound on their size or number, one client can make a worker hold a request head of any size
(a 64 MB header was answered 200), and with no deadline on the head, a client that sends a
byte now and then holds its connection for ever. :class:`BoundedHttpToolsProtocol` is the same
protocol with three limits, which every ``kbs`` worker serves with (``kbs.server``):

- the request line and headers together: at most ``MAX_HEAD_BYTES`` (64 KiB), else **431**
  and the connection is closed;
- at most ``MAX_HEADERS`` (100) header fields, else the same;
- the head must arrive within ``HEAD_SECONDS`` (10 s) of the connection opening or of the
  request's first byte, else the connection is closed (nothing is answered: the request never
  started).

The body is bounded by the app (``[http_server] payload_request_size``, 413). A client past a
limit is logged with its address, never with what it sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
HEAD_SECONDS = 10.0

_TOO_LARGE = (
    "Request Header Fields Too Large: the request line and headers may take at most "
    f"{MAX_HEAD_BYTES} bytes in at most {MAX_HEADERS} fields"
)


class _HeadTooLargeError(Exception):
    """Raised inside a parser callback: httptools stops parsing and reports a parser error."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and a deadline for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_fields = 0
        self._head_refused = False
        self._head_timer: asyncio.TimerHandle | None = None

    # --- the deadline ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a connection that never sends a byte is not kept either

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None  # stopped once a head is complete: this one never was
        if not self.transport.is_closing():
            log.warning(
                "closing a connection from %s: no complete request head within %g s",
                _peer(self.client),
                HEAD_SECONDS,
            )
            self.transport.close()

    # --- the size ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_fields = 0
        self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        self._grow(len(url), fields=0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value), fields=1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def _grow(self, size: int, *, fields: int) -> None:
        self._head_bytes += size
        self._head_fields += fields
        if self._head_bytes > MAX_HEAD_BYTES or self._head_fields > MAX_HEADERS:
            self._head_refused = True
            raise _HeadTooLargeError

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; a head past the limits is answered 431."""
        if not self._head_refused:
            super().send_400_response(msg)
            return
        self._stop_head_timer()
        log.warning("refused a request head from %s: too large", _peer(self.client))
        body = _TOO_LARGE.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"

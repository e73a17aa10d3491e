"""A small HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

The load generator shares the machine's two cores with the server it measures, so every
microsecond it spends is taken from the server. httpx costs about four times as much CPU per
request as this (measured in docs/performance.md); what this client does not do (redirects,
chunked bodies, TLS, proxies) the KBS endpoints never need.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


class BenchHttpError(Exception):
    pass


class Connection:
    """One keep-alive connection; reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.local_port = 0  # of the open connection: tells which server process holds it

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def request(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
                self.local_port = self._writer.get_extra_info("sockname")[1]
            try:
                return await self._exchange(method, path, body, headers or {})
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Reply:
        assert self._reader is not None and self._writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self._host}:{self._port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        reply_headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            reply_headers[name.strip().lower()] = value.strip()
        if "chunked" in reply_headers.get("transfer-encoding", ""):
            raise BenchHttpError("chunked replies are not supported by the bench client")
        length = int(reply_headers.get("content-length", "0"))
        if length > MAX_BODY:
            raise BenchHttpError(f"reply of {length} bytes")
        data = await self._reader.readexactly(length) if length else b""
        if reply_headers.get("connection", "").lower() == "close":
            await self.close()
        return Reply(status, reply_headers, data)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # not awaited: a run's end cancels reads in flight
        self._reader = self._writer = None

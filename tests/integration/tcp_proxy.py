"""A TCP proxy between the KBS and a real server that a test can cut, to make it unreachable.

``refuse`` closes the listening socket and every open connection (the server looks stopped:
connection refused); ``blackhole`` accepts connections and never answers (a network that
drops packets: only timeouts notice); ``restore`` forwards again on the same port.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Literal

from ports import free_port

Mode = Literal["forward", "refuse", "blackhole"]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._mode: Mode = "forward"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = free_port()
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by refuse() or close()
            with self._lock:
                mode = self._mode
                if mode != "refuse" and listener is self._listener:
                    self._sockets.add(client)
            if mode == "refuse" or listener is not self._listener:
                self._drop(client)  # accepted by a listener that has since been closed
                continue
            if mode == "blackhole":
                continue  # hold the connection open, say nothing
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                self._drop(client)
                continue
            with self._lock:
                self._sockets.add(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
                with self._lock:
                    if a not in self._sockets:
                        return
        except OSError:
            return
        finally:
            self._drop(a)
            self._drop(b)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _cut_connections(self) -> None:
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            self._drop(sock)

    def refuse(self) -> None:
        with self._lock:
            self._mode = "refuse"
            listener, self._listener = self._listener, None
        if listener is not None:
            _close_listener(listener)
        self._cut_connections()

    def blackhole(self) -> None:
        with self._lock:
            self._mode = "blackhole"
        self._cut_connections()
        if self._listener is None:
            self._listen()

    def restore(self) -> None:
        self._cut_connections()
        with self._lock:
            self._mode = "forward"
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.refuse()


def _close_listener(listener: socket.socket) -> None:
    """Stop listening now. ``close()`` alone does not: a thread blocked in ``accept()`` keeps
    the socket listening until it accepts one more connection (which it then forwarded to the
    database: the "refused" database answered). ``shutdown`` wakes that thread first."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()

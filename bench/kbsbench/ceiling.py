"""The bare-HTTP ceiling: Keybroker's own server stack serving a trivial app.

python -m kbsbench.ceiling --port PORT --workers N

The app answers every request with one fixed JSON reply of :data:`REPLY_BYTES` bytes (and the
``Keybroker-Instance`` header ``/healthz`` sends, so the bench knows it reached the server it
started). Everything around the app is what ``kbs`` runs: the socket is bound by
``keybroker.kbs.server.bind``, the ``uvicorn.Config`` is ``keybroker.kbs.server.uvicorn_config``
(uvicorn's ``auto`` loop and HTTP parser: uvloop and httptools, both installed with keybroker),
one worker runs in the server process and several run under uvicorn's ``Multiprocess``
supervisor from an app factory, as ``kbs`` does with ``worker_count > 1``. What the ceiling
does not do, the KBS does per request: routing, Starlette, the rate limit, metrics, storage,
crypto, policy and audit. A KBS rate divided by this one, at the same workers and guests, is
its share of what the stack alone could serve.

Does not: read the request (every request gets the same reply), or serve TLS.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from keybroker.config import HttpServerConfig
from keybroker.kbs.app import INSTANCE_HEADER
from keybroker.kbs.server import INSTANCE_ENV, bind, uvicorn_config

REPLY_BYTES = 200


def _reply() -> bytes:
    """A JSON object of exactly REPLY_BYTES bytes, about the size of a KBS challenge."""
    head = {"ceiling": "kbsbench", "padding": ""}
    padding = REPLY_BYTES - len(json.dumps(head, separators=(",", ":")))
    body = json.dumps({**head, "padding": "x" * padding}, separators=(",", ":")).encode()
    assert len(body) == REPLY_BYTES
    return body


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def make_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app (also uvicorn's factory in each worker process)."""
    body = _reply()
    instance = os.environ.get(INSTANCE_ENV, "kbsbench-ceiling").encode()
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (INSTANCE_HEADER.lower().encode(), instance),
        ],
    }
    reply = {"type": "http.response.body", "body": body}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        more = True
        while more:  # drain the request body, as any app would
            more = (await receive()).get("more_body", False)
        await send(start)
        await send(reply)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the bare-HTTP ceiling server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    http = HttpServerConfig(
        sockets=[f"127.0.0.1:{args.port}"], insecure_http=True, worker_count=args.workers
    )
    sockets = [bind(text) for text in http.sockets]
    if args.workers == 1:  # as keybroker.kbs.server.serve: the app in this process
        uvicorn.Server(uvicorn_config(make_app(), 1, http)).run(sockets=sockets)
        return
    config = uvicorn_config("kbsbench.ceiling:make_app", args.workers, http)
    Multiprocess(config, sockets=sockets).run()


if __name__ == "__main__":
    main()

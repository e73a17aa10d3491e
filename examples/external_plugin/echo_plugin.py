"""A small external KBS plugin (gRPC service ``kbs.plugin.v1.KbsPlugin``), for trying the
``external`` plugin and for Keybroker's tests.

Run: ``python examples/external_plugin/echo_plugin.py --port 50051`` (plaintext), add
``--cert``/``--key`` for TLS and ``--client-ca`` to require a client certificate (mTLS).

What it answers, by the first forwarded path segment (``/kbs/v0/external/<backend>/<first>/...``):

- ``echo``: a JSON object with the method, path, query and body it was sent (guest path, plain);
- ``sealed``: the same, and asks the KBS to seal the answer to the guest's TEE key;
- ``admin``: the same, and asks for admin authorization;
- ``slow``: the same after ``--slow-seconds`` (default 30);
- ``huge``: a body of ``--huge-bytes`` (default 2 MiB) bytes;
- ``refuse``: ``status_code`` 403;
- ``fail``: raises (the KBS sees gRPC ``UNKNOWN``);
- anything else: ``status_code`` 404.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import grpc

from keybroker.grpc_api import plugin_pb2, plugin_pb2_grpc


class EchoPlugin(plugin_pb2_grpc.KbsPluginServicer):  # type: ignore[misc]
    def __init__(self, slow_seconds: float, huge_bytes: int) -> None:
        self._slow = slow_seconds
        self._huge = huge_bytes

    @staticmethod
    def _first(path: list[str]) -> str:
        return path[0] if path else ""

    async def ValidateAuth(  # noqa: N802 - gRPC method name
        self, request: plugin_pb2.ValidateAuthRequest, context: object
    ) -> plugin_pb2.ValidateAuthResponse:
        return plugin_pb2.ValidateAuthResponse(
            requires_admin_auth=self._first(list(request.path)) == "admin"
        )

    async def NeedsEncryption(  # noqa: N802
        self, request: plugin_pb2.NeedsEncryptionRequest, context: object
    ) -> plugin_pb2.NeedsEncryptionResponse:
        return plugin_pb2.NeedsEncryptionResponse(
            requires_payload_encryption=self._first(list(request.path)) == "sealed"
        )

    async def Handle(  # noqa: N802
        self, request: plugin_pb2.PluginRequest, context: object
    ) -> plugin_pb2.PluginResponse:
        first = self._first(list(request.path))
        if first == "huge":
            return plugin_pb2.PluginResponse(body=b"x" * self._huge, status_code=200)
        if first == "fail":
            raise RuntimeError("the echo plugin was asked to fail")
        if first == "refuse":
            return plugin_pb2.PluginResponse(body=b"no", status_code=403)
        if first not in ("echo", "sealed", "admin", "slow"):
            return plugin_pb2.PluginResponse(body=b"unknown", status_code=404)
        if first == "slow":
            await asyncio.sleep(self._slow)
        echo = {
            "method": request.method,
            "path": list(request.path),
            "query": dict(request.query),
            "body": request.body.decode(errors="replace"),
        }
        return plugin_pb2.PluginResponse(
            body=json.dumps(echo).encode(), status_code=200, content_type="application/json"
        )


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    plugin_pb2_grpc.add_KbsPluginServicer_to_server(
        EchoPlugin(args.slow_seconds, args.huge_bytes), server
    )
    address = f"{args.host}:{args.port}"
    if args.cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(args.key).read_bytes(), Path(args.cert).read_bytes())],
            root_certificates=Path(args.client_ca).read_bytes() if args.client_ca else None,
            require_client_auth=bool(args.client_ca),
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    print(f"echo plugin listening on {address}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--cert", help="server certificate (PEM): serve TLS")
    parser.add_argument("--key", help="server private key (PEM)")
    parser.add_argument("--client-ca", help="CA (PEM) client certificates must chain to (mTLS)")
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--huge-bytes", type=int, default=2 * 1024 * 1024)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

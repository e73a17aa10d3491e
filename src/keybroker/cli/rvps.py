"""``rvps`` and ``rvps-tool``: the Reference Value Provider Service over gRPC, and its client.

    rvps [-c|--config FILE] [-a|--address 127.0.0.1:50003]
    rvps-tool register -p|--path MESSAGE.json [-a|--addr http://127.0.0.1:50003]
    rvps-tool query -r|--reference-value-id ID [-a|--addr http://127.0.0.1:50003]

Upstream's command lines (``--id`` is Keybroker's earlier spelling of ``-r``). The config file
(TOML, JSON or YAML) is upstream's ``{"storage": {...}, "extractors": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from keybroker.cli import Parser, add_version, missing_grpc_extra
from keybroker.config import RvpsFileConfig, StorageType, load_rvps_config
from keybroker.errors import KeybrokerError, UnsupportedFeatureError
from keybroker.rvps.store import NAMESPACE, ReferenceValueStore
from keybroker.storage.provider import StorageProvider, local_fs_provider, memory_provider

log = logging.getLogger("keybroker.rvps")

# upstream's defaults: where rvps listens, and where rvps-tool finds it
DEFAULT_ADDRESS = "127.0.0.1:50003"
DEFAULT_URL = f"http://{DEFAULT_ADDRESS}"


def _storage(config: RvpsFileConfig) -> StorageProvider:
    backend = config.storage
    if backend.storage_type is StorageType.MEMORY:
        return memory_provider()
    if backend.storage_type is StorageType.LOCAL_FS and backend.backends.local_fs is not None:
        return local_fs_provider(backend.backends.local_fs.dir_path)
    raise UnsupportedFeatureError(f"[storage] storage_type = {backend.storage_type}")


async def _serve(store: ReferenceValueStore, address: str) -> None:
    from keybroker.rvps.grpc_service import build_server  # noqa: PLC0415 - grpc extra

    server = build_server(store, address)
    await server.start()
    log.info("Keybroker RVPS (gRPC) listening on %s", address)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = Parser(prog="rvps", description="Reference Value Provider Service")
    parser.add_argument("-c", "--config", type=Path, help="config file (TOML, JSON or YAML)")
    parser.add_argument("-a", "--address", default=DEFAULT_ADDRESS, help="listen address")
    add_version(parser)
    args = parser.parse_args(argv)
    try:
        store = ReferenceValueStore(_storage(load_rvps_config(args.config)).get(NAMESPACE))
        asyncio.run(_serve(store, args.address))
    except ModuleNotFoundError as e:
        return missing_grpc_extra("rvps", e)
    except (KeybrokerError, OSError) as e:
        print(f"rvps: error: {getattr(e, 'detail', e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def tool_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="rvps-tool", description="Talk to an RVPS")
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register a provenance message")
    register.add_argument("-p", "--path", type=Path, required=True, help="the message (JSON)")
    register.add_argument("-a", "--addr", default=DEFAULT_URL)
    query = commands.add_parser("query", help="print the reference values of an id (JSON)")
    query.add_argument(
        "-r", "--reference-value-id", "--id", dest="id", required=True, help="the id to query"
    )
    query.add_argument("-a", "--addr", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    try:
        from keybroker.rvps.grpc_service import RemoteReferenceValues  # noqa: PLC0415

        client = RemoteReferenceValues(args.addr)
    except ModuleNotFoundError as e:
        return missing_grpc_extra("rvps-tool", e)
    try:
        if args.command == "register":
            message = args.path.read_text(encoding="utf-8")
            asyncio.run(client.register(message))
            print("reference values registered", file=sys.stderr)
        else:
            value = asyncio.run(client.query(args.id))
            if value is None:
                print(f"rvps-tool: error: no reference value {args.id!r}", file=sys.stderr)
                return 1
            print(json.dumps(value))
    except KeybrokerError as e:
        print(f"rvps-tool: error: {e.detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"rvps-tool: error: cannot read {args.path}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

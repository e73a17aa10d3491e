"""``grpc-as`` and ``restful-as``: the Attestation Service as a gRPC or an HTTP server.

    grpc-as [-c|--config-file FILE] [-s|--socket 127.0.0.1:3000]
            [-t|--https-pubkey-cert CERT -k|--https-prikey KEY]
    restful-as [-c FILE] [-s 127.0.0.1:8080] [-t CERT -k KEY] [-r|--allowed_origin ORIGIN,...]

Upstream's command lines (``--https-cert``/``--https-key`` are Keybroker's earlier spellings of
``-t``/``-k``). The config file (TOML, JSON or YAML) holds ``attestation_token_broker``,
``rvps_config`` (builtin) and ``storage_backend`` (Memory or LocalFs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from keybroker.attestation.policy import NAMESPACE as POLICY_NAMESPACE
from keybroker.attestation.policy import AttestationPolicies
from keybroker.attestation.service import BuiltinAttestationService
from keybroker.attestation.signer import TokenSigner
from keybroker.cli import Parser, add_version, missing_grpc_extra
from keybroker.config import (
    AttestationServiceFileConfig,
    BuiltinAsConfig,
    RvpsGrpcConfig,
    StorageType,
    load_as_config,
)
from keybroker.errors import ConfigError, KeybrokerError, UnsupportedFeatureError
from keybroker.kbs.key_permissions import check_key_file
from keybroker.policy.workers import PolicyLimits, PolicyWorkers
from keybroker.rvps.store import NAMESPACE as RVPS_NAMESPACE
from keybroker.rvps.store import ReferenceValues, ReferenceValueStore, remote_reference_values
from keybroker.storage.provider import StorageProvider, local_fs_provider, memory_provider

log = logging.getLogger("keybroker.grpc_as")

# upstream's default listen addresses
GRPC_AS_SOCKET = "127.0.0.1:3000"
RESTFUL_AS_SOCKET = "127.0.0.1:8080"


def _storage(config: AttestationServiceFileConfig) -> StorageProvider:
    backend = config.storage_backend
    if backend.storage_type is StorageType.MEMORY:
        return memory_provider()
    if backend.storage_type is StorageType.LOCAL_FS and backend.backends.local_fs is not None:
        return local_fs_provider(backend.backends.local_fs.dir_path)
    raise UnsupportedFeatureError(f"[storage_backend] storage_type = {backend.storage_type}")


def build_service(config: AttestationServiceFileConfig) -> BuiltinAttestationService:
    signer = config.attestation_token_broker.signer
    if signer is not None:  # before the key is read, as `kbs` does
        check_key_file(
            "[attestation_token_broker.signer] key_path",
            signer.key_path,
            insecure=config.insecure_key_permissions,
        )
    storage = _storage(config)
    reference_values: ReferenceValues = (
        remote_reference_values(config.rvps_config.address)
        if isinstance(config.rvps_config, RvpsGrpcConfig)
        else ReferenceValueStore(storage.get(RVPS_NAMESPACE))
    )
    return BuiltinAttestationService(
        BuiltinAsConfig(
            attestation_token_broker=config.attestation_token_broker,
            rvps_config=config.rvps_config,
            verifier_config=config.verifier_config,
        ),
        TokenSigner.from_config(config.attestation_token_broker.signer),
        AttestationPolicies(
            storage.get(POLICY_NAMESPACE),
            reference_values,
            PolicyWorkers(PolicyLimits(**config.policy.model_dump())),
        ),
        reference_values,
    )


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t",
        "--https-pubkey-cert",
        "--https-cert",
        dest="https_cert",
        type=Path,
        help="certificate chain (PEM) to serve TLS with; needs -k",
    )
    parser.add_argument(
        "-k",
        "--https-prikey",
        "--https-key",
        dest="https_key",
        type=Path,
        help="private key (PEM) of the -t certificate",
    )


def cors_origins(values: list[str]) -> list[str]:
    """The origins of ``-r/--allowed_origin`` (each flag may hold several, comma-separated).

    Upstream logs and skips an origin that is not ``http://`` or ``https://``; Keybroker refuses
    to start instead, so a typo never silently leaves a browser client locked out or a wildcard
    intended where none is served.
    """
    origins = [part.strip() for value in values for part in value.split(",") if part.strip()]
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise ConfigError(
                f"invalid CORS origin {origin[:100]!r}: expected http://host[:port] or https://..."
            )
    return origins


async def _serve(
    service: BuiltinAttestationService, socket: str, tls: tuple[bytes, bytes] | None
) -> None:
    from keybroker.attestation.grpc_server import build_server  # noqa: PLC0415 - grpc extra

    await service.start()
    server = build_server(service, socket, tls=tls)
    await server.start()
    log.info("Keybroker attestation service (gRPC) listening on %s", socket)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = Parser(prog="grpc-as", description="Attestation Service (gRPC)")
    parser.add_argument(
        "-c", "--config-file", type=Path, help="AS config file (TOML, JSON or YAML)"
    )
    parser.add_argument("-s", "--socket", default=GRPC_AS_SOCKET, help="listen address")
    _tls_arguments(parser)
    add_version(parser)
    args = parser.parse_args(argv)
    if (args.https_cert is None) != (args.https_key is None):
        print("grpc-as: error: -t and -k go together", file=sys.stderr)
        return 1
    try:
        config = load_as_config(args.config_file)
        if args.https_key is not None:
            check_key_file("-k", args.https_key, insecure=config.insecure_key_permissions)
        tls = (
            (args.https_cert.read_bytes(), args.https_key.read_bytes()) if args.https_cert else None
        )
        service = build_service(config)
        asyncio.run(_serve(service, args.socket, tls))
    except ModuleNotFoundError as e:
        return missing_grpc_extra("grpc-as", e)
    except KeybrokerError as e:
        print(f"grpc-as: error: {e.detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"grpc-as: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())


def restful_main(argv: list[str] | None = None) -> int:
    """``restful-as [-c FILE] [-s|--socket 127.0.0.1:8080] [-t CERT -k KEY]``."""
    import uvicorn  # noqa: PLC0415 - only this command serves HTTP

    from keybroker.attestation.rest_server import create_as_app  # noqa: PLC0415

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = Parser(prog="restful-as", description="Attestation Service (HTTP)")
    parser.add_argument(
        "-c", "--config-file", type=Path, help="AS config file (TOML, JSON or YAML)"
    )
    parser.add_argument("-s", "--socket", default=RESTFUL_AS_SOCKET, help="listen address")
    _tls_arguments(parser)
    parser.add_argument(
        "-r",
        "--allowed_origin",
        "--allowed-origin",
        dest="allowed_origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin (http[s]://host[:port]) allowed to call the API from a browser (CORS); "
        "repeat it or separate origins with commas",
    )
    add_version(parser)
    args = parser.parse_args(argv)
    if (args.https_cert is None) != (args.https_key is None):
        print("restful-as: error: -t and -k go together", file=sys.stderr)
        return 1
    host, _, port = args.socket.rpartition(":")
    try:
        origins = cors_origins(args.allowed_origin)
        config = load_as_config(args.config_file)
        if args.https_key is not None:
            check_key_file("-k", args.https_key, insecure=config.insecure_key_permissions)
        app = create_as_app(build_service(config), origins)
    except KeybrokerError as e:
        print(f"restful-as: error: {e.detail}", file=sys.stderr)
        return 1
    uvicorn.run(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_config=None,
        ssl_certfile=str(args.https_cert) if args.https_cert else None,
        ssl_keyfile=str(args.https_key) if args.https_key else None,
    )
    return 0

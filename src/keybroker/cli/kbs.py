"""``kbs``: run the Key Broker Service.

kbs -c /etc/kbs/kbs-config.toml     # an upstream config file (TOML, JSON or YAML)
KBS_CONFIG_FILE=... kbs             # the same, from the environment
kbs --insecure-dev                  # laptop defaults: see DEV_DEFAULTS
kbs --insecure-dev --listen 127.0.0.1:9090   # the same on another port
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from keybroker import __version__
from keybroker.cli import Parser
from keybroker.config import DEFAULT_SOCKET, KbsConfig, load_config, parse_config
from keybroker.errors import ConfigError, KeybrokerError
from keybroker.kbs.audit import generate_key, load_key
from keybroker.kbs.audit_verify import verify_file
from keybroker.kbs.server import LOG_LEVELS, configure_logging, parse_socket, serve
from keybroker.kbs.tls import self_signed_certificate

DEFAULT_URL = f"http://{DEFAULT_SOCKET}"

# Builtin AS, resources in ./.kbs, sessions in memory, plain HTTP on loopback, open admin API.
DEV_DEFAULTS: dict[str, object] = {
    "http_server": {"sockets": [DEFAULT_SOCKET], "insecure_http": True},
    "admin": {"authorization_mode": "InsecureAllowAll"},
    "storage_backend": {
        "storage_type": "LocalFs",
        "backends": {"local_fs": {"dir_path": ".kbs"}},
    },
    "session_storage_type": "Memory",
    "audit": {"path": ".kbs/audit.log"},
}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kbs",
        description="Keybroker Key Broker Service",
        epilog=(
            "other commands: `kbs audit keygen|verify ...` (the keyed audit log) and "
            "`kbs self-signed-cert ...` (a key and certificate for test setups); "
            "each has its own --help"
        ),
    )
    parser.add_argument(
        "-c", "--config-file", type=Path, help="KBS config file (TOML, JSON or YAML)"
    )
    parser.add_argument(
        "--insecure-dev",
        action="store_true",
        help="laptop mode: plain HTTP on 127.0.0.1:8080, open admin API, resources in ./.kbs",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve on this address instead of the config's [http_server] sockets",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log level (default: %(default)s)"
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every request: method, path, status"
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"kbs (keybroker) {__version__}"
    )
    return parser


def _config(args: argparse.Namespace) -> KbsConfig:
    config = _loaded_config(args)
    if args.listen is None:
        return config
    parse_socket(args.listen)  # refuse a malformed address with a clear message
    http = config.http_server.model_copy(update={"sockets": [args.listen]})
    return config.model_copy(update={"http_server": http})


def _loaded_config(args: argparse.Namespace) -> KbsConfig:
    path = args.config_file or (
        Path(os.environ["KBS_CONFIG_FILE"]) if os.environ.get("KBS_CONFIG_FILE") else None
    )
    if path is not None and args.insecure_dev:
        raise KeybrokerError("use either a config file or --insecure-dev, not both")
    if path is not None:
        return load_config(path)
    if args.insecure_dev:
        logging.getLogger("keybroker").warning(
            "--insecure-dev: plain HTTP and an open admin API; for a laptop, never a server"
        )
        return parse_config(DEV_DEFAULTS, source="--insecure-dev defaults")
    raise KeybrokerError(
        "no configuration: pass -c FILE (or set KBS_CONFIG_FILE), "
        "or --insecure-dev to try Keybroker on this machine"
    )


def _hint(config: KbsConfig) -> None:
    url = f"http://{config.http_server.sockets[0]}"
    client = _sibling("kbs-client")
    # kbs-client's default URL is the default socket's; on any other, say how to point it here
    point = "" if url == DEFAULT_URL else f"  export KBS_URL={url}\n"
    print(
        f"Keybroker KBS on {url}\n"
        f"Try it from another terminal in this directory:\n"
        f"{point}"
        f"  printf 's3cr3t' > secret.txt\n"
        f"  {client} config set-resource --path default/demo/key --resource-file secret.txt\n"
        f"  {client} config set-resource-policy --allow-all\n"
        f"  {client} get-resource --path default/demo/key | base64 -d\n",
        file=sys.stderr,
        flush=True,
    )


def _sibling(name: str) -> str:
    """How to call a command installed next to this one, relative to the cwd when possible."""
    path = Path(sys.argv[0]).resolve().parent / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def audit_main(argv: list[str]) -> int:
    """``kbs audit verify [--key FILE] LOG`` and ``kbs audit keygen --out FILE``."""
    parser = Parser(prog="kbs audit", description="Audit log tools")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check a log for edited/removed/moved records")
    verify.add_argument("file", type=Path)
    verify.add_argument("--key", type=Path, help="the log's HMAC key ([audit] key_path)")
    verify.add_argument(
        "--checkpoint", type=Path, help="the log's last checkpoint (default: LOG.checkpoint)"
    )
    verify.add_argument(
        "--no-end-check",
        action="store_true",
        help="accept a log whose end cannot be checked (records after its last checkpoint "
        "could have been removed)",
    )
    keygen = commands.add_parser("keygen", help="write a new audit key (mode 0600)")
    keygen.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            generate_key(args.out)
            print(f'audit key: {args.out} (0600)\n[audit] key_path = "{args.out}"')
            return 0
        if args.key is None and (args.checkpoint or args.no_end_check):
            raise ConfigError("--checkpoint and --no-end-check are for keyed logs: pass --key")
        key = load_key(args.key) if args.key is not None else None
        result = verify_file(
            args.file, key=key, checkpoint_file=args.checkpoint, check_end=not args.no_end_check
        )
    except ConfigError as e:
        print(f"kbs audit: error: {e.detail}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kbs audit: error: {e.filename or args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not result.ok:
        print(f"{args.file}: TAMPERED: {result.problem}", file=sys.stderr)
        return 2
    if not result.keyed:
        print(
            f"{args.file}: {result.records} records, chain intact (unkeyed: this detects "
            "corruption, not tampering)"
        )
    elif result.end_checked:
        print(f"{args.file}: {result.records} records, keyed chain intact up to its end")
    else:
        print(
            f"{args.file}: {result.records} records, keyed chain intact "
            "(end not checked: records after the last checkpoint could have been removed)"
        )
    return 0


def self_signed_cert_main(argv: list[str]) -> int:
    """``kbs self-signed-cert``: a key and certificate for test HTTPS setups."""
    parser = Parser(
        prog="kbs self-signed-cert",
        description="Write a private key and a self-signed certificate (tests, not production)",
    )
    parser.add_argument("--key-out", type=Path, default=Path("kbs-key.pem"))
    parser.add_argument("--cert-out", type=Path, default=Path("kbs-cert.pem"))
    parser.add_argument(
        "--name", action="append", help="DNS name or IP (repeatable; default localhost, 127.0.0.1)"
    )
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    key_pem, cert_pem = self_signed_certificate(
        args.name or ["localhost", "127.0.0.1"], days=args.days
    )
    try:
        fd = os.open(args.key_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"kbs self-signed-cert: error: {args.key_out}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    args.cert_out.write_bytes(cert_pem)
    print(
        f"key: {args.key_out} (0600)\ncertificate: {args.cert_out}\n"
        f'[http_server] private_key = "{args.key_out}", certificate = "{args.cert_out}"; '
        f"clients: kbs-client --cert-file {args.cert_out}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:
        return audit_main(argv[1:])
    if argv[:1] == ["self-signed-cert"]:
        return self_signed_cert_main(argv[1:])
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = _config(args)
        if args.insecure_dev:
            _hint(config)
        serve(config, log_level=args.log_level, access_log=args.access_log)
    except KeybrokerError as e:
        print(f"kbs: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kbs``: run the Key Broker Service.

kbs -c /etc/kbs/kbs-config.toml     # an upstream config file (TOML or JSON)
KBS_CONFIG_FILE=... kbs             # the same, from the environment
kbs --insecure-dev                  # laptop defaults: see DEV_DEFAULTS
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from keybroker import __version__
from keybroker.config import KbsConfig, load_config, parse_config
from keybroker.errors import KeybrokerError
from keybroker.kbs.audit import verify_file
from keybroker.kbs.server import serve

# Builtin AS, resources in ./.kbs, sessions in memory, plain HTTP on loopback, open admin API.
DEV_DEFAULTS: dict[str, object] = {
    "http_server": {"sockets": ["127.0.0.1:8080"], "insecure_http": True},
    "admin": {"authorization_mode": "InsecureAllowAll"},
    "storage_backend": {
        "storage_type": "LocalFs",
        "backends": {"local_fs": {"dir_path": ".kbs"}},
    },
    "session_storage_type": "Memory",
    "audit": {"path": ".kbs/audit.log"},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kbs", description="Keybroker Key Broker Service")
    parser.add_argument("-c", "--config-file", type=Path, help="KBS config file (TOML or JSON)")
    parser.add_argument(
        "--insecure-dev",
        action="store_true",
        help="laptop mode: plain HTTP on 127.0.0.1:8080, open admin API, resources in ./.kbs",
    )
    parser.add_argument("--version", action="version", version=f"kbs (keybroker) {__version__}")
    return parser


def _config(args: argparse.Namespace) -> KbsConfig:
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
    print(
        f"Keybroker KBS on {url}\n"
        f"Try it from another terminal in this directory:\n"
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
    """``kbs audit verify FILE``: check an audit log's hash chain."""
    parser = argparse.ArgumentParser(prog="kbs audit", description="Audit log tools")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check a log for edited/removed/moved records")
    verify.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        result = verify_file(args.file)
    except OSError as e:
        print(f"kbs audit: error: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    if result.ok:
        print(f"{args.file}: {result.records} records, chain intact")
        return 0
    print(f"{args.file}: TAMPERED: {result.problem}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:
        return audit_main(argv[1:])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        if args.insecure_dev:
            _hint(config)
        serve(config)
    except KeybrokerError as e:
        print(f"kbs: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kbs-client``: a guest and an operator for a KBS, from the command line.

Upstream's flags, so existing scripts carry over. Results go to stdout (a token, or the base64
of a resource); progress and errors go to stderr, errors as one line with exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from importlib import resources
from pathlib import Path

from keybroker import __version__
from keybroker.client.admin import AdminClient
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.errors import ClientError, KeybrokerError

PRESET_POLICIES = {
    "allow_all": "allow_all",
    "deny_all": "deny_all",
    "affirming": "affirming",
    "default": "default",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kbs-client", description="A client for KBS APIs")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="KBS root URL")
    parser.add_argument("--cert-file", type=Path, help="CA certificate (PEM) of an HTTPS KBS")
    parser.add_argument("--version", action="version", version=f"kbs-client {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    attest = commands.add_parser("attest", help="attest and print the attestation token")
    attest.add_argument("--tee-key-file", type=Path, help="TEE private key (PEM)")
    attest.add_argument("init_data", nargs="?", help="init-data plaintext (TOML)")

    get = commands.add_parser("get-resource", help="fetch a resource; prints its base64")
    get.add_argument("--path", required=True, help="repository/type/tag")
    get.add_argument("--tee-key-file", type=Path, help="TEE private key (PEM)")
    get.add_argument("--attestation-token", type=Path, help="token file (passport mode)")
    get.add_argument("init_data", nargs="?", help="init-data plaintext (TOML)")

    config = commands.add_parser("config", help="administer the KBS")
    config.add_argument("--admin-token-file", type=Path, help="admin bearer token file")
    admin = config.add_subparsers(dest="admin_command", required=True)
    set_resource = admin.add_parser("set-resource", help="store a resource")
    set_resource.add_argument("--path", required=True)
    set_resource.add_argument("--resource-file", type=Path, required=True)
    delete_resource = admin.add_parser("delete-resource", help="delete a resource")
    delete_resource.add_argument("--path", required=True)
    policy = admin.add_parser("set-resource-policy", help="install the resource policy")
    choice = policy.add_mutually_exclusive_group(required=True)
    choice.add_argument("--policy-file", type=Path, help="a Rego file")
    choice.add_argument("--allow-all", action="store_true", help="release to any attested guest")
    choice.add_argument("--deny-all", action="store_true", help="release nothing")
    choice.add_argument("--affirming", action="store_true", help="only affirming tokens")
    choice.add_argument("--default", action="store_true", help="the default policy")
    return parser


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read {what} {path}: {e.strerror}") from None


def _admin_token(explicit: Path | None) -> str | None:
    candidates = [explicit] if explicit else []
    if not explicit:
        if os.environ.get("KBS_ADMIN_TOKEN_FILE"):
            candidates.append(Path(os.environ["KBS_ADMIN_TOKEN_FILE"]))
        candidates.append(Path.home() / ".trustee" / "admin-token")
    for path in candidates:
        if explicit or path.is_file():
            return _read(path, "admin token file").decode().strip()
    return None


def _policy_text(args: argparse.Namespace) -> str:
    if args.policy_file:
        return _read(args.policy_file, "policy file").decode()
    name = next(key for key in PRESET_POLICIES if getattr(args, key))
    return (resources.files("keybroker.kbs") / "policies" / f"{name}.rego").read_text()


def _guest(args: argparse.Namespace) -> KbsClient:
    tee_key = TeeKey.from_file(args.tee_key_file) if args.tee_key_file else None
    return KbsClient(args.url, tee_key=tee_key, init_data=args.init_data, cert_file=args.cert_file)


def _run(args: argparse.Namespace) -> None:
    if args.command == "attest":
        print(_guest(args).attest())
    elif args.command == "get-resource":
        if args.attestation_token and not args.tee_key_file:
            raise ClientError("--attestation-token needs --tee-key-file: the key the token names")
        client = _guest(args)
        if args.attestation_token:
            token = _read(args.attestation_token, "token file").decode().strip()
            data = client.get_resource_with_token(args.path, token)
        else:
            data = client.get_resource(args.path)
        print(base64.b64encode(data).decode())
    else:
        admin = AdminClient(
            args.url, token=_admin_token(args.admin_token_file), cert_file=args.cert_file
        )
        if args.admin_command == "set-resource":
            admin.set_resource(args.path, _read(args.resource_file, "resource file"))
            print(f"resource {args.path} set", file=sys.stderr)
        elif args.admin_command == "delete-resource":
            admin.delete_resource(args.path)
            print(f"resource {args.path} deleted", file=sys.stderr)
        else:
            admin.set_resource_policy(_policy_text(args))
            print("resource policy set", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except KeybrokerError as e:
        print(f"kbs-client: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

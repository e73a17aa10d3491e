"""``kbs-client``: a guest and an operator for a KBS, from the command line.

Upstream's flags, so existing scripts carry over. Results go to stdout (a token, or the base64
of a resource); progress and errors go to stderr, errors as one line with exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from keybroker import __version__
from keybroker.cli import Parser
from keybroker.client.admin import AdminClient
from keybroker.client.admin_tokens import (
    DEFAULT_DIR,
    generate_key_pair,
    load_signing_key,
    mint_admin_token,
    parse_duration,
    write_private,
)
from keybroker.client.attesters import Attester, SampleDeviceAttester
from keybroker.client.keys import DEFAULT_TEE_KEY_ALGORITHM, TEE_KEY_ALGORITHMS, TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.client.tpm_attester import TpmAttester
from keybroker.config import DEFAULT_SOCKET
from keybroker.errors import ClientError, KbsRejectedError, KeybrokerError
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath

DEFAULT_URL = f"http://{DEFAULT_SOCKET}"  # where `kbs --insecure-dev` (make run) serves

PRESET_POLICIES = {
    "allow_all": "allow_all",
    "deny_all": "deny_all",
    "affirming": "affirming",
    "default": "default",
}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kbs-client", description="A client for KBS APIs")
    parser.add_argument(
        "--url",
        default=os.environ.get("KBS_URL") or DEFAULT_URL,
        help=f"KBS root URL (default: $KBS_URL, else {DEFAULT_URL})",
    )
    parser.add_argument("--cert-file", type=Path, help="CA certificate (PEM) of an HTTPS KBS")
    parser.add_argument("-V", "--version", action="version", version=f"kbs-client {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands")

    attest = commands.add_parser("attest", help="attest and print the attestation token")
    _tee_key_options(attest)
    attest.add_argument("init_data", nargs="?", help="init-data plaintext (TOML)")
    _device_option(attest)

    get = commands.add_parser("get-resource", help="fetch a resource; prints its base64")
    get.add_argument("--path", required=True, help="repository/type/tag")
    _tee_key_options(get)
    get.add_argument("--attestation-token", type=Path, help="token file (passport mode)")
    get.add_argument("--version", dest="resource_version", type=int, help="this version")
    get.add_argument("init_data", nargs="?", help="init-data plaintext (TOML)")
    _device_option(get)

    tokens = commands.add_parser("admin", help="admin credentials (keys, tokens)")
    token_commands = tokens.add_subparsers(
        dest="credential_command", required=True, title="commands"
    )
    keygen = token_commands.add_parser("keygen", help="create an Ed25519 admin key pair")
    keygen.add_argument("--private-key", type=Path, default=DEFAULT_DIR / "admin-key.pem")
    keygen.add_argument("--public-key", type=Path, default=DEFAULT_DIR / "admin-key.pub.pem")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    token = token_commands.add_parser("token", help="mint an admin JWT")
    token.add_argument("--key", type=Path, required=True, help="the admin private key (PEM)")
    token.add_argument("--role", required=True)
    token.add_argument("--issuer")
    token.add_argument("--audience")
    token.add_argument("--subject", help="who the token is for (sub)")
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 30m, 12h, 7d (default 1h)")
    token.add_argument(
        "--out",
        default=str(DEFAULT_DIR / "admin-token"),
        help="where to write the token (0600); '-' prints it to stdout",
    )
    token.add_argument("--force", action="store_true", help="replace an existing token file")

    config = commands.add_parser("config", help="administer the KBS")
    config.add_argument("--admin-token-file", type=Path, help="admin bearer token file")
    admin_commands = config.add_subparsers(dest="admin_command", required=True, title="commands")
    _admin_parsers(admin_commands)
    for chooser in (commands, token_commands, admin_commands):
        # argparse names a missing command by its dest ("required: admin_command"); list them
        chooser.metavar = "{" + ",".join(chooser.choices) + "}"
    return parser


_PREFIX_HELP = "a tenant policy's repository prefix: <repository> or <repository>/<type>"


def _admin_parsers(admin: Any) -> None:
    _resource_parsers(admin)
    policy = admin.add_parser("set-resource-policy", help="install the resource policy")
    choice = policy.add_mutually_exclusive_group(required=True)
    choice.add_argument("--policy-file", type=Path, help="a Rego file")
    choice.add_argument("--allow-all", action="store_true", help="release to any attested guest")
    choice.add_argument("--deny-all", action="store_true", help="release nothing")
    choice.add_argument("--affirming", action="store_true", help="only affirming tokens")
    choice.add_argument("--default", action="store_true", help="the default policy")
    policy.add_argument("--prefix", help=_PREFIX_HELP + " (default: the global policy)")

    attestation = admin.add_parser("set-attestation-policy", help="install an attestation policy")
    attestation.add_argument("--policy-file", type=Path, required=True, help="a Rego file")
    attestation.add_argument("--type", default="rego", help="policy language (rego)")
    attestation.add_argument("--id", default="default_cpu", help="policy id (default_cpu)")

    sample_rv = admin.add_parser(
        "set-sample-reference-value", help="register a reference value (sample extractor)"
    )
    sample_rv.add_argument("name")
    sample_rv.add_argument("value", help="a string, unless --as-integer or --as-bool")
    kind = sample_rv.add_mutually_exclusive_group()
    kind.add_argument("--as-integer", action="store_true")
    kind.add_argument("--as-bool", action="store_true")
    sample_rv.add_argument(
        "--as-single-value", action="store_true", help="store the value itself, not [value]"
    )

    get_rv = admin.add_parser("get-reference-value", help="print a reference value (JSON)")
    get_rv.add_argument("--id", required=True)

    _read_back_parsers(admin)

    evaluate = admin.add_parser(
        "evaluate-policy", help="explain a resource or attestation policy decision"
    )
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--resource", action="store_true", help="the resource policy")
    which.add_argument("--attestation", action="store_true", help="an attestation policy")
    evaluate.add_argument("--policy-id", default="default_cpu", help="attestation policy id")
    evaluate.add_argument("--policy-file", type=Path, help="evaluate this draft instead")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-file", type=Path, help="policy input (JSON)")
    source.add_argument("--token-file", type=Path, help="take the input from this token")
    evaluate.add_argument("--path", help="resource path for the request data (repo/type/tag)")
    evaluate.add_argument("--plugin", default="resource", help="plugin for the request data")
    evaluate.add_argument("--submod", default="cpu0", help="submodule of the token (attestation)")
    _audit_parsers(admin)


def _resource_parsers(admin: Any) -> None:
    """Resources: store, delete, list, metadata and version actions."""
    set_resource = admin.add_parser("set-resource", help="store a resource")
    set_resource.add_argument("--path", required=True)
    set_resource.add_argument("--resource-file", type=Path, required=True)
    delete_resource = admin.add_parser(
        "delete-resource", help="delete a resource (soft: its current version, or --version)"
    )
    delete_resource.add_argument("--path", required=True)
    delete_resource.add_argument("--version", dest="resource_version", type=int)
    listing = admin.add_parser(
        "list-resources", help="list resources: names, versions, times (JSON; never values)"
    )
    listing.add_argument("--prefix", default="", help="repository or repository/type")
    listing.add_argument("--limit", type=int, help="one page of at most this many")
    listing.add_argument("--cursor", help="continue after a page (its next_cursor)")
    meta = admin.add_parser("get-resource-meta", help="a resource's versions and times (JSON)")
    meta.add_argument("--path", required=True)
    for name, what, required in (
        ("rollback-resource", "make a version current again (as a new version)", True),
        ("undelete-resource", "bring back a soft-deleted version", True),
        ("purge-resource", "destroy a version, or the whole resource, for good", False),
    ):
        action = admin.add_parser(name, help=what)
        action.add_argument("--path", required=True)
        action.add_argument("--version", dest="resource_version", type=int, required=required)


def _audit_parsers(admin: Any) -> None:
    """The audit log read back, and recent attestations from it."""
    audit = admin.add_parser(
        "audit-log", help="print audit records, newest first, and the chain's status (JSON)"
    )
    audit.add_argument("--action", help="action, whole words from the start: admin, attest...")
    audit.add_argument("--decision", choices=["allow", "deny", "failure", "success"])
    audit.add_argument("--target", help="target prefix, e.g. a resource path")
    audit.add_argument("--since", help="ISO 8601 time, e.g. 2026-12-07T08:00:00Z")
    _page_options(audit)
    audit.add_argument(
        "--verify-file",
        action="store_true",
        help="verify the whole log's chain (logs up to 16 MiB), not just the records read",
    )
    attestations = admin.add_parser(
        "recent-attestations", help="recent attestations by TEE and status, from the audit log"
    )
    attestations.add_argument("--since", help="ISO 8601 time, e.g. 2026-12-07T08:00:00Z")
    _page_options(attestations)


def _page_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, help="records per page (1..500, default 100)")
    parser.add_argument("--cursor", help="continue from a page's next_cursor")


def _tee_key_options(parser: argparse.ArgumentParser) -> None:
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--tee-key-file", type=Path, help="TEE private key (PEM)")
    key.add_argument(
        "--tee-key-algorithm",
        choices=list(TEE_KEY_ALGORITHMS),
        default=DEFAULT_TEE_KEY_ALGORITHM,
        help="kind of the fresh TEE key when no --tee-key-file is given, by upstream's "
        f"attestation-agent names (default {DEFAULT_TEE_KEY_ALGORITHM}; "
        "ML-KEM-768+A192KW is the experimental post-quantum key)",
    )


def _read_back_parsers(admin: Any) -> None:
    """Policies and reference values: list, read back, delete."""
    get_policy = admin.add_parser("get-resource-policy", help="print a resource policy's Rego text")
    get_policy.add_argument("--prefix", help=_PREFIX_HELP + " (default: the global policy)")
    delete_policy = admin.add_parser(
        "delete-resource-policy", help="remove a tenant resource policy"
    )
    delete_policy.add_argument("--prefix", required=True, help=_PREFIX_HELP)
    admin.add_parser(
        "list-resource-policies", help="list resource policy ids (global, then tenant prefixes)"
    )

    admin.add_parser("list-attestation-policies", help="list attestation policy ids")
    get_attestation = admin.add_parser(
        "get-attestation-policy", help="print an attestation policy's Rego text"
    )
    get_attestation.add_argument("--id", required=True, help="policy id (e.g. default_cpu)")
    delete_attestation = admin.add_parser(
        "delete-attestation-policy",
        help="remove an attestation policy (a default id gets the shipped policy back)",
    )
    delete_attestation.add_argument("--id", required=True, help="policy id")

    admin.add_parser("list-reference-values", help="list reference value names")
    delete_rv = admin.add_parser("delete-reference-value", help="remove a reference value")
    delete_rv.add_argument("--id", required=True)


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tee",
        choices=["sample", "tpm"],
        default="sample",
        help="the attester: sample (software, the default) or tpm (a TPM 2.0 through "
        "tpm2-tools; TPM2TOOLS_TCTI or AA_TPM_DEVICE, AA_TPM_AK_HANDLE)",
    )
    parser.add_argument(
        "--tpm-event-log",
        type=Path,
        help="with --tee tpm: send this TCG2 event log "
        "(e.g. /sys/kernel/security/tpm0/binary_bios_measurements)",
    )
    parser.add_argument(
        "--sample-device",
        action="store_true",
        default=bool(os.environ.get("ENABLE_SAMPLE_DEVICE")),
        help="add sampledevice evidence (also: ENABLE_SAMPLE_DEVICE set)",
    )


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
    if args.tee_key_file:
        tee_key = TeeKey.from_file(args.tee_key_file)
    else:
        tee_key = TeeKey.generate(args.tee_key_algorithm)
    devices: list[Attester] = [SampleDeviceAttester()] if args.sample_device else []
    attester = TpmAttester(event_log=args.tpm_event_log) if args.tee == "tpm" else None
    if args.tpm_event_log and args.tee != "tpm":
        raise ClientError("--tpm-event-log needs --tee tpm")
    return KbsClient(
        args.url,
        attester=attester,
        tee_key=tee_key,
        init_data=args.init_data,
        cert_file=args.cert_file,
        device_attesters=devices,
    )


def _reference_value(args: argparse.Namespace) -> JsonValue:
    value: JsonValue = args.value
    if args.as_integer:
        try:
            value = int(args.value)
        except ValueError:
            raise ClientError(f"{args.value!r} is not an integer") from None
    elif args.as_bool:
        if args.value not in ("true", "false"):
            raise ClientError(f"{args.value!r} is not a boolean (true or false)")
        value = args.value == "true"
    return value if args.as_single_value else [value]


def _explain_request(args: argparse.Namespace) -> dict[str, JsonValue]:
    request: dict[str, JsonValue] = {"kind": "resource" if args.resource else "attestation"}
    if args.attestation:
        request["policy_id"] = args.policy_id
        request["submod"] = args.submod
    if args.policy_file:
        rego = _read(args.policy_file, "policy file")
        request["policy"] = base64.urlsafe_b64encode(rego).rstrip(b"=").decode()
    if args.token_file:
        request["token"] = _read(args.token_file, "token file").decode().strip()
    else:
        try:
            request["input"] = json.loads(_read(args.input_file, "input file"))
        except json.JSONDecodeError as e:
            raise ClientError(f"input file {args.input_file} is not JSON: {e}") from None
    if args.resource:
        segments = ResourcePath.parse(args.path).segments() if args.path else []
        request["data"] = {"plugin": args.plugin, "resource-path": segments, "query": {}}
    return request


def _run_admin_credentials(args: argparse.Namespace) -> None:
    if args.credential_command == "keygen":
        files = generate_key_pair(args.private_key, args.public_key, force=args.force)
        print(
            f"admin private key: {files.private_key} (keep it secret)\n"
            f"admin public key:  {files.public_key} (put it in the KBS config as "
            "identity_providers = [{ public_key_uri = ... }])",
            file=sys.stderr,
        )
        return
    token = mint_admin_token(
        load_signing_key(args.key),
        role=args.role,
        ttl_seconds=parse_duration(args.ttl),
        issuer=args.issuer,
        audience=args.audience,
        subject=args.subject,
    )
    if args.out == "-":
        print(token)
        return
    write_private(Path(args.out), token.encode() + b"\n", force=args.force)
    print(f"admin token written to {args.out}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
    if args.command == "admin":
        _run_admin_credentials(args)
    elif args.command == "attest":
        print(_guest(args).attest())
    elif args.command == "get-resource":
        if args.attestation_token and not args.tee_key_file:
            raise ClientError("--attestation-token needs --tee-key-file: the key the token names")
        client = _guest(args)
        if args.attestation_token:
            token = _read(args.attestation_token, "token file").decode().strip()
            data = client.get_resource_with_token(args.path, token, version=args.resource_version)
        else:
            data = client.get_resource(args.path, version=args.resource_version)
        print(base64.b64encode(data).decode())
    else:
        admin_token = _admin_token(args.admin_token_file)
        admin = AdminClient(args.url, token=admin_token, cert_file=args.cert_file)
        try:
            _ADMIN_COMMANDS[args.admin_command](admin, args)
        except KbsRejectedError as e:
            if e.http_status == 401 and admin_token is None:
                raise ClientError(
                    f"{e.detail} (no admin token was sent: none given with --admin-token-file, "
                    "and no file at $KBS_ADMIN_TOKEN_FILE or ~/.trustee/admin-token)"
                ) from None
            raise


def _set_resource(admin: AdminClient, args: argparse.Namespace) -> None:
    version = admin.set_resource(args.path, _read(args.resource_file, "resource file"))
    suffix = "" if version is None else f" (version {version})"
    print(f"resource {args.path} set{suffix}", file=sys.stderr)


def _delete_resource(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.delete_resource(args.path, version=args.resource_version)
    print(f"resource {args.path} deleted", file=sys.stderr)


def _list_resources(admin: AdminClient, args: argparse.Namespace) -> None:
    if args.limit is None and args.cursor is None:
        print(json.dumps({"resources": admin.list_all_resources(args.prefix)}, indent=2))
    else:
        page = admin.list_resources(args.prefix, limit=args.limit, cursor=args.cursor)
        print(json.dumps(page, indent=2))


def _get_resource_meta(admin: AdminClient, args: argparse.Namespace) -> None:
    print(json.dumps(admin.resource_meta(args.path), indent=2))


def _rollback_resource(admin: AdminClient, args: argparse.Namespace) -> None:
    version = admin.rollback_resource(args.path, args.resource_version)
    print(
        f"resource {args.path}: version {args.resource_version} is current again "
        f"as version {version}",
        file=sys.stderr,
    )


def _undelete_resource(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.undelete_resource(args.path, args.resource_version)
    print(f"resource {args.path}: version {args.resource_version} undeleted", file=sys.stderr)


def _purge_resource(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.purge_resource(args.path, args.resource_version)
    which = "" if args.resource_version is None else f" version {args.resource_version}"
    print(f"resource {args.path}{which} purged", file=sys.stderr)


def _set_resource_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    if args.prefix is None:
        admin.set_resource_policy(_policy_text(args))
        print("resource policy set", file=sys.stderr)
        return
    admin.set_resource_policy(_policy_text(args), prefix=args.prefix)
    print(f"resource policy of {args.prefix} set", file=sys.stderr)


def _get_resource_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    sys.stdout.write(_with_newline(admin.get_resource_policy(args.prefix)))


def _delete_resource_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.delete_resource_policy(args.prefix)
    print(
        f"resource policy of {args.prefix} deleted: the next matching policy applies",
        file=sys.stderr,
    )


def _list_resource_policies(admin: AdminClient, args: argparse.Namespace) -> None:
    _print_lines(admin.list_resource_policies())


def _list_attestation_policies(admin: AdminClient, args: argparse.Namespace) -> None:
    _print_lines(admin.list_attestation_policies())


def _get_attestation_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    sys.stdout.write(_with_newline(admin.get_attestation_policy(args.id)))


def _delete_attestation_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    restored = admin.delete_attestation_policy(args.id)
    fallback = ": the shipped default applies again" if restored else ""
    print(f"attestation policy {args.id} deleted{fallback}", file=sys.stderr)


def _list_reference_values(admin: AdminClient, args: argparse.Namespace) -> None:
    _print_lines(admin.list_reference_values())


def _delete_reference_value(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.delete_reference_value(args.id)
    print(f"reference value {args.id} deleted", file=sys.stderr)


def _print_lines(names: list[str]) -> None:
    for name in names:
        print(name)


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") or not text else text + "\n"


def _set_attestation_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    rego = _read(args.policy_file, "policy file").decode()
    admin.set_attestation_policy(rego, policy_id=args.id, policy_type=args.type)
    print(f"attestation policy {args.id} set", file=sys.stderr)


def _set_sample_reference_value(admin: AdminClient, args: argparse.Namespace) -> None:
    admin.set_sample_reference_value(args.name, _reference_value(args))
    print(f"reference value {args.name} registered", file=sys.stderr)


def _get_reference_value(admin: AdminClient, args: argparse.Namespace) -> None:
    print(json.dumps(admin.get_reference_value(args.id)))


def _evaluate_policy(admin: AdminClient, args: argparse.Namespace) -> None:
    print(json.dumps(admin.explain_policy(_explain_request(args)), indent=2))


def _audit_log(admin: AdminClient, args: argparse.Namespace) -> None:
    page = admin.audit_log(
        action=args.action,
        decision=args.decision,
        target=args.target,
        since=args.since,
        limit=args.limit,
        cursor=args.cursor,
        verify="file" if args.verify_file else None,
    )
    print(json.dumps(page, indent=2))


def _recent_attestations(admin: AdminClient, args: argparse.Namespace) -> None:
    page = admin.recent_attestations(since=args.since, limit=args.limit, cursor=args.cursor)
    print(json.dumps(page, indent=2))


_ADMIN_COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace], None]] = {
    "set-resource": _set_resource,
    "delete-resource": _delete_resource,
    "list-resources": _list_resources,
    "get-resource-meta": _get_resource_meta,
    "rollback-resource": _rollback_resource,
    "undelete-resource": _undelete_resource,
    "purge-resource": _purge_resource,
    "set-resource-policy": _set_resource_policy,
    "get-resource-policy": _get_resource_policy,
    "delete-resource-policy": _delete_resource_policy,
    "list-resource-policies": _list_resource_policies,
    "set-attestation-policy": _set_attestation_policy,
    "list-attestation-policies": _list_attestation_policies,
    "get-attestation-policy": _get_attestation_policy,
    "delete-attestation-policy": _delete_attestation_policy,
    "set-sample-reference-value": _set_sample_reference_value,
    "get-reference-value": _get_reference_value,
    "list-reference-values": _list_reference_values,
    "delete-reference-value": _delete_reference_value,
    "evaluate-policy": _evaluate_policy,
    "audit-log": _audit_log,
    "recent-attestations": _recent_attestations,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except KeybrokerError as e:
        print(f"kbs-client: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kbs-client ... | head`: the reader left; say nothing more (no traceback at exit)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())

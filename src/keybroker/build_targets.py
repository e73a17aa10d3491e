"""Upstream's build interface for Keybroker: ``make background-check-kbs AS_TYPES=...``.

Upstream builds a different ``kbs`` binary per Cargo feature set. Keybroker's equivalents are
the optional extras of ``pyproject.toml`` (installed into a virtual environment) plus a starter
config for the mode. This module maps upstream's make switches (``AS_TYPE``/``AS_TYPES``,
``COCO_AS_INTEGRATION_TYPE``, ``ALIYUN``, ``VAULT``, ...) to extras, refuses the ones Keybroker
cannot honour with the reason, installs, and writes the config.

It runs before any Keybroker dependency is installed (from the Makefile with the system Python,
and in the Dockerfile's build stage), so it uses the standard library only; ``scripts/build-kbs``
is its command line. The keys a starter config names are made after the install, by the
installed ``kbs`` and ``kbs-client`` commands.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("background-check-kbs", "passport-issuer-kbs", "passport-resource-kbs", "cli")
KBS_TARGETS = TARGETS[:3]
AS_TYPES = ("coco-as", "intel-trust-authority-as")
INTEGRATION_TYPES = ("builtin", "grpc")
BOOLEANS = ("true", "false")

# Boolean switches: name -> (default, extra installed when true, or the reason it is refused).
# Upstream's defaults (kbs/Makefile): VAULT on, the rest off. PKCS11, POSTGRES and REDIS are
# Keybroker's own (upstream's docker/Dockerfile passes FEATURES=pkcs11). PQC_EXPERIMENTAL's
# extra brings what AKP (ML-KEM-768) tee keys need; it applies to `make cli` too, whose client
# can make such keys.
EXTRA_SWITCHES: dict[str, tuple[bool, str]] = {
    "ALIYUN": (False, "aliyun"),
    "AWS": (False, "aws"),
    "GCP": (False, "gcp"),
    "VAULT": (True, "vault"),
    "PKCS11": (False, "pkcs11"),
    "POSTGRES": (False, "postgres"),
    "REDIS": (False, "redis"),
    "EXTERNAL_PLUGIN": (False, "grpc"),  # the external plugin's gRPC client
    "PQC_EXPERIMENTAL": (False, "pqc"),
}
CLIENT_EXTRA_SWITCHES = ("PQC_EXPERIMENTAL",)
# Switches for what every build serves but needs a system tool for: name -> the note when true.
TOOL_SWITCHES: dict[str, str] = {
    "NEBULA_CA_PLUGIN": "NEBULA_CA_PLUGIN: the nebula-ca plugin is always there; it runs "
    "nebula-cert (Debian package `nebula`), which must be on PATH or set as "
    "`nebula_cert_bin_path`",
}
# kbs-client switches: Keybroker's client carries every attester it has; nothing to select.
CLIENT_SWITCHES: dict[str, str] = {
    "ATTESTER": "Keybroker's kbs-client always carries all of its attesters (sample, and the "
    "TDX/SNP/Azure ones are chosen at run time): there is nothing to select",
    "CLI_FEATURES": "Keybroker's kbs-client has no build features: there is nothing to select",
}
AS_SWITCHES = ("AS_TYPE", "AS_TYPES", "COCO_AS_INTEGRATION_TYPE")
# Upstream cross-compiles for ARCH; pip installs for the interpreter that runs the build.
HOST_SWITCHES = ("ARCH",)
SWITCHES = (
    *AS_SWITCHES,
    *EXTRA_SWITCHES,
    *TOOL_SWITCHES,
    *CLIENT_SWITCHES,
    *HOST_SWITCHES,
)
_MACHINES = {"arm64": "aarch64", "amd64": "x86_64"}

# Default listening addresses: upstream's quickstart ports.
DEFAULT_LISTEN = {
    "background-check-kbs": "127.0.0.1:8080",
    "passport-issuer-kbs": "127.0.0.1:50001",
    "passport-resource-kbs": "127.0.0.1:50002",
}
DEFAULT_AS_LISTEN = "127.0.0.1:50004"
ITA_BASE_URL = "https://api.trustauthority.intel.com"
ITA_CERTS_URL = "https://portal.trustauthority.intel.com/certs"
ITA_API_KEY_PLACEHOLDER = "REPLACE-WITH-YOUR-INTEL-TRUST-AUTHORITY-API-KEY"
ADMIN_ISSUER = "keybroker-build"


class BuildError(Exception):
    """A switch Keybroker cannot honour, or a step that failed; the message says which."""


@dataclass(frozen=True)
class Plan:
    """What one ``make <target>`` builds."""

    target: str
    as_type: str | None  # None: no attestation service (passport-resource-kbs, cli)
    integration: str
    extras: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def venv_name(self) -> str:
        """Targets with the same extras share one environment (``build/venvs/<name>``)."""
        return "-".join(self.extras) or "core"


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``NAME=value`` words (as make and ``docker build --build-arg`` spell them); an empty
    value means unset."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BuildError(f"{item!r}: expected NAME=value, NAME one of {', '.join(SWITCHES)}")
        if name not in SWITCHES:
            raise BuildError(f"unknown switch {name}: accepted are {', '.join(SWITCHES)}")
        if value:
            values[name] = value
    return values


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise BuildError(f"{name}={value}: accepted values are {' | '.join(accepted)}")
    return value


def _as_type(switches: dict[str, str]) -> str | None:
    spellings = {
        name: _choice(name, switches[name], AS_TYPES)
        for name in ("AS_TYPE", "AS_TYPES")
        if name in switches
    }
    given = set(spellings.values())
    if len(given) > 1:
        raise BuildError(
            f"AS_TYPE={spellings['AS_TYPE']} and AS_TYPES={spellings['AS_TYPES']} disagree: "
            "set one of them"
        )
    return given.pop() if given else None


def _refused(switches: dict[str, str]) -> None:
    arch, machine = switches.get("ARCH"), platform.machine()
    if arch is not None and _MACHINES.get(arch, arch) != _MACHINES.get(machine, machine):
        raise BuildError(
            f"ARCH={arch}: Keybroker installs for the interpreter running the build "
            f"({machine}); for another architecture build there, or an image with "
            f"docker buildx build --platform"
        )
    for name, reason in CLIENT_SWITCHES.items():
        if name in switches:
            raise BuildError(f"{name}={switches[name]}: {reason}")


def _not_applying(target: str, switches: dict[str, str]) -> None:
    """Switches a target has no use for are refused (upstream would ignore them silently)."""
    if target in ("passport-resource-kbs", "cli"):
        given = [name for name in AS_SWITCHES if name in switches]
        if given:
            what = "has no attestation service" if target != "cli" else "is the client only"
            raise BuildError(f"{', '.join(given)}: make {target} {what}")
    if target == "cli":
        given = [
            name
            for name in (*EXTRA_SWITCHES, *TOOL_SWITCHES)
            if name in switches and name not in CLIENT_EXTRA_SWITCHES
        ]
        if given:
            raise BuildError(f"{', '.join(given)}: make cli builds the client, with no backends")


def plan(target: str, switches: dict[str, str]) -> Plan:
    """The extras and the attestation service of ``target`` under ``switches``; every value
    is checked, and a switch that does not apply to the target is refused, never ignored."""
    _choice("target", target, TARGETS)
    _refused(switches)
    _not_applying(target, switches)
    as_type = _as_type(switches)
    integration = _choice(
        "COCO_AS_INTEGRATION_TYPE",
        switches.get("COCO_AS_INTEGRATION_TYPE", "builtin"),
        INTEGRATION_TYPES,
    )
    if target == "cli":
        extras = {
            EXTRA_SWITCHES[name][1]
            for name in CLIENT_EXTRA_SWITCHES
            if _choice(name, switches.get(name, "false"), BOOLEANS) == "true"
        }
        return Plan(target, None, integration, tuple(sorted(extras)))
    if target == "passport-resource-kbs":
        as_type = None
    else:
        as_type = as_type or "coco-as"
        if as_type != "coco-as" and "COCO_AS_INTEGRATION_TYPE" in switches:
            raise BuildError(f"COCO_AS_INTEGRATION_TYPE applies to AS_TYPES=coco-as, not {as_type}")
    extras = set()
    if as_type == "coco-as" and integration == "grpc":
        extras.add("grpc")
    for name, (default, extra) in EXTRA_SWITCHES.items():
        value = switches.get(name, "true" if default else "false")
        if _choice(name, value, BOOLEANS) == "true":
            extras.add(extra)
    notes = [
        note
        for name, note in TOOL_SWITCHES.items()
        if _choice(name, switches.get(name, "false"), BOOLEANS) == "true"
    ]
    if "aliyun" in extras:
        notes.append("ALIYUN: the Aliyun KMS client is part of Keybroker (extra `aliyun` is empty)")
    return Plan(target, as_type, integration, tuple(sorted(extras)), tuple(notes))


# --- starter configs -------------------------------------------------------------------------


def _toml_str(value: str | Path) -> str:
    text = str(value)
    if any(ch in text for ch in '"\\\n'):
        raise BuildError(f"cannot write {text!r} into a starter config")
    return f'"{text}"'


def _common(out: Path, listen: str) -> str:
    keys = out / "keys"
    return f"""[http_server]
sockets = [{_toml_str(listen)}]
# Plain HTTP, for loopback: set private_key and certificate (and drop this) to serve others.
insecure_http = true

[admin]
authorization_mode = "AuthenticatedAuthorization"

[admin.authentication.bearer_jwt]
identity_providers = [
    {{ issuer = "{ADMIN_ISSUER}", public_key_uri = {_toml_str(keys / "admin-key.pub.pem")} }},
]

[admin.authorization.regex_acl]
acls = [{{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }}]

[storage_backend]
storage_type = "LocalFs"
backends.local_fs.dir_path = {_toml_str(out / "storage")}

[audit]
path = {_toml_str(out / "audit.log")}
key_path = {_toml_str(keys / "audit.key")}
"""


def _signer(signer: Path) -> str:
    return (
        f"signer = {{ key_path = {_toml_str(signer.with_suffix('.key'))}, "
        f"cert_path = {_toml_str(signer.with_suffix('.pem'))} }}\n"
    )


def _attestation_service(plan: Plan, out: Path, signer: Path, as_listen: str) -> str:
    if plan.as_type == "intel-trust-authority-as":
        return f"""[attestation_service]
type = "intel_ta"
base_url = "{ITA_BASE_URL}"
# Your Intel Trust Authority API key (portal.trustauthority.intel.com): keep this file private.
api_key = "{ITA_API_KEY_PLACEHOLDER}"
certs_file = "{ITA_CERTS_URL}"
allow_unmatched_policy = false
policy_ids = []

[attestation_token]
trusted_jwk_sets = ["{ITA_CERTS_URL}"]
"""
    if plan.integration == "grpc":
        return f"""[attestation_service]
type = "coco_as_grpc"
as_addr = {_toml_str("http://" + as_listen)}

[attestation_token]
trusted_certs_paths = [{_toml_str(signer.with_suffix(".pem"))}]
"""
    return f"""[attestation_service]
type = "coco_as_builtin"

[attestation_service.attestation_token_broker]
{_signer(signer)}
[attestation_service.rvps_config]
type = "BuiltIn"
"""


def as_config(out: Path, signer: Path) -> str:
    """The grpc-as config of ``COCO_AS_INTEGRATION_TYPE=grpc``."""
    return f"""# Starter config of the gRPC Attestation Service (grpc-as), by scripts/build-kbs.
[attestation_token_broker]
{_signer(signer)}
[rvps_config]
type = "BuiltIn"

[storage_backend]
storage_type = "LocalFs"
backends.local_fs.dir_path = {_toml_str(out / "as-storage")}
"""


def kbs_config(plan: Plan, out: Path, signer: Path, listen: str, as_listen: str) -> str:
    """The starter ``kbs-config.toml`` of a KBS target, in upstream's key names."""
    head = f"# Starter config for `make {plan.target}`, written by scripts/build-kbs.\n"
    if plan.target == "passport-resource-kbs":
        service = f"""[attestation_service]
type = "none"

[attestation_token]
# Tokens of `make passport-issuer-kbs` (its signer); add trusted_jwk_sets for other issuers.
trusted_certs_paths = [{_toml_str(signer.with_suffix(".pem"))}]
"""
    else:
        service = _attestation_service(plan, out, signer, as_listen)
    return f"{head}{_common(out, listen)}\n{service}"


# --- the build -------------------------------------------------------------------------------


def _run(command: list[str | Path]) -> None:
    done = subprocess.run(  # noqa: S603 - our own commands, no shell
        [str(part) for part in command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        shown = " ".join(str(part) for part in command)
        raise BuildError(f"{shown} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _has_pip() -> bool:
    try:
        import pip  # noqa: F401, PLC0415 - only whether this interpreter can install
    except ImportError:
        return False
    return True


def install(root: Path, extras: tuple[str, ...], environment: Path) -> None:
    """``keybroker[extras]`` from ``root`` into the virtual environment ``environment``.

    An environment already there is reused (pip only adds what is missing) when it holds
    exactly these extras, which its name says. With pip in this interpreter the environment is
    made without its own pip (pip installs into it with ``--python``): quicker, same result.
    """
    python = environment / "bin" / "python"
    with_pip = not _has_pip()
    if not python.exists():
        venv.EnvBuilder(with_pip=with_pip, clear=True).create(environment)
    pip: list[str | Path] = (
        [python, "-m", "pip"] if with_pip else [sys.executable, "-m", "pip", "--python", python]
    )
    requirement = f"{root}[{','.join(extras)}]" if extras else str(root)
    _run([*pip, "install", "--quiet", requirement])


def make_keys(bin_dir: Path, keys: Path, signer: Path) -> None:
    """The admin key pair and a 7-day admin token, the audit chain's key, and the token
    signer's key and certificate, by the installed commands (kept when there; the token is
    renewed)."""
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (keys / "admin-key.pem").exists():
        _run(
            [
                bin_dir / "kbs-client",
                "admin",
                "keygen",
                "--private-key",
                keys / "admin-key.pem",
                "--public-key",
                keys / "admin-key.pub.pem",
            ]
        )
    _run(
        [
            bin_dir / "kbs-client",
            "admin",
            "token",
            "--key",
            keys / "admin-key.pem",
            "--role",
            "admin",
            "--issuer",
            ADMIN_ISSUER,
            "--ttl",
            "7d",
            "--out",
            keys / "admin-token",
            "--force",
        ]
    )
    if not (keys / "audit.key").exists():
        _run([bin_dir / "kbs", "audit", "keygen", "--out", keys / "audit.key"])
    if not signer.with_suffix(".key").exists():
        signer.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _run(
            [
                bin_dir / "kbs",
                "self-signed-cert",
                "--name",
                "keybroker-token-signer",
                "--key-out",
                signer.with_suffix(".key"),
                "--cert-out",
                signer.with_suffix(".pem"),
                "--days",
                "365",
            ]
        )


def build(
    plan: Plan,
    root: Path,
    build_dir: Path,
    *,
    listen: str | None = None,
    as_listen: str = DEFAULT_AS_LISTEN,
    environment: Path | None = None,
    write_config: bool = True,
) -> str:
    """Install and write the starter config; returns the one command that runs the result."""
    build_dir = build_dir.resolve()
    environment = (environment or build_dir / "venvs" / plan.venv_name).resolve()
    install(root.resolve(), plan.extras, environment)
    bin_dir = environment / "bin"
    if plan.target == "cli":
        return (
            f"{bin_dir / 'kbs-client'} --url http://{DEFAULT_LISTEN['background-check-kbs']} --help"
        )
    if not write_config:
        return f"{bin_dir / 'kbs'} -c kbs-config.toml"
    out = build_dir / plan.target
    out.mkdir(parents=True, exist_ok=True)
    # passport-issuer-kbs signs, passport-resource-kbs trusts: one signer for the pair.
    passport = plan.target.startswith("passport-")
    signer = (build_dir / "passport-keys" if passport else out / "keys") / "token-signer.pem"
    make_keys(bin_dir, out / "keys", signer)
    listen = listen or DEFAULT_LISTEN[plan.target]
    config = out / "kbs-config.toml"
    config.write_text(kbs_config(plan, out, signer, listen, as_listen))
    command = f"{bin_dir / 'kbs'} -c {config}"
    if plan.as_type == "coco-as" and plan.integration == "grpc":
        (out / "as-config.toml").write_text(as_config(out, signer))
        command = f"{bin_dir / 'grpc-as'} -c {out / 'as-config.toml'} -s {as_listen} & {command}"
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-kbs",
        description="Install a KBS with the extras upstream's make switches select, and write "
        "its starter config (docs/deployment.md).",
    )
    parser.add_argument("target", help=" | ".join(TARGETS))
    parser.add_argument("switches", nargs="*", metavar="NAME=value", help=", ".join(SWITCHES))
    parser.add_argument("--build-dir", type=Path, default=Path("build"))
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--listen", help="the KBS's socket (default: upstream's quickstart port)")
    parser.add_argument("--as-listen", default=DEFAULT_AS_LISTEN, help="grpc-as's socket")
    parser.add_argument("--venv", type=Path, help="install here instead of build/venvs/<extras>")
    parser.add_argument("--no-config", action="store_true", help="install only (the image)")
    parser.add_argument(
        "--print-extras", action="store_true", help="check and print, install nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        chosen = plan(args.target, parse_assignments(args.switches))
        if args.print_extras:
            print(",".join(chosen.extras))
            return 0
        command = build(
            chosen,
            args.root,
            args.build_dir,
            listen=args.listen,
            as_listen=args.as_listen,
            environment=args.venv,
            write_config=not args.no_config,
        )
    except BuildError as error:
        print(f"build-kbs: {error}", file=sys.stderr)
        return 2
    notes = list(chosen.notes)
    if chosen.as_type == "intel-trust-authority-as" and not args.no_config:
        notes.append(f"set api_key in {args.build_dir / args.target / 'kbs-config.toml'}")
    for note in notes:
        print(f"note: {note}")
    extras = ", ".join(chosen.extras) or "none"
    print(f"{args.target}: installed keybroker with extras: {extras}")
    print(f"run it with:\n  {command}")
    return 0


if __name__ == "__main__":  # pragma: no cover - scripts/build-kbs is the entry point
    sys.exit(main())

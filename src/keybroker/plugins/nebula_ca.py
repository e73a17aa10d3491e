"""The ``nebula-ca`` plugin (upstream's ``nebula_ca.rs``): a Nebula overlay-network CA.

At start-up the KBS finds (or creates, with ``nebula-cert ca``) the CA at
``<work_dir>/ca/ca.{crt,key}``. An attested guest then asks
``GET /kbs/v0/nebula-ca/credential?name=...&ip=...[&duration&groups&subnets]``; the KBS signs a
fresh node certificate with ``nebula-cert sign``, checks it with ``nebula-cert verify`` and
answers ``{"node_crt", "node_key", "ca_crt"}`` sealed to the guest's TEE key. The three values
are byte arrays as upstream's serde writes a ``Vec<u8>`` (JSON arrays of integers).

Every request parameter is checked here before any authorization work (400 on anything
unexpected); ``nebula-cert`` runs without a shell, with a timeout, in a thread, writing into a
private 0700 directory that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from keybroker.errors import (
    BadRequestError,
    ConfigError,
    InvalidRequestPathError,
    ServiceUnavailableError,
)
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse

log = logging.getLogger(__name__)

DEFAULT_CA_NAME = "Trustee Nebula CA plugin"
DEFAULT_NEBULA_CERT = "nebula-cert"
DEFAULT_WORK_DIR = Path("/opt/confidential-containers/kbs/nebula-ca")

# Bounds on what a guest may ask for (upstream passes the strings through unchecked).
MAX_NAME_LENGTH = 253  # a DNS name's length
MAX_LIST_ITEMS = 32  # groups, subnets
MAX_GROUP_LENGTH = 64
SIGN_TIMEOUT_SECONDS = 30.0
MAX_CONCURRENT_SIGNINGS = 4
MAX_OUTPUT_FILE = 64 * 1024  # a Nebula certificate or key is a few hundred bytes
QUERY_KEYS = frozenset({"name", "ip", "duration", "groups", "subnets"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Go's time.ParseDuration, restricted to what upstream documents: <h>h<m>m<s>s, each optional
_DURATION = re.compile(r"(?=.)(?:[0-9]{1,9}h)?(?:[0-9]{1,9}m)?(?:[0-9]{1,9}s)?")


class SelfSignedCaConfig(BaseModel):
    """``nebula-cert ca`` flags for a CA the plugin creates (upstream's
    ``SelfSignedNebulaCaConfig``; every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = DEFAULT_CA_NAME
    argon_iterations: int | None = Field(default=None, ge=0)
    argon_memory: int | None = Field(default=None, ge=0)
    argon_parallelism: int | None = Field(default=None, ge=0)
    curve: str | None = None
    duration: str | None = None
    groups: str | None = None
    ips: str | None = None
    out_qr: str | None = None
    subnets: str | None = None

    def arguments(self) -> list[str]:
        args = ["-name", self.name]
        flags: list[tuple[str, object]] = [
            ("-argon-iterations", self.argon_iterations),
            ("-argon-memory", self.argon_memory),
            ("-argon-parallelism", self.argon_parallelism),
            ("-curve", self.curve),
            ("-duration", self.duration),
            ("-groups", self.groups),
            ("-ips", self.ips),
            ("-out-qr", self.out_qr),
            ("-subnets", self.subnets),
        ]
        for flag, value in flags:
            if value is not None:
                args += [flag, str(value)]
        return args


class NebulaCaConfig(BaseModel):
    """``[[plugins]] name = "nebula-ca"``: upstream's keys. The CA table is ``ca_config`` in
    upstream's code and ``[plugins.self_signed_ca]`` in its docs; both spellings load."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    work_dir: Path = DEFAULT_WORK_DIR
    nebula_cert_bin_path: str = DEFAULT_NEBULA_CERT
    ca_config: SelfSignedCaConfig = Field(
        default_factory=SelfSignedCaConfig,
        validation_alias=AliasChoices("ca_config", "self_signed_ca"),
    )


class CredentialParams(BaseModel):
    """A validated ``credential`` query: the ``nebula-cert sign`` flags."""

    model_config = ConfigDict(frozen=True)
    name: str
    ip: str
    duration: str | None = None
    groups: str | None = None
    subnets: str | None = None

    @classmethod
    def from_query(cls, query: dict[str, str]) -> CredentialParams:
        unknown = sorted(set(query) - QUERY_KEYS)
        if unknown:
            named = ", ".join(key[:32] for key in unknown[:5])
            raise BadRequestError(f"nebula-ca credential: unknown parameter(s) {named}")
        name, ip = query.get("name"), query.get("ip")
        if name is None or ip is None:
            raise BadRequestError("nebula-ca credential: `name` and `ip` are required")
        if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
            raise BadRequestError(
                f"nebula-ca credential: `name` must be 1 to {MAX_NAME_LENGTH} characters of "
                "letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        duration = query.get("duration")
        if duration is not None and not _DURATION.fullmatch(duration):
            raise BadRequestError(
                'nebula-ca credential: `duration` must look like 8760h0m0s (units "h", "m", "s")'
            )
        groups = query.get("groups")
        if groups is not None:
            items = _split(groups, "groups")
            for group in items:
                if len(group) > MAX_GROUP_LENGTH or not _GROUP.fullmatch(group):
                    raise BadRequestError(
                        f"nebula-ca credential: a group must be 1 to {MAX_GROUP_LENGTH} "
                        "characters of letters, digits, '.', '_', ':' or '-'"
                    )
            groups = ",".join(items)
        subnets = query.get("subnets")
        if subnets is not None:
            subnets = ",".join(_ipv4_cidr(item, "subnets") for item in _split(subnets, "subnets"))
        return cls(
            name=name, ip=_ipv4_cidr(ip, "ip"), duration=duration, groups=groups, subnets=subnets
        )

    def arguments(self) -> list[str]:
        args = ["-name", self.name, "-ip", self.ip]
        for flag, value in (
            ("-duration", self.duration),
            ("-groups", self.groups),
            ("-subnets", self.subnets),
        ):
            if value is not None:
                args += [flag, value]
        return args


def _split(value: str, key: str) -> list[str]:
    if len(value) > MAX_LIST_ITEMS * (MAX_GROUP_LENGTH + 1):
        raise BadRequestError(f"nebula-ca credential: `{key}` is too long")
    items = value.split(",")
    if len(items) > MAX_LIST_ITEMS:
        raise BadRequestError(f"nebula-ca credential: at most {MAX_LIST_ITEMS} `{key}`")
    if any(not item for item in items):
        raise BadRequestError(f"nebula-ca credential: `{key}` has an empty item")
    return items


def _ipv4_cidr(value: str, key: str) -> str:
    """An IPv4 address with its network prefix (``10.9.8.7/21``), as ``nebula-cert`` wants."""
    if len(value) > 18 or "/" not in value:
        raise BadRequestError(f"nebula-ca credential: `{key}` must be IPv4 CIDR like 10.9.8.7/21")
    try:
        interface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise BadRequestError(
            f"nebula-ca credential: `{key}` must be IPv4 CIDR like 10.9.8.7/21"
        ) from None
    return interface.with_prefixlen


class NebulaCertBinary:
    """``nebula-cert``, run without a shell and with a timeout."""

    def __init__(self, path: str) -> None:
        found = shutil.which(path)
        if found is None:
            raise ConfigError(
                f"[[plugins]] nebula-ca: `{path}` not found (install Debian's `nebula` package "
                "or set `nebula_cert_bin_path`)"
            )
        self.path = found

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(  # noqa: S603 - a fixed binary and an argument list, no shell
            [self.path, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SIGN_TIMEOUT_SECONDS,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )

    def version(self) -> str:
        result = self.run("--version")
        text = result.stdout.decode("utf-8", "replace").strip()
        if result.returncode != 0 or not text.startswith("Version: "):
            raise ConfigError(f"[[plugins]] nebula-ca: `{self.path} --version` failed")
        return text.removeprefix("Version: ")


def _first_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:200] if lines else "no message"


class NebulaCaPlugin(Plugin):
    name = "nebula-ca"

    def __init__(self, config: NebulaCaConfig) -> None:
        self._nebula = NebulaCertBinary(config.nebula_cert_bin_path)
        self._work_dir = config.work_dir
        self.ca_crt = config.work_dir / "ca" / "ca.crt"
        self.ca_key = config.work_dir / "ca" / "ca.key"
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_SIGNINGS)
        try:
            log.info("nebula-ca: nebula-cert version %s", self._nebula.version())
            self.ca_crt.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # worker processes start together: one creates the CA, the others then reuse it
            with (self.ca_crt.parent / ".lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._ensure_ca(config.ca_config)
        except subprocess.TimeoutExpired:
            raise ConfigError("[[plugins]] nebula-ca: nebula-cert timed out at start-up") from None
        except OSError as e:
            raise ConfigError(f"[[plugins]] nebula-ca: {e}") from None

    def _ensure_ca(self, ca: SelfSignedCaConfig) -> None:
        """Reuse ``ca.{crt,key}`` if both exist (a previous run, or imported out-of-band);
        create them if neither does; refuse a half-present CA."""
        crt, key = self.ca_crt.exists(), self.ca_key.exists()
        if not crt and not key:
            result = self._nebula.run(
                "ca", *ca.arguments(), "-out-crt", str(self.ca_crt), "-out-key", str(self.ca_key)
            )
            if result.returncode != 0:
                raise ConfigError(
                    f"[[plugins]] nebula-ca: `nebula-cert ca` failed: {_first_line(result.stderr)}"
                )
            log.info("nebula-ca: created a self-signed Nebula CA at %s", self.ca_crt)
        elif not (crt and key):
            raise ConfigError(
                f"[[plugins]] nebula-ca: found only one of {self.ca_crt} and {self.ca_key}"
            )
        self.ca_key.chmod(0o600)
        printed = self._nebula.run("print", "-path", str(self.ca_crt))
        if printed.returncode != 0:
            raise ConfigError(
                f"[[plugins]] nebula-ca: {self.ca_crt} is not a Nebula certificate: "
                f"{_first_line(printed.stderr)}"
            )
        log.info("nebula-ca: CA certificate %s", self.ca_crt)

    def methods(self, request: PluginRequest) -> tuple[str, ...]:
        return ("GET",)

    def check(self, request: PluginRequest) -> None:
        if request.path != ("credential",):
            raise InvalidRequestPathError("nebula-ca answers only GET /kbs/v0/nebula-ca/credential")
        CredentialParams.from_query(request.query)

    def requires_admin(self, request: PluginRequest) -> bool:
        return False

    def needs_encryption(self, request: PluginRequest) -> bool:
        return True

    async def handle(self, request: PluginRequest) -> PluginResponse:
        self.check(request)
        params = CredentialParams.from_query(request.query)
        async with self._slots:
            credential = await asyncio.to_thread(self._credential, params)
        return PluginResponse(json.dumps(credential).encode(), content_type="application/json")

    def _credential(self, params: CredentialParams) -> dict[str, list[int]]:
        """Sign, verify and read a node credential in a private directory, then remove it."""
        try:
            directory = Path(tempfile.mkdtemp(prefix="credential-", dir=self._work_dir))  # 0700
        except OSError as e:
            log.error("nebula-ca: cannot make a directory in %s: %s", self._work_dir, e)
            raise ServiceUnavailableError("nebula-ca: the work directory is not usable") from None
        node_crt, node_key = directory / "node.crt", directory / "node.key"
        try:
            try:
                signed = self._nebula.run(
                    "sign",
                    *params.arguments(),
                    "-ca-key",
                    str(self.ca_key),
                    "-ca-crt",
                    str(self.ca_crt),
                    "-out-key",
                    str(node_key),
                    "-out-crt",
                    str(node_crt),
                )
                if signed.returncode != 0:
                    # what nebula-cert refuses is the request (an IP outside the CA's ips...)
                    raise BadRequestError(
                        f"nebula-ca: nebula-cert refused to sign: {_first_line(signed.stderr)}"
                    )
                verified = self._nebula.run(
                    "verify", "-ca", str(self.ca_crt), "-crt", str(node_crt)
                )
            except subprocess.TimeoutExpired:
                raise ServiceUnavailableError("nebula-ca: nebula-cert timed out") from None
            if verified.returncode != 0:
                log.error("nebula-ca: a fresh certificate failed verification")
                raise ServiceUnavailableError("nebula-ca: the signed certificate did not verify")
            return {
                "node_crt": list(_read_bounded(node_crt)),
                "node_key": list(_read_bounded(node_key)),
                "ca_crt": list(_read_bounded(self.ca_crt)),
            }
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as file:
        data = file.read(MAX_OUTPUT_FILE + 1)
    if len(data) > MAX_OUTPUT_FILE:
        raise ServiceUnavailableError(f"nebula-ca: {path.name} is larger than expected")
    return data

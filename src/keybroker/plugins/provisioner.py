"""The ``provisioner`` plugin (upstream's ``provisioner/mod.rs``): one LUKS key per VM.

Three endpoints under ``/kbs/v0/provisioner/``:

- ``POST provision`` (admin): the operator, before a confidential VM boots, names it with
  ``{"vm_name": ..., "namespace": ...}``. The plugin derives the VM's UUID (UUIDv5 of
  ``<namespace>/<vm_name>`` under upstream's fixed namespace UUID), generates a random LUKS
  passphrase, stores it as a confdata TOML document under ``default/<uuid>/root`` in the
  ``provisioner`` storage namespace, and answers ``{"uuid", "resource_path"}``. Provisioning a
  VM again answers the same and keeps the stored key, as upstream.
- ``GET default/<uuid>/root`` (attested guest): after the resource policy, the plugin releases
  the document only if the guest's init-data claims bind exactly this resource
  (``"trustee.kbs.resource" = "kbs+provisioner:///default/<uuid>/root"``); the KBS seals it to
  the guest's TEE key.
- ``DELETE provision/<uuid>`` (admin): removes the VM's document.

The plugin checks paths, sizes and identities itself; it does no HTTP parsing, admin
authentication or policy evaluation (the KBS does) and never logs or returns a key in the clear
(only sealed to an attested guest).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from keybroker.errors import (
    BadRequestError,
    InvalidRequestPathError,
    PayloadTooLargeError,
    PolicyDeniedError,
    ResourceNotFoundError,
    StorageError,
)
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse
from keybroker.protocol.models import JsonValue
from keybroker.protocol.untrusted_json import parse_json
from keybroker.storage.base import KeyValueStorage

log = logging.getLogger(__name__)

STORAGE_NAMESPACE = "provisioner"
# Upstream's namespace for the VM UUIDs: UUIDv5 of "provisioner_plugin" in the URL namespace
# (feab5599-6854-52bc-95f0-0241c03e620a). It must not change: UUIDs are handed to operators.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "provisioner_plugin")
REPOSITORY = "default"
TAG = "root"
CONFDATA_VERSION = "0.1.0"
CONFDATA_KEY = "io.cryptsetup.key.text.root"
INIT_DATA_CLAIM = "trustee.kbs.resource"
RESOURCE_URI_PREFIX = "kbs+provisioner:///"
DEFAULT_NAMESPACE = "default"
DEFAULT_KEY_LENGTH = 32
MIN_KEY_LENGTH = 16  # 16 alphanumerics hold about 95 bits
MAX_KEY_LENGTH = 4096

# Bounds on what an operator sends (upstream takes any JSON strings).
MAX_BODY = 4096
MAX_NAMESPACE_LENGTH = 63  # a Kubernetes namespace (DNS label)
MAX_VM_NAME_LENGTH = 253  # a Kubernetes object name (DNS subdomain)
MAX_STORED = 64 * 1024  # a confdata document is a few dozen bytes plus the key
BODY_KEYS = frozenset({"vm_name", "namespace"})

# No "/" in either part: the UUID is derived from "<namespace>/<vm_name>", so a slash would let
# namespace "a" with name "b/c" collide with namespace "a/b" with name "c" (and take its key).
# The leading letter or digit rules out ".." and hidden names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ALPHANUMERIC = string.ascii_letters + string.digits

Route = Literal["provision", "deprovision", "fetch"]
_METHODS: dict[Route, str] = {"provision": "POST", "deprovision": "DELETE", "fetch": "GET"}


class ProvisionerConfig(BaseModel):
    """``[[plugins]] name = "provisioner"``: upstream's one key, ``key_length`` (characters of
    the generated passphrase). Keybroker refuses lengths under 16 (a weak disk key).

    ``kbs_url`` is the key of an earlier upstream version (it went into the init-data that
    version answered with); it loads, is ignored, and says so in the log."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key_length: int = Field(default=DEFAULT_KEY_LENGTH, ge=MIN_KEY_LENGTH, le=MAX_KEY_LENGTH)
    kbs_url: str | None = None


@dataclass(frozen=True)
class VmIdentity:
    """A validated ``provision`` body."""

    namespace: str
    vm_name: str

    @classmethod
    def from_body(cls, unverified_body: bytes) -> VmIdentity:
        document = parse_json(unverified_body, what="provisioner request")
        if not isinstance(document, dict):
            raise BadRequestError(
                'provisioner: the body must be {"vm_name": ..., "namespace": ...}'
            )
        unknown = sorted(set(document) - BODY_KEYS)
        if unknown:
            named = ", ".join(key[:32] for key in unknown[:5])
            raise BadRequestError(f"provisioner: unknown field(s) {named}")
        vm_name = document.get("vm_name")
        if vm_name is None:
            raise BadRequestError("provisioner: `vm_name` is required")
        namespace = document.get("namespace", DEFAULT_NAMESPACE)
        return cls(
            namespace=_name(namespace, "namespace", MAX_NAMESPACE_LENGTH),
            vm_name=_name(vm_name, "vm_name", MAX_VM_NAME_LENGTH),
        )

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(UUID_NAMESPACE, f"{self.namespace}/{self.vm_name}"))


def _name(value: JsonValue, field: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit or not _NAME.fullmatch(value):
        raise BadRequestError(
            f"provisioner: `{field}` must be 1 to {limit} characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return value


def resource_key(vm_uuid: str) -> str:
    """The storage key (and upstream's ``resource_path``) of a VM's document."""
    return f"{REPOSITORY}/{vm_uuid}/{TAG}"


def generate_passphrase(length: int) -> str:
    """A LUKS passphrase of ``length`` random letters and digits (upstream's alphabet)."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def confdata(passphrase: str) -> bytes:
    """The confdata TOML document a guest's ``trustee-attester`` reads its disk key from.

    The passphrase is letters and digits only, so it needs no TOML escaping."""
    return (
        f'version = "{CONFDATA_VERSION}"\n\n[data]\n"{CONFDATA_KEY}" = "{passphrase}"\n'
    ).encode()


def _vm_uuid(segment: str) -> str:
    if not _UUID.fullmatch(segment):
        raise BadRequestError(
            f"provisioner: {segment[:64]!r} is not a VM uuid (lower-case 8-4-4-4-12 hex)"
        )
    return segment


def _route(path: tuple[str, ...]) -> Route | None:
    if path == ("provision",):
        return "provision"
    if len(path) == 2 and path[0] == "provision":
        return "deprovision"
    if len(path) == 3 and path[0] == REPOSITORY and path[2] == TAG:
        return "fetch"
    return None


class ProvisionerPlugin(Plugin):
    name = "provisioner"

    def __init__(self, config: ProvisionerConfig, storage: KeyValueStorage) -> None:
        self._key_length = config.key_length
        self._storage = storage
        if config.kbs_url is not None:
            log.warning(
                "[[plugins]] provisioner: `kbs_url` is ignored (upstream's provisioner no longer "
                "builds the guest's init-data; the operator does)"
            )

    def methods(self, request: PluginRequest) -> tuple[str, ...]:
        route = _route(request.path)
        return (_METHODS[route],) if route else ("DELETE", "GET", "POST")

    def check(self, request: PluginRequest) -> None:
        """Path, UUID and body size, before any authorization work."""
        route = _route(request.path)
        if route is None:
            raise InvalidRequestPathError(
                "provisioner answers POST provision, DELETE provision/<uuid> and "
                "GET default/<uuid>/root under /kbs/v0/provisioner/"
            )
        if route == "provision":
            if len(request.body) > MAX_BODY:
                raise PayloadTooLargeError(
                    f"provisioner: a provision request is at most {MAX_BODY} bytes, "
                    f"found {len(request.body)}"
                )
        else:
            _vm_uuid(request.path[1])
        if request.query:
            raise BadRequestError("provisioner: no query parameters are accepted")

    def requires_admin(self, request: PluginRequest) -> bool:
        # upstream: the guest's GET is attested, everything else is the operator's (admin)
        return request.method != "GET"

    def needs_encryption(self, request: PluginRequest) -> bool:
        return request.method == "GET"

    async def handle(self, request: PluginRequest) -> PluginResponse:
        self.check(request)
        route = _route(request.path)
        if route is None or request.method != _METHODS[route]:  # the KBS checked both already
            raise InvalidRequestPathError("provisioner: no such endpoint")
        if route == "provision":
            return await self._provision(VmIdentity.from_body(request.body))
        vm_uuid = _vm_uuid(request.path[1])
        if route == "deprovision":
            return await self._deprovision(vm_uuid)
        return await self._fetch(vm_uuid, request.init_data_claims)

    async def _provision(self, identity: VmIdentity) -> PluginResponse:
        vm_uuid = identity.uuid
        key = resource_key(vm_uuid)
        # overwrite=False is atomic in every backend: of two concurrent provisions of one VM
        # exactly one key is stored, and a second provision never replaces the key a running
        # VM's disk is already encrypted with.
        created = await self._storage.set(
            key, confdata(generate_passphrase(self._key_length)), overwrite=False
        )
        if created:
            log.info(
                "provisioner: provisioned %s/%s as %s",
                identity.namespace,
                identity.vm_name,
                vm_uuid,
            )
        else:
            log.info("provisioner: %s is already provisioned; its key is kept", vm_uuid)
        body = {"uuid": vm_uuid, "resource_path": key}
        return PluginResponse(_compact(body), content_type="application/json")

    async def _deprovision(self, vm_uuid: str) -> PluginResponse:
        if await self._storage.delete(resource_key(vm_uuid)) is None:
            # Upstream answers "deleted" whatever happened; Keybroker says the id is unknown.
            raise ResourceNotFoundError(f"provisioner: no VM is provisioned as {vm_uuid}")
        log.info("provisioner: deprovisioned %s", vm_uuid)
        return PluginResponse(_compact({"status": "deleted"}), content_type="application/json")

    async def _fetch(self, vm_uuid: str, init_data_claims: JsonValue) -> PluginResponse:
        key = resource_key(vm_uuid)
        # The resource policy decided whether this guest may use the plugin; the init-data the
        # guest was launched with (measured into its evidence) decides which VM it is. Without
        # this, any guest the policy admits could read every VM's disk key.
        expected = f"{RESOURCE_URI_PREFIX}{key}"
        bound = (
            init_data_claims.get(INIT_DATA_CLAIM) if isinstance(init_data_claims, dict) else None
        )
        if bound is None:
            raise PolicyDeniedError(
                f"provisioner: the guest's init-data has no `{INIT_DATA_CLAIM}` claim "
                f"(expected {expected})"
            )
        if bound != expected:
            shown = bound[:160] if isinstance(bound, str) else type(bound).__name__
            raise PolicyDeniedError(
                f"provisioner: the guest's init-data binds {shown!r}, not {expected}"
            )
        document = await self._storage.get(key)
        if document is None:
            raise ResourceNotFoundError(f"provisioner: no VM is provisioned as {vm_uuid}")
        if len(document) > MAX_STORED:
            raise StorageError(f"provisioner: the stored document of {vm_uuid} is too large")
        return PluginResponse(document)


def _compact(value: dict[str, str]) -> bytes:
    """JSON as upstream's serde writes it (no spaces, fields in declaration order)."""
    return json.dumps(value, separators=(",", ":")).encode()

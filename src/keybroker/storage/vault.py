"""Secret backend in HashiCorp Vault's key/value secrets engine (KV v1 or v2), through hvac.

Resource ``repo/type/tag`` is the Vault secret ``<mount_path>/repo/type/tag`` holding one field,
``data``, the resource in standard base64: upstream Trustee's layout, so secrets written by
either are read by the other.

With ``kv_version = 2`` Keybroker's resource versions are Vault's own: every write is a new
Vault version (Vault numbers them atomically, so concurrent writers never lose one), a read
returns the latest unless a version is asked for, a delete soft-deletes the latest version (or
the one named) and undelete brings it back (Vault's ``delete``/``undelete``), purge destroys a
version (``destroy``) or the whole secret (its metadata), and rollback writes an older
version's data as a new version, as ``vault kv rollback`` does. Retention is the mount's or
the secret's ``max_versions``. Listing walks the mount with ``LIST`` (one request per folder)
and reads each listed secret's metadata. Sizes are not in Vault's metadata: they read as
unknown. A deleted or destroyed version reads as missing. ``kv_version = 1`` keeps no versions:
listing, metadata and versions answer 501 there.

``kv_version`` must match the mount. On first use the backend asks Vault what the mount is
(``sys/internal/ui/mounts``, the Vault CLI's preflight) and refuses a mismatch: through the wrong
API a KV v2 mount reads as empty, and a KV v1 mount stores secrets under ``data/``, where
upstream never looks. If the token may not ask, a mismatch is still recognised on a read.

Authentication is a token (upstream's ``token``) or AppRole (``role_id`` + ``secret_id``): the
client token is obtained lazily, obtained again a little before its lease ends, and once more if
Vault answers 403 (a revoked token). Nothing comes from the environment: hvac would otherwise
send ``VAULT_TOKEN`` (or ``~/.vault-token``); the HTTP session is built from the configuration
alone (:mod:`keybroker.storage.vault_settings`).

TLS: upstream's ``verify_ssl`` defaults to false; Keybroker's defaults to true, because a KBS
that fetches secrets over an unauthenticated channel can be fed anything, and hands its token to
whoever answers. ``ca_certs`` replace the system's trust store (upstream adds them to it). CA and
client certificate files are loaded at start-up. ``verify_ssl = false`` and ``http://`` URLs log
a warning naming them insecure.

Failures: Vault unreachable, timing out, sealed, or answering 429 or 5xx is
:class:`ServiceUnavailableError` (503); 403 is a :class:`StorageError` saying permission denied;
so is a secret without a valid ``data`` field, a wrong mount and a failed TLS verification. No
secret bytes or tokens appear in messages. hvac is synchronous: calls run in worker threads, in
parallel; only a login is serialised.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from keybroker.errors import (
    BadRequestError,
    ConfigError,
    KeybrokerError,
    ResourceNotFoundError,
    ServiceUnavailableError,
    StorageError,
)
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.base import MAX_PAGE
from keybroker.storage.secrets import DEFAULT_MAX_RESOURCE_BYTES, SecretBackend
from keybroker.storage.vault_settings import (
    VaultConfig,
    http_session,
    tls_context,
    warn_if_insecure,
)
from keybroker.storage.vault_versions import is_resource_name, vault_record
from keybroker.storage.versions import ResourceRecord, Version

__all__ = ["VaultConfig", "VaultSecretBackend"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RENEW_MARGIN = 30.0  # seconds before an AppRole token's lease ends that we log in again
_VERSION_MISMATCH = "Invalid path for a versioned K/V secrets engine"


class VaultSecretBackend(SecretBackend):
    def __init__(
        self,
        config: VaultConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self.versioned = config.kv_version == 2
        try:
            import hvac  # type: ignore[import-untyped]  # noqa: PLC0415 - optional extra
            import requests  # noqa: PLC0415 - hvac's transport
        except ImportError:
            raise ConfigError(
                "the vault backend needs the vault extra: pip install 'keybroker[vault]'"
            ) from None
        self._hvac: Any = hvac
        self._requests: Any = requests
        self._config = config
        self._clock = clock
        self._login_lock = threading.Lock()
        self._token_deadline: float | None = None
        self._mount_checked = False
        warn_if_insecure(config)
        # token "" rather than None: hvac would take VAULT_TOKEN or ~/.vault-token instead.
        # The session's adapters ignore any client certificate hvac takes from the environment.
        session = http_session(requests, tls_context(config), config.verify_ssl)

        def client(token: str) -> Any:
            return hvac.Client(
                url=config.vault_url,
                token=token,
                verify=config.verify_ssl,
                timeout=config.timeout,
                session=session,
            )

        self._client = client(config.token or "")
        # AppRole logins go without a token, and the new one replaces the old in one assignment
        self._login_client = client("")

    @classmethod
    def from_config(cls, config: VaultConfig) -> VaultSecretBackend:
        return cls(config)

    def close(self) -> None:
        self._client.adapter.close()

    # --- calls -----------------------------------------------------------------------------

    async def _run(self, label: str, operation: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._call, label, operation)

    def _call(self, label: str, operation: Callable[[], T]) -> T:
        try:
            self._prepare()
            used = self._client.adapter.token
            try:
                return operation()
            except self._hvac.exceptions.Forbidden:
                if self._config.token is not None:
                    raise
                self._prepare(stale_token=used)  # the AppRole token may be revoked: once more
                return operation()
        except KeybrokerError:
            raise
        except Exception as e:
            failure = self._failure(e, label)
            if failure is e:
                raise
            raise failure from e

    def _failure(self, error: Exception, label: str) -> Exception:
        """Our error for hvac's or requests' ``error`` (or ``error`` itself if it is neither)."""
        if isinstance(error, self._hvac.exceptions.VaultError):
            return self._refusal(error, label)
        if isinstance(error, self._requests.exceptions.RequestException):
            return self._transport_failure(error)
        return error

    def _refusal(self, error: Exception, label: str) -> KeybrokerError:
        """Vault answered with an error status."""
        vault = self._hvac.exceptions
        where = f"{self._config.mount_path}/{label}"
        if isinstance(error, vault.Forbidden | vault.Unauthorized):
            return StorageError(
                f"Vault denied access to {where}: permission denied (check the token or AppRole "
                "and its policy)"
            )
        if isinstance(error, vault.VaultDown | vault.VaultNotInitialized):
            return ServiceUnavailableError("Vault is unavailable: sealed or not initialized")
        if isinstance(
            error, vault.InternalServerError | vault.BadGateway | vault.RateLimitExceeded
        ):
            return ServiceUnavailableError(f"Vault is unavailable ({type(error).__name__})")
        return StorageError(f"Vault refused the request for {where}: {type(error).__name__}")

    def _transport_failure(self, error: Exception) -> KeybrokerError:
        """No answer from Vault, or none we could trust."""
        net, config = self._requests.exceptions, self._config
        if isinstance(error, net.SSLError):
            return StorageError(
                f"TLS verification of the Vault server {config.vault_url} failed: check "
                "ca_certs (and client_cert)"
            )
        if isinstance(error, net.Timeout):
            return ServiceUnavailableError(
                f"Vault is unavailable: {config.vault_url} did not answer within "
                f"{config.timeout:g} s"
            )
        if isinstance(error, net.ConnectionError):
            return ServiceUnavailableError(f"Vault is unavailable: cannot reach {config.vault_url}")
        return StorageError(f"the request to Vault failed: {type(error).__name__}")

    def _prepare(self, stale_token: str | None = None) -> None:
        """Log in (AppRole) if there is no live token, and check the mount once."""
        approle = self._config.token is None
        deadline = self._token_deadline
        due = approle and (deadline is None or self._clock() >= deadline)
        if not (due or stale_token is not None or not self._mount_checked):
            return
        with self._login_lock:  # one login for many callers that found the token stale
            if approle and (
                self._token_deadline is None
                or self._clock() >= self._token_deadline
                or (stale_token is not None and self._client.adapter.token == stale_token)
            ):
                self._login()
            if not self._mount_checked:
                self._check_mount()
                self._mount_checked = True

    def _login(self) -> None:
        config, vault = self._config, self._hvac.exceptions
        try:
            answer = self._login_client.auth.approle.login(
                role_id=config.role_id,
                secret_id=config.secret_id,
                use_token=False,
                mount_point=config.approle_mount,
            )
        except (vault.InvalidRequest, vault.Forbidden, vault.Unauthorized):
            raise StorageError("Vault AppRole login failed: check role_id and secret_id") from None
        except vault.InvalidPath:
            raise StorageError(
                f"Vault AppRole login failed: no AppRole auth method at auth/"
                f"{config.approle_mount} (check approle_mount)"
            ) from None
        auth = answer.get("auth") if isinstance(answer, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        lease = auth.get("lease_duration") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token or not isinstance(lease, int):
            raise StorageError("Vault AppRole login answered without a client token and lease")
        self._client.adapter.token = token
        # a lease of 0 never expires; otherwise log in again a little before it runs out
        self._token_deadline = (
            float("inf") if lease <= 0 else self._clock() + max(lease - RENEW_MARGIN, lease / 2)
        )

    def _check_mount(self) -> None:
        """Refuse a ``kv_version`` that contradicts what Vault says the mount is.

        The endpoint is Vault's internal preflight (no compatibility promise): when it is denied
        or answers something unexpected, there is no verdict and the operation goes ahead.
        """
        config, vault = self._config, self._hvac.exceptions
        try:
            answer = self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{config.mount_path}")
        except (vault.Forbidden, vault.Unauthorized, vault.InvalidPath, vault.InvalidRequest):
            log.debug("vault: cannot ask Vault about mount %s", config.mount_path)
            return
        mount = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(mount, dict) or mount.get("type") != "kv":
            return
        options = mount.get("options")
        version = 2 if isinstance(options, dict) and str(options.get("version")) == "2" else 1
        if version != config.kv_version:
            raise StorageError(
                f"Vault mount {config.mount_path} is KV version {version}, but kv_version = "
                f"{config.kv_version}: set kv_version = {version}"
            )

    # --- the backend -----------------------------------------------------------------------

    def _absent(self, error: Any, label: str) -> None:
        """Return if a 404 means "no such secret"; raise if it means a wrong mount or API."""
        body = error.json if isinstance(error.json, dict) else {}
        if body.get("errors") == []:  # Vault's answer for a path without a secret
            return
        data = body.get("data")
        metadata = data.get("metadata") if isinstance(data, dict) else None
        if isinstance(metadata, dict) and (
            metadata.get("deletion_time") or metadata.get("destroyed")
        ):
            return  # KV v2: the latest version is deleted or destroyed
        mount = self._config.mount_path
        if any(_VERSION_MISMATCH in str(w) for w in body.get("warnings") or []):
            raise StorageError(f"Vault mount {mount} is KV version 2: set kv_version = 2")
        raise StorageError(f"Vault has no KV secrets engine for {mount}/{label}: check mount_path")

    def _read_sync(self, label: str, version: int | None = None) -> bytes | None:
        kv, mount = self._client.secrets.kv, self._config.mount_path
        try:
            if self._config.kv_version == 2:
                answer = kv.v2.read_secret_version(
                    path=label, version=version, mount_point=mount, raise_on_deleted_version=True
                )
                fields = _field(_field(answer, "data"), "data")
            else:
                fields = _field(kv.v1.read_secret(path=label, mount_point=mount), "data")
        except self._hvac.exceptions.InvalidPath as e:
            self._absent(e, label)
            return None
        encoded = fields.get("data") if isinstance(fields, dict) else None
        if not isinstance(encoded, str):
            keys = sorted(fields) if isinstance(fields, dict) else []
            raise StorageError(
                f"Vault secret {mount}/{label} has no string field `data` (fields: {keys})"
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise StorageError(f"Vault secret {mount}/{label}: `data` is not base64") from None

    def _exists_sync(self, label: str) -> bool:
        """Whether there is a secret at ``label``, whatever it holds (deletes need no decoding)."""
        kv, mount = self._client.secrets.kv, self._config.mount_path
        try:
            if self._config.kv_version == 2:
                kv.v2.read_secret_metadata(path=label, mount_point=mount)
            else:
                kv.v1.read_secret(path=label, mount_point=mount)
        except self._hvac.exceptions.InvalidPath as e:
            self._absent(e, label)
            return False
        return True

    def _write_sync(self, label: str, data: bytes) -> int | None:
        """Store ``data``; the Vault version it became (KV v2)."""
        kv, mount = self._client.secrets.kv, self._config.mount_path
        fields = {"data": base64.b64encode(data).decode("ascii")}
        if self._config.kv_version == 2:
            answer = kv.v2.create_or_update_secret(path=label, secret=fields, mount_point=mount)
            number = _field(answer, "data").get("version") if isinstance(answer, dict) else None
            return number if isinstance(number, int) else None
        else:  # PUT: without a method hvac reads the secret first to choose POST or PUT
            kv.v1.create_or_update_secret(
                path=label, secret=fields, method="PUT", mount_point=mount
            )
        return None

    def _delete_sync(self, label: str) -> bool:
        # two requests: Vault answers 204 to deleting nothing, and we must report a missing one
        if not self._exists_sync(label):
            return False
        kv, mount = self._client.secrets.kv, self._config.mount_path
        if self._config.kv_version == 2:
            kv.v2.delete_metadata_and_all_versions(path=label, mount_point=mount)
        else:
            kv.v1.delete_secret(path=label, mount_point=mount)
        return True

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._run(str(path), lambda: self._read_sync(str(path)))

    # --- versions (KV v2): Vault's own ------------------------------------------------------

    def _record_sync(self, label: str) -> ResourceRecord | None:
        """The secret's versions from its Vault metadata; destroyed versions are left out."""
        kv, mount = self._client.secrets.kv, self._config.mount_path
        try:
            answer = kv.v2.read_secret_metadata(path=label, mount_point=mount)
        except self._hvac.exceptions.InvalidPath as e:
            self._absent(e, label)
            return None
        return vault_record(_field(answer, "data"), f"{mount}/{label}")

    async def resolve(self, path: ResourcePath, requested: int | None) -> Version | None:
        if not self.versioned:
            return await super().resolve(path, requested)
        record = await self._run(str(path), lambda: self._record_sync(str(path)))
        return None if record is None else record.live(requested)

    async def _read_at(self, path: ResourcePath, version: Version | None) -> bytes | None:
        if version is None or not self.versioned:
            return await self._read(path)
        number = version.number
        return await self._run(str(path), lambda: self._read_sync(str(path), number))

    async def _store(self, path: ResourcePath, data: bytes) -> int | None:
        return await self._run(str(path), lambda: self._write_sync(str(path), data))

    async def _remove(self, path: ResourcePath, version: int | None) -> bool:
        if not self.versioned:
            return await self._delete(path)
        target = await self._live_version(path, version)
        await self._kv2_call(path, "delete_secret_versions", versions=[target])
        return True

    async def metadata(self, path: ResourcePath) -> ResourceRecord:
        if not self.versioned:
            return await super().metadata(path)
        record = await self._run(str(path), lambda: self._record_sync(str(path)))
        if record is None:
            raise ResourceNotFoundError(f"resource not found: {path}")
        return record

    async def list_resources(
        self, prefix: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, ResourceRecord]], str | None]:
        if not self.versioned:
            return await super().list_resources(prefix, after, limit)
        names = await self._run(prefix or "/", lambda: self._names_sync(prefix))
        names = [name for name in names if after is None or name > after][: min(limit, MAX_PAGE)]
        page = []
        for name in names:
            record = await self._run(name, partial(self._record_sync, name))
            if record is not None:
                page.append((name, record))
        return page, names[-1] if len(names) == limit else None

    def _names_sync(self, prefix: str) -> list[str]:
        """Every secret three folders deep under ``prefix`` (``LIST``, one per folder)."""
        mount = self._config.mount_path
        found: list[str] = []
        folders = [prefix]
        while folders:
            folder = folders.pop()
            try:
                # GET with list=true, Vault's documented stand-in for the LIST method (which
                # some proxies and HTTP stacks refuse)
                answer = self._client.adapter.get(
                    f"/v1/{mount}/metadata/{folder}", params={"list": "true"}
                )
            except self._hvac.exceptions.InvalidPath:
                continue  # an empty folder
            keys = _field(answer, "data").get("keys") if isinstance(answer, dict) else None
            for key in keys if isinstance(keys, list) else []:
                name = f"{folder}{key}"
                depth = name.rstrip("/").count("/")
                if key.endswith("/") and depth < 2:
                    folders.append(name)
                elif not key.endswith("/") and depth == 2 and is_resource_name(name):
                    found.append(name)
        return sorted(found)

    async def rollback(self, path: ResourcePath, version: int) -> int:
        if not self.versioned:
            return await super().rollback(path, version)
        await self._live_version(path, version)
        data = await self._run(str(path), lambda: self._read_sync(str(path), version))
        if data is None:
            raise ResourceNotFoundError(f"resource {path} has no live version {version}")
        number = await self._store(path, data)
        if number is None:
            raise StorageError(f"Vault did not say which version rollback of {path} made")
        return number

    async def undelete(self, path: ResourcePath, version: int) -> int:
        if not self.versioned:
            return await super().undelete(path, version)
        record = await self.metadata(path)
        found = record.version(version)
        if found is None:
            raise ResourceNotFoundError(f"resource {path} has no version {version}")
        if found.deleted is None:
            raise BadRequestError(f"version {version} of {path} is not deleted")
        await self._kv2_call(path, "undelete_secret_versions", versions=[version])
        return version

    async def purge(self, path: ResourcePath, version: int | None) -> None:
        if not self.versioned:
            return await super().purge(path, version)
        record = await self.metadata(path)
        if version is None:
            await self._kv2_call(path, "delete_metadata_and_all_versions")
            return None
        if record.version(version) is None:
            raise ResourceNotFoundError(f"resource {path} has no version {version}")
        await self._kv2_call(path, "destroy_secret_versions", versions=[version])
        return None

    async def _live_version(self, path: ResourcePath, version: int | None) -> int:
        record = await self.metadata(path)
        live = record.live(version)
        if live is None:
            which = "current version" if version is None else f"version {version}"
            raise ResourceNotFoundError(f"resource not found: {path} has no live {which}")
        return live.number

    async def _kv2_call(self, path: ResourcePath, name: str, **arguments: Any) -> None:
        kv, mount = self._client.secrets.kv, self._config.mount_path
        label = str(path)
        await self._run(
            label,
            lambda: getattr(kv.v2, name)(path=label, mount_point=mount, **arguments),
        )

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._run(str(path), lambda: self._write_sync(str(path), data))

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._run(str(path), lambda: self._delete_sync(str(path)))


def _field(answer: Any, name: str) -> Any:
    """``answer[name]`` of a JSON object from Vault; anything else is a StorageError."""
    if not isinstance(answer, dict) or name not in answer:
        raise StorageError(f"Vault answered without the field `{name}` where one is expected")
    return answer[name]

"""Secret backend in HashiCorp Vault's key/value secrets engine (KV v1 or v2), through hvac.

Resource ``repo/type/tag`` is the Vault secret ``<mount_path>/repo/type/tag`` holding one field,
``data``, the resource in standard base64: upstream Trustee's layout, so secrets written by
either are read by the other. With ``kv_version = 2`` every write is a new version and a read
returns the latest; a delete removes the secret with all its versions (metadata included).

Authentication is a token (upstream's ``token``) or AppRole (``role_id`` + ``secret_id``): the
client token is obtained lazily, renewed by logging in again shortly before its lease ends, and
once more if Vault answers 403 (a revoked token).

TLS: upstream's ``verify_ssl`` defaults to false; Keybroker's defaults to true, because a KBS
that fetches secrets over an unauthenticated channel can be fed anything. Turning it off logs a
warning at start-up, naming the setting. ``ca_certs`` are the CAs to trust instead of the
system's.

Failures: Vault unreachable, sealed, timing out or answering 5xx is
:class:`ServiceUnavailableError` (503); 403 is a :class:`StorageError` naming the secret path
(permissions); a secret without a valid ``data`` field is a :class:`StorageError` too. No secret
bytes or tokens appear in messages. hvac is synchronous: calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keybroker.errors import ConfigError, ServiceUnavailableError, StorageError
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.secrets import DEFAULT_MAX_RESOURCE_BYTES, SecretBackend

log = logging.getLogger(__name__)
T = TypeVar("T")
RENEW_MARGIN = 30.0  # seconds before an AppRole token's lease ends that we log in again


class VaultConfig(BaseModel):
    """Upstream's ``vault_url``, ``token``, ``mount_path``, ``verify_ssl``, ``ca_certs``;
    Keybroker's ``kv_version``, AppRole (``role_id``, ``secret_id``, ``approle_mount``),
    ``timeout``, and a client certificate for mutual TLS (``client_cert``, ``client_key``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vault_url: str
    token: str | None = Field(default=None, repr=False)
    role_id: str | None = None
    secret_id: str | None = Field(default=None, repr=False)
    approle_mount: str = "approle"
    mount_path: str = "secret"
    kv_version: Literal[1, 2] = 1
    verify_ssl: bool = True
    ca_certs: list[Path] | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _one_auth_method(self) -> VaultConfig:
        approle = self.role_id is not None or self.secret_id is not None
        if self.token is not None and approle:
            raise ValueError("configure either `token` or AppRole (`role_id`, `secret_id`)")
        if self.token is None and not (self.role_id and self.secret_id):
            raise ValueError("Vault needs `token`, or both `role_id` and `secret_id` (AppRole)")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("`client_cert` and `client_key` go together")
        if not self.vault_url.startswith(("https://", "http://")):
            raise ValueError("`vault_url` must be an http:// or https:// URL")
        return self


class VaultSecretBackend(SecretBackend):
    def __init__(
        self,
        config: VaultConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
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
        self._lock = threading.Lock()
        self._token_deadline: float | None = None
        if config.vault_url.startswith("https://") and not config.verify_ssl:
            log.warning(
                "vault backend: verify_ssl = false, the Vault server at %s is NOT authenticated "
                "(insecure: anyone on the path can read and forge secrets)",
                config.vault_url,
            )
        self._client = hvac.Client(
            url=config.vault_url,
            token=config.token,
            verify=self._verify(config),
            cert=(str(config.client_cert), str(config.client_key)) if config.client_cert else None,
            timeout=config.timeout,
        )

    @classmethod
    def from_config(cls, config: VaultConfig) -> VaultSecretBackend:
        return cls(config)

    @staticmethod
    def _verify(config: VaultConfig) -> bool | str:
        if not config.verify_ssl:
            return False
        if not config.ca_certs:
            return True
        if len(config.ca_certs) == 1:
            return str(config.ca_certs[0])
        # requests takes one bundle file: join the configured CAs into a private one
        try:
            pem = b"".join(Path(path).read_bytes() for path in config.ca_certs)
        except OSError as e:
            raise ConfigError(f"cannot read a Vault CA certificate: {e}") from None
        bundle = tempfile.NamedTemporaryFile(prefix="kbs-vault-ca-", suffix=".pem", delete=False)  # noqa: SIM115
        with bundle:
            bundle.write(pem)
        return bundle.name

    # --- calls -----------------------------------------------------------------------------

    async def _run(self, label: str, operation: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._call, label, operation)

    def _call(self, label: str, operation: Callable[[], T]) -> T:
        hvac_errors = self._hvac.exceptions
        with self._lock:
            try:
                self._ensure_token()
                try:
                    return operation()
                except hvac_errors.Forbidden:
                    if self._config.token is not None:
                        raise
                    self._login()  # the AppRole token may have been revoked: once more
                    return operation()
            except hvac_errors.Forbidden:
                raise StorageError(
                    f"Vault denied access to {self._config.mount_path}/{label}: check the "
                    "token's policy"
                ) from None
            except (
                hvac_errors.VaultDown,
                hvac_errors.InternalServerError,
                hvac_errors.BadGateway,
                hvac_errors.RateLimitExceeded,
            ) as e:
                raise ServiceUnavailableError(
                    f"Vault is unavailable ({type(e).__name__}): retry later"
                ) from None
            except self._requests.exceptions.SSLError:
                raise StorageError(
                    f"TLS verification of the Vault server {self._config.vault_url} failed: "
                    "check ca_certs"
                ) from None
            except (
                self._requests.exceptions.ConnectionError,
                self._requests.exceptions.Timeout,
            ) as e:
                raise ServiceUnavailableError(
                    f"Vault is unavailable ({type(e).__name__}): retry later"
                ) from None
            except hvac_errors.VaultError as e:
                raise StorageError(f"Vault refused the request: {type(e).__name__}") from None

    def _ensure_token(self) -> None:
        if self._config.token is not None:
            return
        if self._token_deadline is None or self._clock() >= self._token_deadline:
            self._login()

    def _login(self) -> None:
        config = self._config
        try:
            answer = self._client.auth.approle.login(
                role_id=config.role_id, secret_id=config.secret_id, mount_point=config.approle_mount
            )
        except (self._hvac.exceptions.InvalidRequest, self._hvac.exceptions.Forbidden):
            raise StorageError("Vault AppRole login failed: check role_id and secret_id") from None
        lease = float(answer.get("auth", {}).get("lease_duration") or 0)
        # a lease of 0 never expires; otherwise log in again a little before it runs out
        self._token_deadline = (
            float("inf") if lease <= 0 else self._clock() + max(lease - RENEW_MARGIN, lease / 2)
        )

    # --- the backend -----------------------------------------------------------------------

    def _read_sync(self, label: str) -> bytes | None:
        kv, mount = self._client.secrets.kv, self._config.mount_path
        try:
            if self._config.kv_version == 2:
                answer = kv.v2.read_secret_version(
                    path=label, mount_point=mount, raise_on_deleted_version=True
                )
                fields = answer["data"]["data"]
            else:
                fields = kv.v1.read_secret(path=label, mount_point=mount)["data"]
        except self._hvac.exceptions.InvalidPath:
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

    def _write_sync(self, label: str, data: bytes) -> None:
        kv, mount = self._client.secrets.kv, self._config.mount_path
        fields = {"data": base64.b64encode(data).decode("ascii")}
        if self._config.kv_version == 2:
            kv.v2.create_or_update_secret(path=label, secret=fields, mount_point=mount)
        else:
            kv.v1.create_or_update_secret(path=label, secret=fields, mount_point=mount)

    def _delete_sync(self, label: str) -> bool:
        if self._read_sync(label) is None:
            return False
        kv, mount = self._client.secrets.kv, self._config.mount_path
        if self._config.kv_version == 2:
            kv.v2.delete_metadata_and_all_versions(path=label, mount_point=mount)
        else:
            kv.v1.delete_secret(path=label, mount_point=mount)
        return True

    async def _read(self, path: ResourcePath) -> bytes | None:
        return await self._run(str(path), lambda: self._read_sync(str(path)))

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        await self._run(str(path), lambda: self._write_sync(str(path), data))

    async def _delete(self, path: ResourcePath) -> bool:
        return await self._run(str(path), lambda: self._delete_sync(str(path)))

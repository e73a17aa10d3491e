"""The Vault backend's settings, and the TLS context and HTTP session built from them.

:class:`VaultConfig` is what the ``resource`` plugin's table holds for ``vault``. The session
takes everything from it and nothing from the environment: requests would otherwise swap the
trust anchors for ``REQUESTS_CA_BUNDLE``, route through ``HTTPS_PROXY`` and present a client
certificate named by ``VAULT_CLIENT_CERT``. CA and client certificate files are loaded here, at
start-up, so a wrong path stops the KBS instead of failing its first request.
"""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keybroker.errors import ConfigError

log = logging.getLogger(__name__)
_MOUNT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]*(/[A-Za-z0-9_\-][A-Za-z0-9_\-.]*)*")


class VaultConfig(BaseModel):
    """Upstream's ``vault_url``, ``token``, ``mount_path``, ``verify_ssl``, ``ca_certs``;
    Keybroker's ``kv_version``, AppRole (``role_id``, ``secret_id``, ``approle_mount``),
    ``timeout``, and a client certificate for mutual TLS (``client_cert``, ``client_key``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vault_url: str
    token: str | None = Field(default=None, min_length=1, repr=False)
    role_id: str | None = Field(default=None, min_length=1, repr=False)
    secret_id: str | None = Field(default=None, min_length=1, repr=False)
    approle_mount: str = "approle"
    mount_path: str = "secret"
    kv_version: Literal[1, 2] = 1
    verify_ssl: bool = True
    ca_certs: tuple[Path, ...] | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout: float = Field(default=5.0, gt=0, le=300)

    @field_validator("vault_url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("`vault_url` must be an http:// or https:// URL with a host")
        if parts.username or parts.password:  # it is logged; credentials go in `token`
            raise ValueError("`vault_url` must not carry credentials")
        if parts.query or parts.fragment:
            raise ValueError("`vault_url` must not have a query or fragment")
        return parts.geturl().rstrip("/")  # the scheme in lower case

    @field_validator("mount_path", "approle_mount")
    @classmethod
    def _mount(cls, mount: str) -> str:
        mount = mount.strip("/")
        if not _MOUNT.fullmatch(mount):
            raise ValueError(
                f"invalid Vault mount {mount[:64]!r}: /-separated names, no dots first"
            )
        return mount

    @model_validator(mode="after")
    def _one_auth_method(self) -> VaultConfig:
        approle = self.role_id is not None or self.secret_id is not None
        if self.token is not None and approle:
            raise ValueError("configure either `token` or AppRole (`role_id`, `secret_id`)")
        if self.token is None and not (self.role_id and self.secret_id):
            raise ValueError("Vault needs `token`, or both `role_id` and `secret_id` (AppRole)")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("`client_cert` and `client_key` go together")
        return self


def _no_password() -> NoReturn:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key
    raise ConfigError("vault client_key is encrypted: give an unencrypted key file")


def tls_context(config: VaultConfig) -> ssl.SSLContext:
    """The one TLS context of every connection to Vault; unreadable files are ConfigErrors."""
    if not config.verify_ssl:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.ca_certs:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname and chain checked
        for path in config.ca_certs:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"vault ca_certs: cannot load {path}: {_reason(e)}") from None
    else:
        context = ssl.create_default_context()  # the system's trust store
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.client_cert is not None and config.client_key is not None:
        try:
            context.load_cert_chain(config.client_cert, config.client_key, password=_no_password)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"vault client_cert/client_key: cannot load {config.client_cert}: {_reason(e)}"
            ) from None
    return context


def _reason(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or type(error).__name__


def http_session(requests: Any, context: ssl.SSLContext, verify: bool) -> Any:
    """A requests session that takes TLS from ``context`` and nothing from the environment."""

    class ConfiguredTls(requests.adapters.HTTPAdapter):  # type: ignore[misc]
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, ssl_context=context, **kwargs)

        def build_connection_pool_key_attributes(
            self, request: Any, verify: Any, cert: Any = None
        ) -> Any:
            return super().build_connection_pool_key_attributes(request, verify, None)

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            # requests would load its own CA bundle (or REQUESTS_CA_BUNDLE's) into the context
            conn.cert_reqs = "CERT_REQUIRED" if verify else "CERT_NONE"

    session = requests.Session()
    session.trust_env = False  # no proxies, CA bundles or .netrc from the environment
    session.verify = verify
    for scheme in ("https://", "http://"):
        session.mount(scheme, ConfiguredTls())
    return session


def warn_if_insecure(config: VaultConfig) -> None:
    if config.vault_url.startswith("http://"):
        log.warning(
            "vault backend: vault_url %s is plain http: the token and every secret cross the "
            "network unencrypted and unauthenticated (insecure)",
            config.vault_url,
        )
    elif not config.verify_ssl:
        log.warning(
            "vault backend: verify_ssl = false, the Vault server at %s is NOT authenticated "
            "(insecure: anyone on the path can read the token and forge secrets)%s",
            config.vault_url,
            "; ca_certs are ignored" if config.ca_certs else "",
        )

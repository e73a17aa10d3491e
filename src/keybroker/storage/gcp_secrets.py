"""Secret backend reading Google Cloud Secret Manager secrets (read-only), upstream's ``gcp``.

Resource ``repo/type/tag`` is the secret version ``projects/<project_id>/secrets/<tag>/versions/
latest``, as in upstream Trustee (``gcp_sm.rs``): the repository and type are ignored, so two
resources that differ only there are the same secret, and a resource policy that tells
repositories apart does not make their secrets different. ``latest`` is the newest version of the
secret; its payload bytes are released as they are (Secret Manager stores bytes only).

The client is Google's own (``google-cloud-secret-manager``, the optional ``gcp`` extra) with
its REST transport (HTTP/1.1 + JSON, ``AccessSecretVersion`` as ``GET v1/{name}:access``),
configured from upstream's keys ``project_id`` and ``endpoint_url``. Credentials always come from
Google's Application Default Credentials chain (``GOOGLE_APPLICATION_CREDENTIALS``, the gcloud
ADC file, the metadata server of GCE/GKE/Cloud Run). A service-account key is exchanged at its
key file's ``token_uri`` for an access token (the OAuth 2.0 JWT-bearer grant), which google-auth
caches until shortly before it expires and renews then or on a 401. The configuration never
holds a key, and no token is ever logged. No credentials anywhere stops start-up with a
:class:`ConfigError`. The client blocks, so every call runs in a worker thread, never on the
event loop. (The client installs beside Keybroker's pinned protobuf 7 and grpcio 1.85; its
gRPC transport is not used.)

Failures: ``NOT_FOUND`` is a missing resource (404); so is a tag that cannot be a secret name
(Secret Manager allows only letters, digits, ``-`` and ``_``), without a request. Throttling
(``RESOURCE_EXHAUSTED``, 429), Google's 5xx errors, an endpoint that cannot be reached or does
not answer within ``timeout`` are retried, at most ``max_attempts`` tries in all, and then are
:class:`ServiceUnavailableError` (503). Credentials that are refused (HTTP 401 after the
client's own refresh, or a token endpoint that refuses or cannot be reached) are also 503, with
the reason in the log for the operator. Any other refusal (``PERMISSION_DENIED``, a disabled or
destroyed version, ...) is a :class:`StorageError` naming Google's status; Google's message goes
to the log only. A payload whose ``dataCrc32c`` does not match its bytes is refused
(:class:`StorageError`): corrupted in transit or at rest, it is never released. Writes and
deletes are refused with :class:`UnsupportedOperationError` (405) before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keybroker.errors import (
    ConfigError,
    ServiceUnavailableError,
    StorageError,
    UnsupportedOperationError,
)
from keybroker.protocol.resource_path import ResourcePath
from keybroker.storage.secrets import DEFAULT_MAX_RESOURCE_BYTES, SecretBackend

log = logging.getLogger(__name__)

SECRET_VERSION = "latest"  # noqa: S105 (a version alias) as upstream: always the current value
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_SECRET_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")  # Secret Manager's rule for secret ids
_BACKOFF_FIRST, _BACKOFF_MAX = 0.2, 2.0  # seconds between tries, doubling
_TOTAL_MARGIN = 5.0  # seconds on top of the tries and back-offs, for a token refresh
_READ_ONLY = "the gcp backend is read-only: manage secrets in Google Cloud Secret Manager itself"


class GcpSecretsConfig(BaseModel):
    """Upstream's ``project_id`` (required) and ``endpoint_url``; Keybroker's ``timeout``
    (seconds, to connect and for each read) and ``max_attempts`` (tries per call, retries
    included)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # A project id, a project number or a domain-scoped id (``example.com:proj``); never a '/'.
    project_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,99}$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#@]{1,253}/?$")
    timeout: float = Field(default=5.0, gt=0, le=300)
    max_attempts: int = Field(default=3, ge=1, le=10)


def secret_version_name(project_id: str, secret: str) -> str:
    """The resource name ``AccessSecretVersion`` takes, as upstream builds it."""
    return f"projects/{project_id}/secrets/{secret}/versions/{SECRET_VERSION}"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum Secret Manager sends as ``dataCrc32c``."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_table() -> tuple[int, ...]:
    entries = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        entries.append(crc)
    return tuple(entries)


_CRC32C_TABLE = _crc32c_table()


class GcpSecretsSecretBackend(SecretBackend):
    def __init__(
        self,
        config: GcpSecretsConfig,
        *,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self._config = config
        self._client = _make_client(config)
        self._where = config.endpoint_url or "Google Cloud Secret Manager"
        backoff = sum(_backoff(n) for n in range(config.max_attempts - 1))
        self._deadline = config.max_attempts * config.timeout + backoff + _TOTAL_MARGIN

    @classmethod
    def from_config(cls, config: GcpSecretsConfig) -> GcpSecretsSecretBackend:
        return cls(config)

    async def _read(self, path: ResourcePath) -> bytes | None:
        if not _SECRET_NAME.fullmatch(path.tag):
            return None  # e.g. a '.': no Secret Manager secret can have this name
        name = secret_version_name(self._config.project_id, path.tag)
        try:
            async with asyncio.timeout(self._deadline):
                # A worker thread: the client blocks. If the deadline passes first, the thread
                # ends on its own within the client's timeouts.
                return await asyncio.to_thread(self._access, name)
        except TimeoutError:
            raise ServiceUnavailableError(
                f"{self._where} did not answer within {self._deadline} s: retry later"
            ) from None

    def _access(self, name: str) -> bytes | None:
        """The payload of ``name``, or None for "no such secret" (in a worker thread)."""
        for attempt in range(1, self._config.max_attempts + 1):
            try:
                return self._access_once(name)
            except _RetryLaterError as busy:
                if attempt == self._config.max_attempts:
                    raise ServiceUnavailableError(
                        f"{self._where}: {busy} (after {attempt} tries): retry later"
                    ) from None
            time.sleep(_backoff(attempt - 1))  # a worker thread: the event loop runs on
        raise AssertionError("unreachable")  # pragma: no cover

    def _access_once(self, name: str) -> bytes | None:
        # The optional `gcp` extra; _make_client has checked that it is installed.
        import requests  # noqa: PLC0415
        from google.api_core import exceptions as google  # noqa: PLC0415
        from google.auth import exceptions as auth  # noqa: PLC0415

        try:
            response = self._client.access_secret_version(
                name=name, retry=None, timeout=self._config.timeout
            )
        except google.NotFound:
            return None
        except (google.TooManyRequests, google.ServerError) as e:
            self._log_refusal(name, e)
            raise _RetryLaterError(f"busy or failing: {_status(e)}") from None
        except google.Unauthorized as e:  # HTTP 401 UNAUTHENTICATED, after one refresh
            self._log_refusal(name, e)
            raise ServiceUnavailableError(
                f"{self._where} refused the KBS's credentials ({_status(e)}): see the KBS log"
            ) from None
        except google.GoogleAPICallError as e:
            self._log_refusal(name, e)
            raise StorageError(
                f"Secret Manager refused AccessSecretVersion: {_status(e)}"
            ) from None
        except auth.RefreshError as e:
            # From the token endpoint or the metadata server; the reason names no token.
            log.warning("GCP credentials could not be refreshed: %s", str(e)[:300])
            if e.retryable:  # the token service was busy or failing (google-auth has retried)
                raise _RetryLaterError("the token endpoint is busy or failing") from None
            raise ServiceUnavailableError(
                "the KBS's Google credentials were refused while refreshing its access token: "
                "see the KBS log"
            ) from None
        except (requests.RequestException, auth.TransportError) as e:
            log.warning("Secret Manager at %s: %s: %s", self._where, type(e).__name__, str(e)[:300])
            raise _RetryLaterError(
                f"unreachable or no answer within {self._config.timeout} s"
            ) from None
        except auth.GoogleAuthError as e:
            raise StorageError(f"Google credentials failed: {type(e).__name__}") from None
        return self._payload(name, response)

    def _payload(self, name: str, response: Any) -> bytes:
        payload = response.payload
        data = bytes(payload.data)
        if len(data) > self.max_bytes:  # no checksum over an oversized value
            raise StorageError(f"secret {name} is larger than {self.max_bytes} bytes")
        if "data_crc32c" in payload and crc32c(data) != payload.data_crc32c:
            log.warning("Secret Manager returned %s with a wrong dataCrc32c: refused", name)
            raise StorageError(f"secret {name} failed its CRC32C check: not released")
        return data

    def _log_refusal(self, name: str, e: Any) -> None:
        # Google's message is for the operator, not for whoever asked; it names no token.
        log.warning(
            "Secret Manager refused AccessSecretVersion for %s: %s %r",
            name,
            _status(e),
            str(getattr(e, "message", ""))[:200],
        )

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        raise UnsupportedOperationError(_READ_ONLY)

    async def _delete(self, path: ResourcePath) -> bool:
        raise UnsupportedOperationError(_READ_ONLY)


class _RetryLaterError(Exception):
    """One try failed in a way that another try may not."""


def _backoff(retry: int) -> float:
    return float(min(_BACKOFF_FIRST * 2**retry, _BACKOFF_MAX))


def _status(e: Any) -> str:
    """``HTTP 429 RESOURCE_EXHAUSTED``: the HTTP code and Google's status name."""
    code = getattr(e, "code", None)
    status = ""
    for detail in getattr(e, "errors", None) or ():
        if isinstance(detail, dict) and isinstance(detail.get("status"), str):
            status = detail["status"]
    response = getattr(e, "response", None)
    if not status and response is not None:
        try:
            status = str(response.json()["error"]["status"])
        except (ValueError, KeyError, TypeError):
            status = ""
    return f"HTTP {code} {status[:40]}".rstrip()


def _make_client(config: GcpSecretsConfig) -> Any:
    """Google's Secret Manager client over REST, with Application Default Credentials."""
    try:
        import google.auth  # noqa: PLC0415  (the optional `gcp` extra)
        from google.auth import exceptions as auth  # noqa: PLC0415
        from google.cloud import secretmanager_v1  # noqa: PLC0415
        from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (  # noqa: PLC0415
            rest,
        )
    except ImportError:
        raise ConfigError(
            "the gcp resource backend needs the gcp extra: pip install 'keybroker[gcp]'"
        ) from None
    try:
        credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except auth.GoogleAuthError as e:
        raise ConfigError(
            f"gcp backend: no usable Google credentials ({type(e).__name__}): set "
            "GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default login`, or "
            "run on GCP with a service account"
        ) from None
    transport = rest.SecretManagerServiceRestTransport(
        host=(config.endpoint_url or rest.SecretManagerServiceRestTransport.DEFAULT_HOST).rstrip(
            "/"
        ),
        credentials=credentials,
        # A service-account key signs an assertion that the key file's token_uri exchanges for
        # an access token (OAuth 2.0 JWT-bearer grant), rather than the library's default of
        # sending a self-signed JWT to the API: every credential type then yields an access
        # token from Google's token service, which Google can expire and revoke.
        always_use_jwt_access=False,
    )
    # google-auth waits up to 120 s for a token refresh unless told otherwise.
    transport._session._refresh_timeout = config.timeout
    return secretmanager_v1.SecretManagerServiceClient(transport=transport)

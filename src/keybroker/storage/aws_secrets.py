"""Secret backend reading AWS Secrets Manager secrets (read-only), upstream's ``aws`` backend.

Resource ``repo/type/tag`` is the Secrets Manager secret whose ``SecretId`` is ``tag``, as in
upstream Trustee (``aws_kms.rs``): the repository and type are ignored, so two resources that
differ only there are the same secret, and a resource policy that tells repositories apart does
not make their secrets different. ``GetSecretValue`` returns the current version
(``AWSCURRENT``): a binary secret (``SecretBinary``) is released as its bytes, a string secret
(``SecretString``) as its UTF-8 bytes, binary first, as upstream does.

The client is boto3's, configured from upstream's keys: ``region`` and ``endpoint_url``. Both
may be left out; then the region comes from ``AWS_REGION`` (the variable upstream's Rust SDK
reads, mapped into ``region`` when the configuration is loaded) or boto3's own sources
(``AWS_DEFAULT_REGION``, the shared config file); no region at all stops start-up with a
:class:`ConfigError`. Credentials always come from boto3's standard chain (environment, shared
credentials and config files, web identity / IRSA, container and EC2 instance roles): the
configuration never holds an AWS key. boto3 blocks, so every call runs
in a worker thread, never on the event loop.

Failures: "no such secret" (``ResourceNotFoundException``) is a missing resource (404). Throttling,
AWS's own 5xx errors, an endpoint that cannot be reached or that does not answer within
``timeout`` is :class:`ServiceUnavailableError` (503), after at most ``max_attempts`` tries (boto3's
"standard" retry mode, which backs off between them); the whole call is also bounded by
``max_attempts`` times ``timeout`` plus a margin. Any other refusal (access denied, a secret
scheduled for deletion, KMS unable to decrypt it, no credentials) is a :class:`StorageError`
naming the AWS error code; AWS's message goes to the log, never to the client, and secret values
are never logged. Writes and deletes are refused with :class:`UnsupportedOperationError` (405)
before anything is sent: manage secrets with AWS's own tools.
"""

from __future__ import annotations

import asyncio
import logging
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

NOT_FOUND_CODES = frozenset({"ResourceNotFoundException"})
# Error codes that mean "busy or failing, try again later" (besides any HTTP 5xx).
RETRY_LATER_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServiceError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
_TOTAL_MARGIN = 5.0  # seconds on top of max_attempts * timeout, for the retry back-off
_READ_ONLY = "the aws backend is read-only: manage secrets in AWS Secrets Manager itself"


class AwsSecretsConfig(BaseModel):
    """Upstream's ``region`` and ``endpoint_url`` (both optional); Keybroker's ``timeout``
    (seconds, to connect and for each read) and ``max_attempts`` (tries per call, retries
    included)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,64}$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#@]{1,253}/?$")
    timeout: float = Field(default=5.0, gt=0, le=300)
    max_attempts: int = Field(default=3, ge=1, le=10)


class AwsSecretsSecretBackend(SecretBackend):
    def __init__(
        self,
        config: AwsSecretsConfig,
        *,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self._config = config
        self._client = _make_client(config)
        self._where = config.endpoint_url or "AWS Secrets Manager"
        self._deadline = config.max_attempts * config.timeout + _TOTAL_MARGIN

    @classmethod
    def from_config(cls, config: AwsSecretsConfig) -> AwsSecretsSecretBackend:
        return cls(config)

    async def _read(self, path: ResourcePath) -> bytes | None:
        try:
            async with asyncio.timeout(self._deadline):
                # A worker thread: boto3 blocks. If the deadline passes first, the thread ends
                # on its own within boto3's connect/read timeouts.
                response = await asyncio.to_thread(self._get_secret_value, path.tag)
        except TimeoutError:
            raise ServiceUnavailableError(
                f"{self._where} did not answer within {self._deadline} s: retry later"
            ) from None
        if response is None:
            return None
        binary = response.get("SecretBinary")
        if isinstance(binary, bytes | bytearray):
            return bytes(binary)
        text = response.get("SecretString")
        if isinstance(text, str):
            return text.encode("utf-8")
        raise StorageError(f"AWS Secrets Manager returned no value for secret {path.tag}")

    def _get_secret_value(self, secret_id: str) -> dict[str, Any] | None:
        """The ``GetSecretValue`` response, or None for "no such secret" (in a worker thread)."""
        # boto3 is the optional `aws` extra; _make_client has checked that it is installed.
        from botocore import exceptions as boto  # noqa: PLC0415

        try:
            response: dict[str, Any] = self._client.get_secret_value(SecretId=secret_id)
            return response
        except boto.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))[:100]
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in NOT_FOUND_CODES:
                return None
            # AWS's message and request id are for the operator, not for whoever asked.
            log.warning(
                "AWS Secrets Manager refused GetSecretValue for %s: HTTP %d %s %r (request id %s)",
                secret_id,
                status,
                code or "(no error code)",
                str(error.get("Message", ""))[:200],
                e.response.get("ResponseMetadata", {}).get("RequestId", ""),
            )
            what = f"{code} (HTTP {status})" if code else f"HTTP {status} without an AWS error"
            if code in RETRY_LATER_CODES or status >= 500:
                raise ServiceUnavailableError(
                    f"AWS Secrets Manager is busy or failing: {what}: retry later"
                ) from None
            raise StorageError(f"AWS Secrets Manager refused GetSecretValue: {what}") from None
        except (boto.ConnectionError, boto.HTTPClientError) as e:
            log.warning("AWS Secrets Manager at %s: %s", self._where, type(e).__name__)
            raise ServiceUnavailableError(
                f"{self._where} is unreachable or did not answer within "
                f"{self._config.timeout} s: retry later"
            ) from None
        except boto.NoCredentialsError:
            raise StorageError(
                "no AWS credentials found (environment, shared files, web identity or "
                "instance role)"
            ) from None
        except boto.BotoCoreError as e:
            raise StorageError(f"AWS Secrets Manager request failed: {type(e).__name__}") from None

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        raise UnsupportedOperationError(_READ_ONLY)

    async def _delete(self, path: ResourcePath) -> bool:
        raise UnsupportedOperationError(_READ_ONLY)


def _make_client(config: AwsSecretsConfig) -> Any:
    """A boto3 Secrets Manager client with bounded timeouts and retries (at start-up)."""
    try:
        import boto3  # noqa: PLC0415  (the optional `aws` extra)
        from botocore.config import Config  # noqa: PLC0415
        from botocore.exceptions import BotoCoreError  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            "the aws resource backend needs the aws extra: pip install 'keybroker[aws]'"
        ) from None
    settings = Config(
        connect_timeout=config.timeout,
        read_timeout=config.timeout,
        retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
        user_agent_extra="keybroker",
    )
    try:
        return boto3.session.Session().client(
            "secretsmanager",
            # None: boto3's own sources (AWS_DEFAULT_REGION, the shared config file). AWS_REGION,
            # which upstream's Rust SDK reads, is mapped into `region` (keybroker.config_env).
            region_name=config.region or None,
            endpoint_url=config.endpoint_url,
            config=settings,
        )
    except BotoCoreError as e:  # NoRegionError above all
        raise ConfigError(
            f"aws backend: cannot set up the Secrets Manager client: {e} "
            "(set `region`, or AWS_REGION in the KBS environment)"
        ) from None

"""Secret backend reading Aliyun KMS secrets through a KMS instance's gateway (read-only).

Resource ``repo/type/tag`` is the KMS secret named ``tag``, as in upstream Trustee: the
repository and type are ignored, so two resources that differ only there are the same secret,
and a resource policy that tells repositories apart does not make their secrets different.
The KMS instance API has no call that writes or deletes a secret; a write or delete through the
KBS is refused with :class:`UnsupportedOperationError` (405) before anything is sent (upstream's
worker crashed instead).

The KMS instance API ("dkms-gcs" protocol, version ``dkms-gcs-0.2``): ``POST https://<instance
endpoint>/`` with a protobuf ``GetSecretValueRequest`` body, ``x-kms-*`` headers and an
``Authorization: Bearer <signature>`` header, the signature being RSA PKCS#1 v1.5 over SHA-256 of
a canonical string (method, body digest, content type, date, the sorted ``x-kms-*`` headers and
the resource ``/``) with the private key of the application access point's client key.
Errors come back as a protobuf ``Error`` (status, code, message, request id).

``SecretDataType`` ``binary`` means ``SecretData`` holds the secret in base64; this backend
releases the decoded bytes. (Upstream releases ``SecretData`` as it is, so a binary secret
reached guests as its base64 text there.) ``text`` secrets are released as UTF-8.

Why not Alibaba's ``alibabacloud-dkms-gcs`` SDK: its latest release (1.0.2) pins protobuf < 4
and pyOpenSSL < 23.3 (hence cryptography 41), which cannot be installed next to Keybroker's
gRPC stubs (protobuf 7) and cryptography 42+. The protocol is small: this module speaks it with
httpx and a few lines of protobuf wire encoding, so the ``aliyun`` extra needs nothing more.

Failures: the gateway is verified against ``cert_pem`` (the instance CA from the KMS console)
alone, never skipped, and a certificate it does not vouch for is a :class:`StorageError`. A
gateway that is unreachable, slower than ``timeout`` for the whole call, throttling, or failing
with a 5xx is :class:`ServiceUnavailableError` (503). Any other refusal (a bad signature, an
unknown client key, a clock too skewed, no permission) is a :class:`StorageError` naming the KMS
error code; KMS's own message and request id go to the log, not to the client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import ssl
from email.utils import formatdate
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
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

API_VERSION = "dkms-gcs-0.2"
SIGNATURE_METHOD = "RSA_PKCS1_SHA_256"
CONTENT_TYPE = "application/x-protobuf"
NOT_FOUND_CODES = frozenset({"Forbidden.ResourceNotFound"})
RETRY_LATER_CODES = frozenset({"Rejected.Throttling"})  # the SDK retries these
_RESPONSE_OVERHEAD = 64 * 1024  # room for the response's fields other than SecretData

# GetSecretValueRequest / GetSecretValueResponse / Error field numbers (dkms-gcs-0.2)
_REQUEST_SECRET_NAME = 1
_RESPONSE_SECRET_DATA, _RESPONSE_SECRET_DATA_TYPE = 3, 4
_ERROR_CODE, _ERROR_MESSAGE, _ERROR_REQUEST_ID = 2, 3, 4


class AliyunKmsConfig(BaseModel):
    """Upstream's ``client_key`` (the content of the ClientKey JSON file: ``KeyId`` and
    ``PrivateKeyData``), ``kms_instance_id``, ``password`` (of the client key) and ``cert_pem``
    (the instance CA); Keybroker's ``endpoint`` (``host[:port]``, default
    ``<kms_instance_id>.cryptoservice.kms.aliyuncs.com``) and ``timeout`` (seconds, for the
    whole call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_key: str = Field(repr=False, min_length=1)
    kms_instance_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
    password: str = Field(repr=False)
    cert_pem: str = Field(min_length=1)
    # A host name (or IPv4 address) and an optional port: never a scheme, path or user info.
    endpoint: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$")
    timeout: float = Field(default=5.0, gt=0, le=300)

    def host(self) -> str:
        return self.endpoint or f"{self.kms_instance_id}.cryptoservice.kms.aliyuncs.com"


class AliyunKmsSecretBackend(SecretBackend):
    def __init__(
        self,
        config: AliyunKmsConfig,
        *,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(max_bytes=max_bytes)
        self._config = config
        self._key_id, self._key = _load_client_key(config.client_key, config.password)
        try:
            # cadata alone: the system's trust store is not loaded, only the instance CA.
            self._tls = ssl.create_default_context(cadata=config.cert_pem)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(
                f"aliyun backend: cert_pem is not a usable CA certificate: {e}"
            ) from None
        # A whole response: base64 of the largest resource plus the other fields.
        self._max_response = (max_bytes + 2) // 3 * 4 + _RESPONSE_OVERHEAD
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    @classmethod
    def from_config(cls, config: AliyunKmsConfig) -> AliyunKmsSecretBackend:
        return cls(config)

    async def _read(self, path: ResourcePath) -> bytes | None:
        status, body = await self._call("GetSecretValue", _encode({_REQUEST_SECRET_NAME: path.tag}))
        if status != 200:
            self._raise_unless_missing(status, body, path)
            return None
        fields = _decode(body)
        data = fields.get(_RESPONSE_SECRET_DATA, "")
        if not isinstance(data, str):
            raise StorageError(f"KMS secret {path.tag}: SecretData is not UTF-8 text")
        if fields.get(_RESPONSE_SECRET_DATA_TYPE, "text") == "binary":
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error:
                raise StorageError(f"KMS secret {path.tag}: binary data is not base64") from None
        return data.encode("utf-8")

    async def _write(self, path: ResourcePath, data: bytes) -> None:
        raise UnsupportedOperationError(
            "the aliyun backend is read-only: manage secrets in Aliyun KMS itself"
        )

    async def _delete(self, path: ResourcePath) -> bool:
        raise UnsupportedOperationError(
            "the aliyun backend is read-only: manage secrets in Aliyun KMS itself"
        )

    def _raise_unless_missing(self, status: int, body: bytes, path: ResourcePath) -> None:
        """Return if the gateway said "no such secret"; raise for any other refusal."""
        code, message, request_id = _error_fields(body)
        if code in NOT_FOUND_CODES:
            return
        # KMS's message and request id are for the operator (and Alibaba's support), not for
        # whoever asked the KBS for the resource.
        log.warning(
            "Aliyun KMS refused GetSecretValue for %s: HTTP %d %s %r (request id %s)",
            path,
            status,
            code or "(no KMS error code)",
            message,
            request_id,
        )
        what = f"{code} (HTTP {status})" if code else f"HTTP {status} without a KMS error"
        if code in RETRY_LATER_CODES or status >= 500:
            raise ServiceUnavailableError(f"Aliyun KMS is busy or failing: {what}: retry later")
        raise StorageError(f"Aliyun KMS refused GetSecretValue: {what}")

    async def _call(self, api_name: str, body: bytes) -> tuple[int, bytes]:
        """POST one signed request within ``timeout``; the status and the response body."""
        host = self._config.host()
        try:
            async with asyncio.timeout(self._config.timeout):
                return await self._post(api_name, body)
        except (TimeoutError, httpx.TimeoutException):
            raise ServiceUnavailableError(
                f"Aliyun KMS at {host} did not answer within {self._config.timeout} s: retry later"
            ) from None
        except httpx.ConnectError as e:
            if _is_certificate_failure(e):
                raise StorageError(
                    f"TLS verification of Aliyun KMS at {host} failed: check cert_pem "
                    "(and that the endpoint is the name in the instance's certificate)"
                ) from None
            raise ServiceUnavailableError(
                f"Aliyun KMS at {host} is unreachable: retry later"
            ) from None
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(
                f"Aliyun KMS request failed: {type(e).__name__}"
            ) from None

    async def _post(self, api_name: str, body: bytes) -> tuple[int, bytes]:
        headers = self._signed_headers(api_name, body)
        async with self._http().stream("POST", "/", content=body, headers=headers) as response:
            received = bytearray()
            # Bounded read: a gateway (or whoever holds its key) cannot make the KBS buffer
            # an unbounded answer.
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > self._max_response:
                    raise StorageError(
                        f"Aliyun KMS answered with more than {self._max_response} bytes"
                    )
            return response.status_code, bytes(received)

    def _signed_headers(self, api_name: str, body: bytes) -> dict[str, str]:
        headers = {
            "accept": CONTENT_TYPE,
            "content-type": CONTENT_TYPE,
            "content-sha256": hashlib.sha256(body).hexdigest().upper(),
            "date": formatdate(usegmt=True),  # RFC 1123; KMS refuses a 15-minute skew
            "x-kms-apiversion": API_VERSION,
            "x-kms-apiname": api_name,
            "x-kms-signaturemethod": SIGNATURE_METHOD,
            "x-kms-acccesskeyid": self._key_id,  # sic: the protocol's spelling
        }
        signature = self._key.sign(
            string_to_sign("POST", headers), padding.PKCS1v15(), hashes.SHA256()
        )
        headers["authorization"] = "Bearer " + base64.b64encode(signature).decode("ascii")
        return headers

    def _http(self) -> httpx.AsyncClient:
        """This event loop's client (a connection pool belongs to one loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(
                base_url=f"https://{self._config.host()}",
                verify=self._tls,
                timeout=self._config.timeout,
                trust_env=False,  # no proxy or CA bundle from the environment
            )
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def string_to_sign(method: str, headers: dict[str, str]) -> bytes:
    """The canonical request the protocol signs (lower-case header names)."""
    kms = "".join(
        f"{name}:{headers[name].strip()}\n" for name in sorted(headers) if name.startswith("x-kms-")
    )
    head = "\n".join(
        [
            method,
            headers.get("content-sha256", ""),
            headers.get("content-type", ""),
            headers.get("date", ""),
        ]
    )
    return f"{head}\n{kms}/".encode()


def _is_certificate_failure(error: httpx.ConnectError) -> bool:
    cause = error.__cause__ or error.__context__
    return isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(error).upper()


def _error_fields(body: bytes) -> tuple[str, str, str]:
    """(ErrorCode, ErrorMessage, RequestId) of a protobuf ``Error``; empty strings when the body
    is not one (a proxy's HTML page, say)."""
    try:
        fields = _decode(body)
    except StorageError:
        return "", "", ""

    def text(number: int) -> str:
        value = fields.get(number, "")
        return value[:200] if isinstance(value, str) else ""

    return text(_ERROR_CODE), text(_ERROR_MESSAGE), text(_ERROR_REQUEST_ID)


def _load_client_key(client_key: str, password: str) -> tuple[str, rsa.RSAPrivateKey]:
    """(KeyId, private key) from a ClientKey document: a PKCS#12 bundle, base64, in JSON."""
    try:
        document = json.loads(client_key)
        key_id, bundle = document["KeyId"], base64.b64decode(document["PrivateKeyData"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ConfigError(
            "aliyun backend: client_key must be the ClientKey JSON with KeyId and PrivateKeyData"
        ) from None
    if not isinstance(key_id, str) or not key_id:
        raise ConfigError("aliyun backend: the ClientKey's KeyId must be a non-empty string")
    try:
        key, _cert, _extra = pkcs12.load_key_and_certificates(bundle, password.encode())
    except ValueError:
        raise ConfigError(
            "aliyun backend: cannot open the client key: wrong password or damaged PrivateKeyData"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("aliyun backend: the client key is not an RSA key")
    return key_id, key


def client_key_document(key: rsa.RSAPrivateKey, key_id: str, password: str) -> str:
    """A ClientKey JSON document for ``key`` (how KMS hands one out; used by tests and tools)."""
    bundle = pkcs12.serialize_key_and_certificates(
        b"client-key", key, None, None, serialization.BestAvailableEncryption(password.encode())
    )
    return json.dumps({"KeyId": key_id, "PrivateKeyData": base64.b64encode(bundle).decode()})


# --- the few protobuf wire rules these messages need -------------------------------------------
# The messages' fields are strings (wire type 2), bools and int32 (wire type 0); repeated strings
# repeat. Fixed-width fields (wire types 1 and 5) are skipped, as protobuf skips unknown fields.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _encode(fields: dict[int, str]) -> bytes:
    out = bytearray()
    for number, text in fields.items():
        data = text.encode()
        out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise StorageError("Aliyun KMS answered with a malformed protobuf message")
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def _decode(buffer: bytes) -> dict[int, Any]:
    """Field number -> value (the last one wins; strings decoded as UTF-8)."""
    fields: dict[int, Any] = {}
    position = 0
    while position < len(buffer):
        tag, position = _read_varint(buffer, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            fields[number], position = _read_varint(buffer, position)
            continue
        if wire_type == 2:
            length, position = _read_varint(buffer, position)
        elif wire_type in (1, 5):
            length = 8 if wire_type == 1 else 4
        else:
            raise StorageError(f"Aliyun KMS answered with unsupported wire type {wire_type}")
        if position + length > len(buffer):
            raise StorageError("Aliyun KMS answered with a truncated protobuf message")
        raw, position = buffer[position : position + length], position + length
        if wire_type == 2:
            try:
                fields[number] = raw.decode("utf-8")
            except UnicodeDecodeError:
                fields[number] = raw
    return fields

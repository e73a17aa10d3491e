"""Secret backend reading Aliyun KMS secrets through a KMS instance's gateway (read-only).

Resource ``repo/type/tag`` is the KMS secret named ``tag``, as in upstream Trustee: the
repository and type are ignored, so two resources that differ only there are the same secret.
Secrets are managed in KMS itself; a write or delete through the KBS is refused with a clear
error (upstream crashed the worker instead).

The KMS instance API ("dkms-gcs" protocol, version ``dkms-gcs-0.2``): ``POST https://<instance
endpoint>/`` with a protobuf ``GetSecretValueRequest`` body, ``x-kms-*`` headers and an
``Authorization: Bearer <signature>`` header, the signature being RSA PKCS#1 v1.5 over SHA-256 of
a canonical string (method, body digest, content type, date, the sorted ``x-kms-*`` headers and
the resource ``/``) with the private key of the application access point's client key.
Errors come back as a protobuf ``Error``.

Why not Alibaba's ``alibabacloud-dkms-gcs`` SDK: its latest release (1.0.2) pins protobuf < 4
and pyOpenSSL < 23.3 (hence cryptography 41), which cannot be installed next to Keybroker's
gRPC stubs (protobuf 7) and cryptography 42+. The protocol is small: this module speaks it with
httpx and a few lines of protobuf wire encoding, so the ``aliyun`` extra needs nothing more.

TLS: the gateway is verified against ``cert_pem`` (the instance CA from the KMS console), never
skipped. Timeouts and unreachable gateways are :class:`ServiceUnavailableError` (503).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
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

API_VERSION = "dkms-gcs-0.2"
SIGNATURE_METHOD = "RSA_PKCS1_SHA_256"
CONTENT_TYPE = "application/x-protobuf"
NOT_FOUND_CODES = frozenset({"Forbidden.ResourceNotFound", "ResourceNotFound"})


class AliyunKmsConfig(BaseModel):
    """Upstream's ``client_key`` (the ClientKey JSON: ``KeyId`` and ``PrivateKeyData``),
    ``kms_instance_id``, ``password`` (of the client key) and ``cert_pem`` (the instance CA);
    Keybroker's ``endpoint`` (``host[:port]``, default ``<kms_instance_id>.cryptoservice.kms.
    aliyuncs.com``) and ``timeout``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_key: str = Field(repr=False)
    kms_instance_id: str
    password: str = Field(repr=False)
    cert_pem: str
    endpoint: str | None = None
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
            self._tls = ssl.create_default_context(cadata=config.cert_pem)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(
                f"aliyun backend: cert_pem is not a usable CA certificate: {e}"
            ) from None
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def _http(self) -> httpx.AsyncClient:
        """This event loop's client (a connection pool belongs to one loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(
                base_url=f"https://{self._config.host()}",
                verify=self._tls,
                timeout=self._config.timeout,
            )
        return client

    @classmethod
    def from_config(cls, config: AliyunKmsConfig) -> AliyunKmsSecretBackend:
        return cls(config)

    async def _read(self, path: ResourcePath) -> bytes | None:
        answer = await self._call("GetSecretValue", _encode({1: path.tag}))
        if answer is None:
            return None
        fields = _decode(answer)
        data = fields.get(3, "")
        if not isinstance(data, str):
            raise StorageError(f"KMS secret {path.tag}: SecretData is not UTF-8 text")
        if fields.get(4, "text") == "binary":
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

    async def _call(self, api_name: str, body: bytes) -> bytes | None:
        """POST one signed request; the response body, or None for "no such secret"."""
        headers = self._signed_headers(api_name, body)
        try:
            response = await self._http().post("/", content=body, headers=headers)
        except httpx.TimeoutException:
            raise ServiceUnavailableError(
                f"Aliyun KMS at {self._config.host()} did not answer within "
                f"{self._config.timeout} s: retry later"
            ) from None
        except httpx.ConnectError as e:
            if isinstance(e.__cause__, ssl.SSLError) or "CERTIFICATE" in str(e).upper():
                raise StorageError(
                    f"TLS verification of Aliyun KMS at {self._config.host()} failed: "
                    "check cert_pem"
                ) from None
            raise ServiceUnavailableError(
                f"Aliyun KMS at {self._config.host()} is unreachable: retry later"
            ) from None
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(
                f"Aliyun KMS request failed: {type(e).__name__}"
            ) from None
        if response.status_code < 400:
            return response.content
        error = _decode(response.content) if response.content else {}
        code = str(error.get(2, "")) or f"HTTP {response.status_code}"
        if response.status_code == 404 or code in NOT_FOUND_CODES:
            return None
        if response.status_code >= 500:
            raise ServiceUnavailableError(f"Aliyun KMS failed ({code}): retry later")
        raise StorageError(f"Aliyun KMS refused {api_name}: {code} {error.get(3, '')}".strip())

    def _signed_headers(self, api_name: str, body: bytes) -> dict[str, str]:
        headers = {
            "accept": CONTENT_TYPE,
            "content-type": CONTENT_TYPE,
            "content-sha256": hashlib.sha256(body).hexdigest().upper(),
            "date": formatdate(usegmt=True),
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


def _load_client_key(client_key: str, password: str) -> tuple[str, rsa.RSAPrivateKey]:
    """(KeyId, private key) from a ClientKey document: a PKCS#12 bundle, base64, in JSON."""
    try:
        document = json.loads(client_key)
        key_id, bundle = document["KeyId"], base64.b64decode(document["PrivateKeyData"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ConfigError(
            "aliyun backend: client_key must be the ClientKey JSON with KeyId and PrivateKeyData"
        ) from None
    try:
        key, _cert, _extra = pkcs12.load_key_and_certificates(bundle, password.encode())
    except ValueError:
        raise ConfigError(
            "aliyun backend: cannot open the client key: wrong password or damaged PrivateKeyData"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("aliyun backend: the client key is not an RSA key")
    return str(key_id), key


def client_key_document(key: rsa.RSAPrivateKey, key_id: str, password: str) -> str:
    """A ClientKey JSON document for ``key`` (how KMS hands one out; used by tests and tools)."""
    bundle = pkcs12.serialize_key_and_certificates(
        b"client-key", key, None, None, serialization.BestAvailableEncryption(password.encode())
    )
    return json.dumps({"KeyId": key_id, "PrivateKeyData": base64.b64encode(bundle).decode()})


# --- the few protobuf wire rules these messages need -------------------------------------------
# Fields are strings (wire type 2), bools and int32 (wire type 0); repeated strings repeat.


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
        elif wire_type == 2:
            length, position = _read_varint(buffer, position)
            if position + length > len(buffer):
                raise StorageError("Aliyun KMS answered with a truncated protobuf message")
            raw = buffer[position : position + length]
            position += length
            try:
                fields[number] = raw.decode("utf-8")
            except UnicodeDecodeError:
                fields[number] = raw
        else:
            raise StorageError(f"Aliyun KMS answered with unsupported wire type {wire_type}")
    return fields

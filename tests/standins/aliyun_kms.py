"""A STAND-IN for an Aliyun KMS instance gateway, for tests: ``GetSecretValue`` only.

Not Aliyun KMS. Over real HTTPS on a loopback port it implements the KMS instance API as the
``alibabacloud-dkms-gcs`` SDK speaks it (``POST /``, protobuf bodies, API version
``dkms-gcs-0.2``): it checks the API version, signature method, ``Date`` (within 15 minutes of
its injectable clock) and body digest headers, rebuilds the canonical string from the request
as received and verifies the RSA-SHA256 signature with the public key registered for the
``x-kms-acccesskeyid``, then answers ``GetSecretValueResponse`` or a protobuf ``Error``.
Messages are built with the protobuf runtime from a descriptor with the SDK's field numbers,
independently of Keybroker's own hand-written wire codec.

Error codes: ``Forbidden.ResourceNotFound`` (404) for an unknown secret, ``InvalidApiVersion``,
``InvalidParam`` and ``RequestTimeTooSkewed`` (400) are what the KMS documentation lists; the
codes used for a bad signature, an unknown key id, a body digest mismatch and other API names
(401/400), and the status of ``Rejected.Throttling`` (429, answered to everything while
``throttled`` is set), are this stand-in's choice. No rotation, versions, stages, extended
config, permissions, real rate limits or any other API.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _messages() -> dict[str, Any]:
    """GetSecretValueRequest/Response and Error, with the SDK's field numbers and types."""
    string, boolean, int32 = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
        descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    )
    optional, repeated = (
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    layout = {
        "GetSecretValueRequest": [
            ("SecretName", string),
            ("VersionStage", string),
            ("VersionId", string),
            ("FetchExtendedConfig", boolean),
        ],
        "GetSecretValueResponse": [
            ("SecretName", string),
            ("SecretType", string),
            ("SecretData", string),
            ("SecretDataType", string),
            ("VersionStages", string),
            ("VersionId", string),
            ("CreateTime", string),
            ("RequestId", string),
            ("LastRotationDate", string),
            ("NextRotationDate", string),
            ("ExtendedConfig", string),
            ("AutomaticRotation", string),
            ("RotationInterval", string),
        ],
        "Error": [
            ("StatusCode", int32),
            ("ErrorCode", string),
            ("ErrorMessage", string),
            ("RequestId", string),
        ],
    }
    proto = descriptor_pb2.FileDescriptorProto(
        name="standin_dkms_api.proto", package="standin.dkms", syntax="proto3"
    )
    for message_name, fields in layout.items():
        message = proto.message_type.add(name=message_name)
        for number, (field_name, field_type) in enumerate(fields, start=1):
            label = repeated if field_name == "VersionStages" else optional
            message.field.add(name=field_name, number=number, type=field_type, label=label)
    pool = descriptor_pool.DescriptorPool()
    file = pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"standin.dkms.{name}"))
        for name in layout
    } | {"_file": file}


MESSAGES = _messages()


@dataclass
class KmsStandIn:
    """Secrets by name: ``(data, "text" | "binary")``; client keys by KeyId; ``now`` is the
    gateway's clock (Unix seconds)."""

    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)
    client_keys: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    now: Callable[[], float] = time.time
    throttled: bool = False
    requests: int = 0

    def put_text(self, name: str, text: str) -> None:
        self.secrets[name] = (text, "text")

    def put_binary(self, name: str, data: bytes) -> None:
        self.secrets[name] = (base64.b64encode(data).decode(), "binary")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        self.requests += 1
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        if self.throttled:
            return _error(429, "Rejected.Throttling", "too many requests")
        problem = self._check_headers(headers) or self._authenticate(headers, body)
        if problem is not None:
            return problem
        if headers.get("x-kms-apiname") != "GetSecretValue":
            return _error(400, "UnsupportedOperation", "the stand-in serves GetSecretValue only")
        wanted = MESSAGES["GetSecretValueRequest"]()
        wanted.ParseFromString(body)
        found = self.secrets.get(wanted.SecretName)
        if found is None:
            return _error(404, "Forbidden.ResourceNotFound", "The resource is not found.")
        data, data_type = found
        answer = MESSAGES["GetSecretValueResponse"](
            SecretName=wanted.SecretName,
            SecretType="Generic",
            SecretData=data,
            SecretDataType=data_type,
            VersionStages=["ACSCurrent"],
            VersionId="v1",
            RequestId="stand-in",
        )
        return Response(answer.SerializeToString(), media_type="application/x-protobuf")

    def _check_headers(self, headers: dict[str, str]) -> Response | None:
        if headers.get("x-kms-apiversion") != "dkms-gcs-0.2":
            return _error(400, "InvalidApiVersion", "the ApiVersion is invalid")
        if headers.get("x-kms-signaturemethod") != "RSA_PKCS1_SHA_256":
            return _error(400, "InvalidParam", "the Param x-kms-signaturemethod is invalid")
        try:
            sent = parsedate_to_datetime(headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return _error(400, "InvalidParam", "the Param Date is invalid")
        if abs(sent - self.now()) > 15 * 60:
            return _error(400, "RequestTimeTooSkewed", "request time is more than 15 minutes off")
        return None

    def _authenticate(self, headers: dict[str, str], body: bytes) -> Response | None:
        key = self.client_keys.get(headers.get("x-kms-acccesskeyid", ""))
        if key is None:
            return _error(401, "InvalidAccessKeyId.NotFound", "unknown client key")
        if headers.get("content-sha256") != hashlib.sha256(body).hexdigest().upper():
            return _error(400, "InvalidParameter", "content-sha256 does not match the body")
        authorization = headers.get("authorization", "")
        if not authorization.startswith("Bearer "):
            return _error(401, "Rejected.Unauthenticated", "missing signature")
        kms = "".join(
            f"{name}:{headers[name].strip()}\n"
            for name in sorted(headers)
            if name.startswith("x-kms-")
        )
        canonical = (
            f"POST\n{headers['content-sha256']}\n{headers.get('content-type', '')}\n"
            f"{headers['date']}\n{kms}/"
        )
        try:
            key.verify(
                base64.b64decode(authorization.removeprefix("Bearer ")),
                canonical.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return _error(401, "Rejected.Unauthenticated", "the signature does not verify")
        return None


def _error(status: int, code: str, message: str) -> Response:
    error = MESSAGES["Error"](
        StatusCode=status, ErrorCode=code, ErrorMessage=message, RequestId="stand-in"
    )
    return Response(
        error.SerializeToString(), status_code=status, media_type="application/x-protobuf"
    )

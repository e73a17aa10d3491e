"""The one error hierarchy of Keybroker.

Every error knows the RFC 7807 problem type it is rendered as on the wire
(``https://github.com/confidential-containers/kbs/errors/<variant>``, the variant names are
upstream's where upstream has one) and its HTTP status. One exception handler in
``keybroker.kbs.app`` renders them all; nothing else builds error responses.

Messages say what was expected and what was found. They never contain secret material:
no resource bytes, no private keys, no tokens, no policy bodies.

::

    KeybrokerError (500 InternalError)
    ├── ConfigError                    start-up only: a configuration that cannot be served
    │   └── UnsupportedFeatureError    a valid upstream setting Keybroker does not serve yet
    ├── BadRequestError (400)          malformed JSON, wrong field types, bad base64
    │   └── PolicyParseError (400)     a Rego policy that does not compile
    ├── PayloadTooLargeError (413)
    ├── UnauthenticatedError (401)
    │   ├── AttestationError (401)     RCAR failures: version, session, nonce, evidence
    │   │   └── EvidenceError (401)    a verifier rejected the evidence
    │   ├── TokenNotFoundError (401)   no attested session and no bearer token
    │   ├── TokenVerificationError (401)
    │   └── AdminUnauthenticatedError (401)
    ├── ForbiddenError (403)
    │   ├── PolicyDeniedError (403)    the resource policy said no
    │   └── AdminDeniedError (403)     admin mode or ACL said no
    ├── NotFoundError (404)
    │   ├── InvalidRequestPathError (404)
    │   ├── PluginNotFoundError (404)
    │   └── ResourceNotFoundError (404)
    ├── MethodNotAllowedError (405)
    │   └── UnsupportedOperationError  this deployment does not offer the operation
    ├── TooManyRequestsError (429)     a client is over its rate limit (carries Retry-After)
    ├── StorageError (500)             a storage backend failed (not a missing key)
    ├── JweError (500)                 the response could not be encrypted
    ├── PolicyEvaluationError (500)    a compiled policy failed while evaluating
    │   └── PolicyLimitError (500)     it passed the time or memory limit of an evaluation
    ├── ServiceUnavailableError (503)  a backing service is down
    ├── NotImplementedByBackendError (501)  the backend cannot do it (versions, listing)
    └── ClientError                    raised by the SDK (``keybroker.client``), never served
        ├── KbsConnectionError         the KBS could not be reached
        └── KbsRejectedError           the KBS answered with an error (keeps status and type)
"""

from __future__ import annotations

from typing import ClassVar

ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors"


class KeybrokerError(Exception):
    """Base of every error Keybroker raises on purpose."""

    status: ClassVar[int] = 500
    variant: ClassVar[str] = "InternalError"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def problem_type(self) -> str:
        return f"{ERROR_TYPE_PREFIX}/{self.variant}"

    def problem(self) -> dict[str, str]:
        """The RFC 7807 body (upstream's ``ErrorInformation``)."""
        return {"type": self.problem_type, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        """HTTP headers the rendered error carries besides its body (none by default)."""
        return {}


class ConfigError(KeybrokerError):
    variant = "ConfigError"


class UnsupportedFeatureError(ConfigError):
    """An upstream setting that parses but is not served by this version of Keybroker."""

    variant = "UnsupportedFeature"

    def __init__(self, feature: str, hint: str = "") -> None:
        message = f"not supported yet: {feature}"
        super().__init__(f"{message} ({hint})" if hint else message)
        self.feature = feature


class BadRequestError(KeybrokerError):
    status = 400
    variant = "MalformedRequest"


class PolicyParseError(BadRequestError):
    variant = "ParsePolicyError"


class PayloadTooLargeError(KeybrokerError):
    status = 413
    variant = "PayloadTooLarge"


class UnauthenticatedError(KeybrokerError):
    status = 401
    variant = "Unauthenticated"


class AttestationError(UnauthenticatedError):
    variant = "AttestationError"


class EvidenceError(AttestationError):
    """A verifier could not verify the evidence, or the evidence does not bind what it must."""


class TokenNotFoundError(UnauthenticatedError):
    variant = "TokenNotFound"


class TokenVerificationError(UnauthenticatedError):
    variant = "TokenVerifierError"


class AdminUnauthenticatedError(UnauthenticatedError):
    variant = "AdminAuthAccess"


class ForbiddenError(KeybrokerError):
    status = 403
    variant = "Forbidden"


class PolicyDeniedError(ForbiddenError):
    variant = "PolicyDeny"


class AdminDeniedError(ForbiddenError):
    variant = "AdminAuthAccess"


class NotFoundError(KeybrokerError):
    status = 404
    variant = "NotFound"


class InvalidRequestPathError(NotFoundError):
    variant = "InvalidRequestPath"


class PluginNotFoundError(NotFoundError):
    variant = "PluginNotFound"


class ResourceNotFoundError(NotFoundError):
    variant = "ResourceNotFound"


class MethodNotAllowedError(KeybrokerError):
    """The endpoint does not answer the method; ``allow`` names those it does (RFC 9110 requires
    the ``Allow`` header on a 405; it is empty when the deployment offers no method here)."""

    status = 405
    variant = "MethodNotAllowed"

    def __init__(self, detail: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class UnsupportedOperationError(MethodNotAllowedError):
    variant = "UnsupportedOperation"


class TooManyRequestsError(KeybrokerError):
    """Over a rate limit; ``retry_after`` whole seconds until a request would be admitted."""

    status = 429
    variant = "TooManyRequests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StorageError(KeybrokerError):
    variant = "StorageError"


class JweError(KeybrokerError):
    variant = "JweError"


class PolicyEvaluationError(KeybrokerError):
    variant = "PolicyEngineError"


class PolicyLimitError(PolicyEvaluationError):
    """The evaluation passed ``[policy] timeout_seconds`` or ``memory_mib``; its worker was
    killed."""


class ServiceUnavailableError(KeybrokerError):
    status = 503
    variant = "ServiceUnavailable"


class NotImplementedByBackendError(KeybrokerError):
    """The operation exists, but the configured backend does not offer it (a read-only
    backend asked to list, a backend without versions asked for one)."""

    status = 501
    variant = "NotImplemented"


class ClientError(KeybrokerError):
    variant = "ClientError"


class KbsConnectionError(ClientError):
    variant = "ConnectionError"


class KbsRejectedError(ClientError):
    """The KBS refused a request. ``status`` and ``problem`` are the server's."""

    def __init__(self, http_status: int, problem_type: str, detail: str) -> None:
        super().__init__(f"KBS answered {http_status}: {detail}")
        self.http_status = http_status
        self.remote_type = problem_type
        self.remote_detail = detail

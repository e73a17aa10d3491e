"""Attestation-token verification on the KBS side, and finding the TEE key a token vouches for.

A token is accepted only if its signature verifies with a trusted key and it has not expired.
The builtin Attestation Service's signing key is trusted automatically (it lives in this
process). Trust in other issuers (certificate chains, JWKS: passport mode) arrives with the
passport issue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keybroker.errors import BadRequestError, TokenVerificationError
from keybroker.protocol.jwk import TeePublicKey, parse_tee_pubkey
from keybroker.protocol.jws import verify_jwt
from keybroker.protocol.models import JsonValue

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Where each issuer puts the guest's key (JSON pointers), tried after the configured ones.
DEFAULT_TEE_PUBKEY_PATHS = (
    "/tdx/attester_runtime_data/tee-pubkey",
    "/tdx/attester_user_data/tee-pubkey",
    "/customized_claims/runtime_data/tee-pubkey",
    "/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey",
    "/tee-pubkey",
)


class TokenVerifier:
    def __init__(
        self,
        trusted_keys: Sequence[PublicKey],
        *,
        extra_teekey_paths: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._trusted_keys = list(trusted_keys)
        self._paths = [*extra_teekey_paths, *DEFAULT_TEE_PUBKEY_PATHS]
        self._clock = clock

    def verify(self, token: str) -> dict[str, JsonValue]:
        if not self._trusted_keys:
            raise TokenVerificationError(
                "no trusted token issuers are configured, so no attestation token is accepted"
            )
        errors: list[str] = []
        for key in self._trusted_keys:
            try:
                return verify_jwt(token, key, now=self._clock())
            except TokenVerificationError as e:
                errors.append(e.detail)
        raise TokenVerificationError(f"attestation token not accepted: {errors[-1]}")

    def tee_pubkey(self, claims: dict[str, JsonValue]) -> TeePublicKey:
        for path in self._paths:
            value = pointer(claims, path)
            if value is not None:
                try:
                    return parse_tee_pubkey(value)
                except BadRequestError as e:
                    raise TokenVerificationError(
                        f"the token's tee-pubkey at {path} is unusable: {e.detail}"
                    ) from None
        raise TokenVerificationError("the attestation token carries no tee-pubkey claim")


def pointer(document: JsonValue, pointer: str) -> JsonValue:
    """RFC 6901 lookup; None when absent."""
    node = document
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node

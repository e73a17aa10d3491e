"""Canonical JSON (RFC 8785, JCS) and the runtime-data digest that binds a guest's evidence to
its RCAR session.

The digest is ``H(JCS({"tee-pubkey": <normalized JWK>, "nonce": ..., "additional-evidence":
<string>}))``. ``additional-evidence`` is present even when empty. ``json.dumps(sort_keys=True)``
is not JCS (numbers and escapes differ), hence the real implementation.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

import rfc8785

from keybroker.protocol.models import JsonValue


class HashAlgorithm(StrEnum):
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.value, data).digest()

    @classmethod
    def parse(cls, name: str) -> HashAlgorithm:
        try:
            return cls(name.lower())
        except ValueError:
            raise ValueError(
                f"unsupported hash algorithm {name[:32]!r}: expected sha256, sha384 or sha512"
            ) from None


DEFAULT_HASH_ALGORITHM = HashAlgorithm.SHA384


def jcs(value: JsonValue) -> bytes:
    """RFC 8785 canonical serialization."""
    return rfc8785.dumps(value)


def runtime_data(
    nonce: str, tee_pubkey: dict[str, str], additional_evidence: str | None
) -> dict[str, JsonValue]:
    """The structured runtime data: with ``additional-evidence`` for the primary attester,
    without it (``None``) for device attesters."""
    data: dict[str, JsonValue] = {"tee-pubkey": tee_pubkey, "nonce": nonce}
    if additional_evidence is not None:
        data["additional-evidence"] = additional_evidence
    return data


def runtime_data_digest(data: dict[str, JsonValue], algorithm: HashAlgorithm) -> bytes:
    return algorithm.digest(jcs(data))

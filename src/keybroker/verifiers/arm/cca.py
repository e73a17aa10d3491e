"""The Arm CCA verifiers: platform and realm signatures, RAK binding, session bindings.

Evidence, as upstream's attester sends it: ``{"token": [bytes…]}`` (the CCA attestation token
from configfs-tsm, serialized by serde as a list of byte values).

What :class:`CcaVerifier` proves, failing closed with :class:`EvidenceError` at the first doubt:

1. the token decodes (:mod:`keybroker.verifiers.arm.cca_token`: bounded CBOR, mandatory claims,
   sizes);
2. the platform's instance id is in the trust-anchor store, whose CPAK signed the platform
   token (the algorithm pinned to the CPAK's curve), and whose implementation id is the
   token's (a CPAK endorsed for one implementation cannot vouch for another);
3. the platform's firmware state (configuration and every software component, in order) is
   one the reference-value store endorses for that implementation;
4. the RAK carried in the realm token signed the realm token, and the platform token's
   challenge is the hash of that RAK (the RAK binding: the platform vouches for this key);
5. the realm challenge is the session's runtime-data digest zero-padded to 64 bytes, and the
   personalization value the init-data digest padded to 64 (when init data is given).

Steps 2 to 4 are those upstream's local mode gets from Veraison's ``ccatoken`` (upstream
denies unless the realm's instance identity is affirmed, which needs all three). In remote
mode (:class:`CcaRemoteVerifier`) steps 1, 4 and 5 still run here, first; steps 2 and 3 are
a Veraison service's (:mod:`keybroker.verifiers.arm.veraison`). What it does
not do: judge the realm measurements or the platform lifecycle; the attestation policy does,
on the claims returned here (upstream's names; see docs/verifiers-arm-cca.md).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from typing import Any

from keybroker.errors import ConfigError, EvidenceError
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.arm.cca_store import (
    CcaEndorsements,
    CcaRemoteSettings,
    cca_settings,
    load_endorsements,
)
from keybroker.verifiers.arm.cca_token import (
    MAX_TOKEN_BYTES,
    CcaToken,
    PlatformClaims,
    RealmClaims,
    parse_token,
    rak_digest,
    realm_public_key,
    verify_sign1,
)
from keybroker.verifiers.arm.veraison import VeraisonClient, appraise_ear
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.intel.verifier import padded


def token_bytes(unverified: JsonValue) -> bytes:
    """The token of upstream's ``CcaEvidence`` JSON."""
    token = unverified.get("token") if isinstance(unverified, dict) else None
    if not isinstance(token, list):
        raise EvidenceError("cca evidence must be an object with a `token` list of bytes")
    if len(token) > MAX_TOKEN_BYTES:
        raise EvidenceError(
            f"the CCA token is {len(token)} bytes, more than the {MAX_TOKEN_BYTES} allowed"
        )
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in token):
        raise EvidenceError("cca evidence `token` is not a list of bytes")
    try:
        return bytes(token)  # ints checked above; ValueError unless each is 0..255
    except ValueError:
        raise EvidenceError("cca evidence `token` is not a list of bytes") from None


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _platform_claims(p: PlatformClaims) -> dict[str, JsonValue]:
    components: list[JsonValue] = []
    for c in p.sw_components:
        component: dict[str, JsonValue] = {}
        if c.measurement_type is not None:
            component["measurement-type"] = c.measurement_type
        component["measurement-value"] = _b64(c.measurement_value)
        if c.version is not None:
            component["version"] = c.version
        component["signer-id"] = _b64(c.signer_id)
        if c.hash_algo_id is not None:
            component["hash-algo-id"] = c.hash_algo_id
        components.append(component)
    claims: dict[str, JsonValue] = {
        # the two upstream's verifier reports, then the rest under Veraison's claim names
        "cca-platform-instance-id": _b64(p.instance_id),
        "cca-platform-implementation-id": _b64(p.implementation_id),
        "cca-platform-profile": p.profile,
        "cca-platform-challenge": _b64(p.challenge),
        "cca-platform-config": _b64(p.config),
        "cca-platform-lifecycle": p.lifecycle,
        "cca-platform-sw-components": components,
        "cca-platform-hash-algo-id": p.hash_algo_id,
    }
    if p.service_indicator is not None:
        claims["cca-platform-service-indicator"] = p.service_indicator
    return claims


def _realm_claims(r: RealmClaims) -> dict[str, JsonValue]:
    claims: dict[str, JsonValue] = {
        "cca-realm-personalization-value": _b64(r.personalization_value),
        "cca-realm-initial-measurement": _b64(r.initial_measurement),
        "cca-realm-extensible-measurements": [_b64(m) for m in r.extensible_measurements],
        "cca-realm-hash-algo-id": r.hash_algo_id,
        "cca-realm-challenge": _b64(r.challenge),
        "cca-realm-public-key": _b64(r.public_key),
        "cca-realm-public-key-hash-algo-id": r.public_key_hash_algo_id,
    }
    if r.profile is not None:
        claims["cca-realm-profile"] = r.profile
    return claims


def cca_claims(token: CcaToken) -> dict[str, JsonValue]:
    """Upstream's claim layout: ``realm``, ``platform``, and the bindings in hex."""
    return {
        "realm": _realm_claims(token.realm),
        "platform": _platform_claims(token.platform),
        "report_data": token.realm.challenge.hex(),
        "init_data": token.realm.personalization_value.hex(),
    }


def checked_token(
    unverified_evidence: JsonValue,
    expected_report_data: bytes | None,
    expected_init_data: bytes | None,
) -> tuple[bytes, CcaToken]:
    """The token, decoded, bound to this session (steps 1 and 5), and its realm signed by the
    RAK the platform vouches for (step 4). What is left is the platform's trust."""
    if expected_report_data is None:
        raise EvidenceError("the CCA verifier needs the runtime data the token must bind")
    raw = token_bytes(unverified_evidence)
    token = parse_token(raw)
    # cheap binding checks first: a token for another session costs no signature check
    if token.realm.challenge != padded(expected_report_data, 64, "the runtime-data digest"):
        raise EvidenceError(
            "the CCA realm challenge does not match the digest of the session's runtime data"
        )
    if expected_init_data is not None and token.realm.personalization_value != padded(
        expected_init_data, 64, "the init-data digest"
    ):
        raise EvidenceError(
            "the CCA realm personalization value does not match the init-data digest"
        )
    verify_sign1(token.realm_envelope, realm_public_key(token.realm), "realm token")
    if rak_digest(token.realm) != token.platform.challenge:
        raise EvidenceError(
            "the CCA platform token's challenge is not the hash of the realm's RAK: the "
            "platform does not vouch for the key that signed the realm token"
        )
    return raw, token


class CcaVerifier(Verifier):
    """Local mode: the platform judged against the operator's stores (steps 2 and 3)."""

    tee = Tee.CCA

    def __init__(self, endorsements: CcaEndorsements | None) -> None:
        """``endorsements``: the local trust anchors and platform reference values; None when
        CCA is not configured, and then every token is refused."""
        self._endorsements = endorsements

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        if self._endorsements is None:
            raise EvidenceError(
                "no CCA platform is trusted: set [attestation_service.verifier_config.cca] "
                "with a ta-store and an rv-store"
            )
        _, token = checked_token(unverified_evidence, expected_report_data, expected_init_data)
        self._verify_platform(token, self._endorsements)
        return [TeeClaims(Tee.CCA, "cpu", cca_claims(token))]

    @staticmethod
    def _verify_platform(token: CcaToken, endorsements: CcaEndorsements) -> None:
        platform = token.platform
        anchor = endorsements.trust_anchors.get(platform.instance_id)
        if anchor is None:
            raise EvidenceError(
                f"the CCA platform instance {platform.instance_id.hex()} is not in the trust "
                "anchor store"
            )
        if anchor.implementation_id != platform.implementation_id:
            raise EvidenceError(
                f"the CCA platform instance {platform.instance_id.hex()} is endorsed for "
                f"implementation {anchor.implementation_id.hex()}, not "
                f"{platform.implementation_id.hex()}"
            )
        verify_sign1(token.platform_envelope, anchor.cpak, "platform token")
        references = endorsements.platforms.get(platform.implementation_id, ())
        if not references:
            raise EvidenceError(
                f"no reference values endorse CCA platform implementation "
                f"{platform.implementation_id.hex()}"
            )
        if not any(r.matches(platform.config, platform.sw_components) for r in references):
            raise EvidenceError(
                "the CCA platform's configuration and firmware components match none of the "
                "reference values endorsed for its implementation"
            )


class CcaRemoteVerifier(Verifier):
    """Remote mode: the platform judged by a Veraison service (steps 2 and 3 are its work);
    the claims still come from the token itself, the one Veraison appraised."""

    tee = Tee.CCA
    may_block = True  # a round trip to the service: off the event loop

    def __init__(self, client: VeraisonClient, *, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock

    def _verify(
        self,
        unverified_evidence: JsonValue,
        *,
        expected_report_data: bytes | None,
        expected_init_data: bytes | None,
    ) -> list[TeeClaims]:
        raw, token = checked_token(unverified_evidence, expected_report_data, expected_init_data)
        ear, key = self._client.appraise(raw, token.realm.challenge)
        appraise_ear(ear, key, token.realm.challenge, now=self._clock)
        return [TeeClaims(Tee.CCA, "cpu", cca_claims(token))]


def build_cca_verifier(
    verifier_config: Mapping[str, Any] | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Verifier:
    """The CCA verifier the configuration describes (local, remote, or refusing every token
    when CCA is not configured). Stores and CA files are read now, at start-up."""
    settings = cca_settings(verifier_config)
    if isinstance(settings, CcaRemoteSettings):
        try:
            ca_pem = settings.ca_cert.read_bytes() if settings.ca_cert else None
        except OSError as e:
            raise ConfigError(
                f"cannot read the CCA ca-cert {settings.ca_cert}: {e.strerror}"
            ) from e
        client = VeraisonClient(
            settings.address,
            ca_pem=ca_pem,
            timeout=settings.timeout,
            insecure_http=settings.insecure_http,
        )
        return CcaRemoteVerifier(client, clock=clock)
    return CcaVerifier(None if settings is None else load_endorsements(settings))


__all__ = [
    "CcaRemoteVerifier",
    "CcaVerifier",
    "build_cca_verifier",
    "cca_claims",
    "checked_token",
    "token_bytes",
]

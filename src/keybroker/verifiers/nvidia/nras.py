"""NVIDIA's Remote Attestation Service (NRAS): the client (the only NVIDIA I/O) and the checks
on what it answers.

Upstream's remote mode, kept wire-compatible: for each device, ``POST <verifier_url>/gpu`` (or
``/switch``) with ``{"nonce": <hex>, "arch": "HOPPER", "evidence_list": [{"evidence": <base64>,
"certificate": <base64 PEM>}], "claims_version": "3.0"}``. NRAS answers ``[["JWT", <overall
token>], {<submodule>: <detached EAT>}]``; both are ES384 JWTs signed by a key of NRAS's JWK set
(``/.well-known/jwks.json``, found by the header ``kid``).

:class:`NrasClient` moves bytes and is trusted for nothing but availability: it talks to NRAS
through the one collateral fetcher's ``HttpsSource`` (no plain HTTP unless ``insecure_http``,
bodies capped, a total deadline). :func:`nras_claims` proves the
answer: exactly one overall token and one EAT, each signed (ES384 only) by a key of the JWK set,
each inside its ``nbf``/``exp`` window at the injected time with ``iss`` and ``iat`` present;
the EAT says the report's nonce matched. The claims are the EAT's, plus the overall token's
``x-nvidia-overall-att-result`` (upstream's shape).

:func:`ppcie_claims` is upstream's protected-PCIe topology check over the devices' claims.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence

import httpx

from keybroker.errors import (
    EvidenceError,
    ServiceUnavailableError,
    TokenVerificationError,
)
from keybroker.protocol.jws import decode_unverified, public_key_from_jwk, verify_jwt
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.collateral_fetch import HttpsSource

NRAS_URL = "https://nras.attestation.nvidia.com/v4/attest"
NRAS_JWKS_URL = "https://nras.attestation.nvidia.com/.well-known/jwks.json"
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_JWKS_KEYS = 64
_REQUIRED = ("exp", "iat", "iss", "nbf")  # upstream's validation struct


class NrasClient:
    """POSTs evidence to NRAS and fetches its JWK set (cached; fetched again on an unknown kid,
    at most once per answer)."""

    def __init__(
        self,
        verifier_url: str = NRAS_URL,
        jwks_url: str = NRAS_JWKS_URL,
        *,
        timeout: float = 60.0,
        ca_pem: bytes | None = None,
        insecure_http: bool = False,
        client: httpx.Client | None = None,
    ) -> None:
        self._source = HttpsSource(
            verifier_url,
            service="NRAS",
            max_bytes=MAX_RESPONSE_BYTES,
            timeout=timeout,
            ca_pem=ca_pem,
            client=client,
            insecure_http=insecure_http,
        )
        self._source.check_url(jwks_url)
        self._jwks_url = jwks_url
        self._keys: dict[str, Mapping[str, JsonValue]] | None = None
        self._lock = threading.Lock()

    def attest(self, endpoint: str, body: dict[str, JsonValue]) -> bytes:
        """NRAS's answer to one device's evidence; EvidenceError when NRAS refuses it (4xx),
        ServiceUnavailableError when NRAS cannot be reached or fails (5xx)."""
        answer = self._source.send("POST", f"/{endpoint}", json=body)
        if 400 <= answer.status < 500:
            raise EvidenceError(f"NRAS refused the {endpoint} evidence (HTTP {answer.status})")
        if answer.status != 200:
            raise ServiceUnavailableError(f"NRAS {answer.url} answered HTTP {answer.status}")
        return answer.body

    def keys(self, *, refresh: bool = False) -> dict[str, Mapping[str, JsonValue]]:
        with self._lock:
            if self._keys is None or refresh:
                self._keys = self._fetch_keys()
            return self._keys

    def _fetch_keys(self) -> dict[str, Mapping[str, JsonValue]]:
        answer = self._source.send("GET", self._jwks_url)
        if answer.status != 200:
            raise ServiceUnavailableError(
                f"NRAS JWK set {self._jwks_url} answered HTTP {answer.status}"
            )
        try:
            document = json.loads(answer.body)
            keys = document["keys"]
        except (ValueError, KeyError, TypeError):
            raise ServiceUnavailableError("NRAS's JWK set is not a JWK set") from None
        if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
            raise ServiceUnavailableError("NRAS's JWK set is not a list of at most 64 keys")
        return {str(key["kid"]): key for key in keys if isinstance(key, dict) and "kid" in key}


def nras_claims(
    unverified_answer: bytes, client: NrasClient, endpoint: str, now: float
) -> dict[str, JsonValue]:
    """The claims of a verified NRAS answer for one device (see the module docstring)."""
    overall, eat = _tokens(unverified_answer)
    overall_claims = _verified(overall, client, now, "overall token")
    claims = _verified(eat, client, now, "detached EAT")
    match = claims.get(f"x-nvidia-{endpoint}-attestation-report-nonce-match")
    if match is not True:
        raise EvidenceError(
            "NRAS reports that the device's nonce does not bind this session's runtime data"
        )
    if "x-nvidia-overall-att-result" in overall_claims:
        claims["x-nvidia-overall-att-result"] = overall_claims["x-nvidia-overall-att-result"]
    return claims


def _tokens(unverified_answer: bytes) -> tuple[str, str]:
    try:
        document = json.loads(unverified_answer)
    except ValueError:
        raise EvidenceError("NRAS's answer is not JSON") from None
    if not (isinstance(document, list) and len(document) == 2):
        raise EvidenceError("NRAS's answer is not [overall token, detached EATs]")
    overall, detached = document
    if not (isinstance(overall, list) and len(overall) == 2 and isinstance(overall[1], str)):
        raise EvidenceError('NRAS\'s overall token is not ["JWT", token]')
    if not (isinstance(detached, dict) and len(detached) == 1):
        raise EvidenceError("NRAS's answer must carry exactly one detached EAT")
    (eat,) = detached.values()
    if not isinstance(eat, str):
        raise EvidenceError("NRAS's detached EAT is not a token")
    return overall[1], eat


def _verified(token: str, client: NrasClient, now: float, what: str) -> dict[str, JsonValue]:
    try:
        header, _ = decode_unverified(token)
    except TokenVerificationError as e:
        raise EvidenceError(f"NRAS's {what} is malformed: {e.detail}") from None
    if header.get("alg") != "ES384":
        raise EvidenceError(f"NRAS's {what} is not ES384-signed")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise EvidenceError(f"NRAS's {what} names no key (kid)")
    jwk = client.keys().get(kid) or client.keys(refresh=True).get(kid)
    if jwk is None:
        raise EvidenceError(f"NRAS's {what} is signed by a key not in NRAS's JWK set")
    try:
        claims = verify_jwt(token, public_key_from_jwk(jwk), now=now)
    except TokenVerificationError as e:
        raise EvidenceError(f"NRAS's {what} does not verify: {e.detail}") from None
    missing = [name for name in _REQUIRED if name not in claims]
    if missing:
        raise EvidenceError(f"NRAS's {what} lacks {', '.join(missing)}")
    return dict(claims)


def ppcie_claims(devices: Sequence[tuple[str, Mapping[str, JsonValue]]]) -> dict[str, JsonValue]:
    """Upstream's protected-PCIe topology: 12 devices, 8 GPUs each linked to 4 switches, 4
    switches each linked to 8 GPUs. EvidenceError (not a topology) otherwise."""
    if len(devices) != 12:
        raise EvidenceError("PPCIE needs 12 devices")
    gpu_pdis: set[str] = set()
    switch_pdis: set[str] = set()
    for tee_class, claims in devices:
        if tee_class == "gpu":
            linked = _strings(claims.get("x-nvidia-gpu-switch-pdis"))
            active = [pdi for pdi in linked if "0000000000000000" not in pdi]
            if len(active) != 4:
                raise EvidenceError("each PPCIE GPU must link 4 switches")
            switch_pdis.update(active)
        elif tee_class == "switch":
            own = claims.get("x-nvidia-switch-pdi")
            gpus = _strings(claims.get("x-nvidia-switch-gpu-pdis"))
            if not isinstance(own, str) or len(gpus) != 8:
                raise EvidenceError("each PPCIE switch must name itself and link 8 GPUs")
            switch_pdis.add(own)
            gpu_pdis.update(gpus)
    if len(gpu_pdis) != 8 or len(switch_pdis) != 4:
        raise EvidenceError("a PPCIE topology has 8 GPUs and 4 switches")
    return {"switch_count": 4, "gpu_count": 8}


def _strings(value: JsonValue) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvidenceError("PPCIE device links must be a list of strings")
    return list(value)

"""The KBS's client for Intel Trust Authority (``[attestation_service] type = "intel_ta"``).

ITA is a remote attestation service for Intel TDX and SGX (and Azure TDX confidential VMs).
The KBS makes the ``/auth`` nonce itself, as upstream does (ITA's own nonce endpoint is not
used), and at ``/attest`` posts the guest's quote with its runtime data to
``{base_url}/appraisal/v2/attest`` (``…/attest/azure`` for ``az-tdx-vtpm``). ITA checks that the
quote's report data is the hash of that runtime data (SHA-512 for TDX, SHA-256 for SGX and Azure
TDX: :data:`HASH_ALGORITHMS`, negotiated at ``/auth``), appraises the quote against the
operator's ITA policies and answers a signed JWT, which becomes the session's attestation token.

What this module checks before it accepts that token, beyond upstream (which only checks the
signature, and accepts a signer key carried in the token header):

- the signature, with a key from ITA's JWK set (``certs_file``) found by ``kid``; a key in the
  token header is refused; the algorithm must be PS384 or RS256; ``exp`` must be present and
  in the future;
- the runtime data ITA echoes (``<tdx|sgx>.attester_runtime_data``, or ``tdx.attester_user_data``
  for Azure) is exactly what this session sent: this session's nonce and the guest's
  ``tee-pubkey``; a token for another session is useless here;
- ``policy_ids_unmatched`` is empty, unless ``allow_unmatched_policy = true``.

Failures: ITA unreachable, slow past ``request_timeout`` or answering anything but 200 or a 4xx
(5xx, 429, a redirect) → 503; any other 4xx → 401 naming ITA's status and error message. The
API key is sent only in the ``x-api-key`` header and never appears in a log line or an error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlparse

import httpx

from keybroker.attestation.service import AttestationBackend, EvidenceToVerify
from keybroker.config import IntelTaConfig
from keybroker.errors import (
    AttestationError,
    ConfigError,
    EvidenceError,
    KeybrokerError,
    ServiceUnavailableError,
)
from keybroker.kbs.tokens import TokenVerifier
from keybroker.protocol.canonical import HashAlgorithm, jcs
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.azure.az_hcl import HclReportType, parse_hcl_report
from keybroker.verifiers.azure.az_tdx_vtpm import parse_evidence as parse_az_tdx_evidence

log = logging.getLogger(__name__)

ATTEST_PATH = "/appraisal/v2/attest"
AZURE_SUFFIX = "/azure"
# The runtime-data hash ITA checks in each TEE's report data (upstream's negotiation).
HASH_ALGORITHMS = {
    Tee.TDX: HashAlgorithm.SHA512,
    Tee.SGX: HashAlgorithm.SHA256,
    Tee.AZ_TDX_VTPM: HashAlgorithm.SHA256,
}
TOKEN_ALGORITHMS = frozenset({"PS384", "RS256"})
GPU_ARCHITECTURES = frozenset({"HOPPER", "BLACKWELL"})  # the NVIDIA GPUs ITA appraises
MAX_RESPONSE_BYTES = 1024 * 1024
_MAX_ERROR_CHARS = 200


def _user_agent() -> str:
    try:
        return f"keybroker/{version('keybroker')}"
    except PackageNotFoundError:
        return "keybroker"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _shown(text: str) -> str:
    """ITA's error text, bounded and printable, for an error detail."""
    return "".join(c if c.isprintable() else "?" for c in text[:_MAX_ERROR_CHARS])


class IntelTrustAuthority(AttestationBackend):
    def __init__(
        self,
        config: IntelTaConfig,
        tokens: TokenVerifier,
    ) -> None:
        """``tokens``: a verifier that trusts ITA's JWK set and nothing else. ITA is reached
        over HTTPS with the system's trust store, or the CA file named by ``SSL_CERT_FILE``."""
        parsed = urlparse(config.base_url)
        if parsed.scheme != "https" or not parsed.hostname:
            # the API key travels in a header: never over plain HTTP or to a relative URL
            raise ConfigError(
                f"[attestation_service] base_url must be an https:// URL, found "
                f"{config.base_url[:80]!r}"
            )
        self._config = config
        self._tokens = tokens
        self._base_url = config.base_url.rstrip("/")

    def supports(self, tee: Tee) -> bool:
        return tee in HASH_ALGORITHMS

    def required_hash_algorithm(self, tee: Tee) -> HashAlgorithm | None:
        return HASH_ALGORITHMS.get(tee)

    @property
    def policy_must_match(self) -> bool:
        """Upstream's rule: ITA itself refuses a mismatch when policies are named, unless the
        operator allows unmatched policies."""
        return bool(self._config.policy_ids) and not self._config.allow_unmatched_policy

    async def verify(self, evidence: list[EvidenceToVerify]) -> str:
        primary = evidence[0]
        body, suffix = attest_request(
            evidence, list(self._config.policy_ids), self.policy_must_match
        )
        token = await self._post(f"{self._base_url}{ATTEST_PATH}{suffix}", body)
        claims = await self._verified_claims(token)
        check_runtime_data(claims, primary)
        check_policies(claims, allow_unmatched=bool(self._config.allow_unmatched_policy))
        return token

    async def _post(self, url: str, body: dict[str, JsonValue]) -> str:
        headers = {
            "x-api-key": self._config.api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": _user_agent(),
        }
        timeout = self._config.request_timeout
        try:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
                # the whole exchange, not each read: a service trickling bytes cannot hold us
                async with asyncio.timeout(timeout):
                    status, payload = await _exchange(
                        client, url, json.dumps(body).encode(), headers
                    )
        except (httpx.HTTPError, TimeoutError) as e:
            slow = isinstance(e, TimeoutError | httpx.TimeoutException)
            reason = "timed out" if slow else "unreachable"
            log.error(
                "Intel Trust Authority at %s: %s (%s)", self._base_url, reason, type(e).__name__
            )
            raise ServiceUnavailableError(
                f"Intel Trust Authority at {self._base_url} is unavailable ({reason}): retry later"
            ) from None
        return self._token_from(status, payload)

    def _token_from(self, status: int, payload: JsonValue) -> str:
        if status == 200:
            token = payload.get("token") if isinstance(payload, dict) else None
            if not isinstance(token, str):
                raise ServiceUnavailableError(
                    "Intel Trust Authority answered 200 without a token: retry later"
                )
            return token
        message = payload.get("error") if isinstance(payload, dict) else None
        shown = f": {_shown(message)}" if isinstance(message, str) else ""
        refused_by_ita = 400 <= status < 500 and status != 429
        if not refused_by_ita:  # ITA's trouble (5xx, 429) or a redirect: not the guest's fault
            log.error(
                "Intel Trust Authority at %s answered HTTP %d%s", self._base_url, status, shown
            )
            raise ServiceUnavailableError(
                f"Intel Trust Authority at {self._base_url} answered HTTP {status}: retry later"
            )
        if status in (401, 403):
            log.error(
                "Intel Trust Authority refused this KBS's credentials (HTTP %d): check "
                "[attestation_service] api_key",
                status,
            )
        raise AttestationError(f"Intel Trust Authority refused the evidence: HTTP {status}{shown}")

    async def _verified_claims(self, unverified_token: str) -> dict[str, JsonValue]:
        try:
            header, _ = decode_unverified(unverified_token)
            if "jwk" in header:
                raise AttestationError(
                    "the token carries its own signer key; Intel Trust Authority tokens are "
                    "verified with the configured certs_file keys only"
                )
            alg = header.get("alg")
            if alg not in TOKEN_ALGORITHMS:
                raise AttestationError(
                    f"token algorithm {str(alg)[:16]!r} is not one Intel Trust Authority signs "
                    "with (PS384 or RS256)"
                )
            if not isinstance(header.get("kid"), str):
                raise AttestationError("the token names no key (kid)")
            await self._tokens.ensure_keys(unverified_token)
            claims = await asyncio.to_thread(self._tokens.verify, unverified_token)
        except KeybrokerError as e:
            if isinstance(e, ServiceUnavailableError):
                raise
            raise AttestationError(
                f"the Intel Trust Authority token is not accepted: {e.detail}"
            ) from None
        if "exp" not in claims:
            raise AttestationError("the Intel Trust Authority token has no expiry (exp)")
        return claims


async def _exchange(
    client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int, JsonValue]:
    """POST and read a bounded JSON answer: (status, parsed body, or None if it is not JSON)."""
    async with client.stream("POST", url, content=body, headers=dict(headers)) as response:
        received = bytearray()
        async for chunk in response.aiter_bytes():
            received += chunk
            if len(received) > MAX_RESPONSE_BYTES:
                raise ServiceUnavailableError(
                    f"Intel Trust Authority answered more than {MAX_RESPONSE_BYTES} bytes"
                )
        try:
            payload: JsonValue = json.loads(received)
        except ValueError:
            payload = None
        return response.status_code, payload


def attest_request(
    evidence: list[EvidenceToVerify], policy_ids: list[str], policy_must_match: bool
) -> tuple[dict[str, JsonValue], str]:
    """The body of an ITA v2 attest request, and the URL suffix (``/azure`` or nothing)."""
    body: dict[str, JsonValue] = {"policy_ids": policy_ids, "policy_must_match": policy_must_match}
    suffix = ""
    for item in evidence:
        if item.runtime_data is None:  # the KBS always sends structured runtime data
            raise AttestationError("Intel Trust Authority needs structured runtime data")
        runtime = jcs(item.runtime_data)
        if item.tee in (Tee.TDX, Tee.SGX):
            body[item.tee.value] = _dcap_evidence(item.unverified_evidence, item.tee, runtime)
        elif item.tee is Tee.AZ_TDX_VTPM:
            suffix = AZURE_SUFFIX
            body["tdx"] = _azure_evidence(item.unverified_evidence, runtime)
        elif item.tee is Tee.NVIDIA:
            gpu = _gpu_evidence(item.unverified_evidence, runtime)
            if gpu is not None:
                body["nvgpu"] = gpu
        else:
            raise AttestationError(
                f"Intel Trust Authority does not appraise {item.tee.value} evidence"
            )
    return body, suffix


def _object(unverified: JsonValue, tee: Tee) -> dict[str, JsonValue]:
    if not isinstance(unverified, dict):
        raise EvidenceError(f"{tee.value} evidence must be a JSON object")
    return unverified


def _optional_string(document: Mapping[str, JsonValue], name: str, tee: Tee) -> str | None:
    value = document.get(name)
    if value is not None and not isinstance(value, str):
        raise EvidenceError(f"{tee.value} evidence member {name!r} must be a string")
    return value


def _dcap_evidence(unverified: JsonValue, tee: Tee, runtime: bytes) -> dict[str, JsonValue]:
    """The guest's quote (base64, passed through), its user data and CC event log when it sent
    them, and the runtime data ITA hashes into the report data."""
    document = _object(unverified, tee)
    quote = _optional_string(document, "quote", tee)
    if not quote:
        raise EvidenceError(f"{tee.value} evidence has no quote")
    request: dict[str, JsonValue] = {"quote": quote, "runtime_data": _b64(runtime)}
    user_data = _optional_string(document, "user_data", tee)
    if user_data is not None:
        request["user_data"] = user_data
    event_log = _optional_string(document, "cc_eventlog", tee)
    if event_log is not None:
        request["event_log"] = event_log
    return request


def _azure_evidence(unverified: JsonValue, runtime: bytes) -> dict[str, JsonValue]:
    """An Azure TD: its HCL runtime data is what the TD quote binds, and the KBS's runtime data
    goes as user data (ITA echoes it as ``tdx.attester_user_data``)."""
    evidence = parse_az_tdx_evidence(unverified)
    hcl = parse_hcl_report(evidence.hcl_report, HclReportType.TDX)
    return {
        "quote": _b64(evidence.td_quote),
        "runtime_data": _b64(hcl.runtime_data_raw),
        "user_data": _b64(runtime),
    }


def _gpu_evidence(unverified: JsonValue, runtime: bytes) -> dict[str, JsonValue] | None:
    """NVIDIA GPU evidence composed with the CPU's; None when no GPU ITA appraises is in it."""
    document = _object(unverified, Tee.NVIDIA)
    devices = document.get("device_evidence_list")
    if not isinstance(devices, list):
        raise EvidenceError("nvidia evidence has no device_evidence_list")
    kept: list[dict[str, JsonValue]] = []
    architecture = ""
    for device in devices:
        entry = _object(device, Tee.NVIDIA)
        arch = _optional_string(entry, "arch", Tee.NVIDIA)
        evidence = _optional_string(entry, "evidence", Tee.NVIDIA)
        certificate = _optional_string(entry, "certificate", Tee.NVIDIA)
        if arch not in GPU_ARCHITECTURES:
            log.warning("Intel Trust Authority: skipping an NVIDIA device of arch %.32r", arch)
            continue
        if evidence is None or certificate is None:
            raise EvidenceError("an NVIDIA device needs its evidence and certificate")
        architecture = architecture or arch
        kept.append({"evidence": evidence, "certificate": certificate})
    if not kept:
        return None
    # the GPU report binds the first 32 bytes of SHA-512 over the runtime data, in hex
    gpu_nonce = hashlib.sha512(runtime).digest()[:32].hex()
    return {"gpu_nonce": gpu_nonce, "arch": architecture, "evidence_list": list(kept)}


def check_runtime_data(claims: Mapping[str, JsonValue], primary: EvidenceToVerify) -> None:
    """The token must echo exactly the runtime data this session sent: its nonce and the
    guest's tee-pubkey. Without this check a token ITA issued for another session (another
    nonce, another guest key) would be accepted here."""
    section = "sgx" if primary.tee is Tee.SGX else "tdx"
    member = "attester_user_data" if primary.tee is Tee.AZ_TDX_VTPM else "attester_runtime_data"
    tee_claims = claims.get(section)
    echoed = tee_claims.get(member) if isinstance(tee_claims, dict) else None
    expected = primary.runtime_data or {}
    if not isinstance(echoed, dict):
        raise AttestationError(f"the Intel Trust Authority token has no {section}.{member}")
    if echoed.get("nonce") != expected.get("nonce"):
        raise AttestationError(
            "the Intel Trust Authority token was issued for another nonce, not this session's"
        )
    if echoed.get("tee-pubkey") != expected.get("tee-pubkey"):
        raise AttestationError(
            "the Intel Trust Authority token names another tee-pubkey than the guest's"
        )
    if echoed != expected:
        raise AttestationError(
            f"the runtime data in the Intel Trust Authority token ({section}.{member}) is not "
            "what this session sent"
        )


def check_policies(claims: Mapping[str, JsonValue], *, allow_unmatched: bool) -> None:
    """Refuse a token that reports ITA policies the evidence did not match."""
    unmatched: list[str] = []
    for scope in (claims, *(v for k, v in claims.items() if k in ("tdx", "sgx", "nvgpu"))):
        if not isinstance(scope, dict) or scope.get("policy_ids_unmatched") is None:
            continue
        listed = scope["policy_ids_unmatched"]
        if not isinstance(listed, list):
            raise AttestationError("the token's policy_ids_unmatched is not a list")
        for entry in listed:
            ident = entry.get("id") if isinstance(entry, dict) else entry
            unmatched.append(str(ident)[:64])
    if unmatched and not allow_unmatched:
        raise AttestationError(
            f"the evidence did not match the Intel Trust Authority policies {unmatched[:8]} "
            "(set allow_unmatched_policy = true to accept such tokens)"
        )
    if unmatched:
        log.warning("accepting a token with unmatched ITA policies %s", unmatched[:8])

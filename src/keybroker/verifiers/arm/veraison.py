"""Remote CCA appraisal by a Veraison verification service (upstream's ``remote`` mode).

Two parts, as everywhere in the verifiers: :class:`VeraisonClient` is the I/O edge and speaks
Veraison's documented APIs; :func:`appraise_ear` is pure and decides on its answer.

The client, per token:

1. ``GET <address>/.well-known/veraison/verification``: the EAR verification key
   (``ear-verification-key``, a JWK) and the ``newChallengeResponseSession`` endpoint;
2. ``POST <endpoint>?nonce=<base64url>`` with the realm challenge as the session nonce, as
   upstream does; the answer must be ``201`` with a ``Location`` on the same origin and echo
   the nonce;
3. ``POST <session>`` with the token (``application/eat-collection; profile=
   "http://arm.com/CCA-SSD/1.0.0"``); the answer must be ``200`` with state ``complete`` and
   the EAR (a JWT) as ``result`` (the asynchronous ``202`` model is refused, as upstream's
   client does);
4. ``DELETE <session>``, best effort.

Every exchange goes through the one collateral fetcher's ``HttpsSource``: an answer is read up
to :data:`MAX_RESPONSE_BYTES` within the timeout. A service that cannot be reached or answers
5xx is :class:`ServiceUnavailableError` (503); one that refuses the evidence with a 4xx is
:class:`EvidenceError`.

:func:`appraise_ear` accepts an EAR only when it verifies with the discovered key (ES256 and
friends, pinned to the key type), its ``eat_nonce`` is the realm challenge, and it appraises
the platform (``CCA_SSD_PLATFORM``) as ``affirming`` and the realm (``CCA_REALM``) with an
affirming ``instance-identity`` (the RAK verified and bound). Upstream reads the annotated
evidence without looking at either verdict; Keybroker refuses, as its local mode would.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Mapping
from urllib.parse import urljoin

import httpx

from keybroker.errors import EvidenceError, KeybrokerError, ServiceUnavailableError
from keybroker.protocol.jws import PublicKey, public_key_from_jwk, verify_jwt
from keybroker.verifiers.collateral_fetch import HttpAnswer, HttpsSource

log = logging.getLogger(__name__)

MEDIA_TYPE = 'application/eat-collection; profile="http://arm.com/CCA-SSD/1.0.0"'
SESSION_MEDIA_TYPE = "application/vnd.veraison.challenge-response-session+json"
DISCOVERY_PATH = "/.well-known/veraison/verification"
MAX_RESPONSE_BYTES = 256 * 1024
PLATFORM_SUBMOD = "CCA_SSD_PLATFORM"
REALM_SUBMOD = "CCA_REALM"


class VeraisonClient:
    """Veraison's verification API at ``address`` (HTTPS; plain HTTP only when insecure)."""

    def __init__(
        self,
        address: str,
        *,
        ca_pem: bytes | None = None,
        timeout: float = 10.0,
        insecure_http: bool = False,
        client: httpx.Client | None = None,
    ) -> None:
        self._source = HttpsSource(
            address,
            service="the Veraison service",
            max_bytes=MAX_RESPONSE_BYTES,
            timeout=timeout,
            ca_pem=ca_pem,
            client=client,
            insecure_http=insecure_http,
        )
        self._base = self._source.base
        url = httpx.URL(self._base)
        self._origin = (url.scheme, url.host, url.port)

    def close(self) -> None:
        self._source.close()

    def appraise(self, token: bytes, nonce: bytes) -> tuple[str, PublicKey]:
        """The EAR (unverified JWT) Veraison returns for ``token`` in a session whose nonce is
        ``nonce``, and the key Veraison publishes to verify it."""
        key, endpoint = self._discover()
        session = self._new_session(endpoint, nonce)
        try:
            return self._submit(session, token), key
        finally:
            self._delete(session)

    def _discover(self) -> tuple[PublicKey, str]:
        discovery = _json(self._request("GET", DISCOVERY_PATH), "discovery")
        jwk = discovery.get("ear-verification-key")
        endpoints = discovery.get("api-endpoints")
        endpoint = (
            endpoints.get("newChallengeResponseSession") if isinstance(endpoints, dict) else None
        )
        if not isinstance(jwk, dict) or not isinstance(endpoint, str):
            raise ServiceUnavailableError(
                f"the Veraison discovery document of {self._base} has no ear-verification-key "
                "or newChallengeResponseSession endpoint"
            )
        try:
            key = public_key_from_jwk(jwk)
        except (KeybrokerError, ValueError) as e:
            raise ServiceUnavailableError(f"the Veraison EAR verification key: {e}") from None
        return key, self._same_origin(urljoin(self._base + "/", endpoint))

    def _new_session(self, endpoint: str, nonce: bytes) -> str:
        answer = self._request(
            "POST",
            endpoint,
            params={"nonce": base64.urlsafe_b64encode(nonce).decode()},
            headers={"Accept": SESSION_MEDIA_TYPE},
        )
        if answer.status != 201:
            raise ServiceUnavailableError(f"Veraison refused a new session: HTTP {answer.status}")
        location = answer.headers.get("location")
        if not location:
            raise ServiceUnavailableError("Veraison created a session without a Location")
        session = _json(answer, "new session")
        if _b64any(session.get("nonce")) != nonce:
            raise ServiceUnavailableError("the Veraison session does not carry the nonce asked")
        return self._same_origin(urljoin(answer.url, location))

    def _submit(self, session: str, token: bytes) -> str:
        answer = self._request(
            "POST",
            session,
            content=token,
            headers={"Accept": SESSION_MEDIA_TYPE, "Content-Type": MEDIA_TYPE},
        )
        if 400 <= answer.status < 500:
            detail = _json(answer, "refusal").get("detail") if answer.body else None
            raise EvidenceError(
                f"the Veraison service refused the CCA token (HTTP {answer.status}"
                f"{': ' + str(detail)[:200] if detail else ''})"
            )
        if answer.status != 200:
            raise ServiceUnavailableError(
                f"the Veraison session answered HTTP {answer.status}, not 200 (the "
                "asynchronous model is not supported)"
            )
        state = _json(answer, "session")
        if state.get("status") != "complete" or not isinstance(state.get("result"), str):
            raise EvidenceError(
                f"the Veraison session ended {str(state.get('status'))[:32]!r} without a result"
            )
        return str(state["result"])

    def _delete(self, session: str) -> None:
        try:
            self._source.send("DELETE", session)
        except ServiceUnavailableError:
            log.info("could not delete the Veraison session %s", session)

    def _same_origin(self, url: str) -> str:
        """Only ever talk to the configured service (a redirect elsewhere is refused)."""
        parsed = httpx.URL(url)
        if (parsed.scheme, parsed.host, parsed.port) != self._origin:
            raise ServiceUnavailableError(f"Veraison sent us to another origin: {url[:200]}")
        return url

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpAnswer:
        answer = self._source.send(method, url, params=params, content=content, headers=headers)
        if answer.status >= 500:
            raise ServiceUnavailableError(f"{answer.url} answered HTTP {answer.status}")
        return answer


def _json(answer: HttpAnswer, what: str) -> dict[str, object]:
    try:
        value = json.loads(answer.body)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ServiceUnavailableError(
            f"the Veraison {what} answer (HTTP {answer.status}) is not a JSON object"
        )
    return value


def _b64any(value: object) -> bytes | None:
    """Standard or URL-safe base64, padded or not (Veraison's spellings vary by field)."""
    if not isinstance(value, str):
        return None
    text = value.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _affirming(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 31


def appraise_ear(
    ear: str, key: PublicKey, nonce: bytes, *, now: Callable[[], float]
) -> Mapping[str, object]:
    """The EAR's claims, once it is Veraison's, for this nonce, and affirms the token."""
    try:
        claims = verify_jwt(ear, key, now=now())
    except KeybrokerError as e:
        raise EvidenceError(f"the Veraison attestation result does not verify: {e}") from None
    if _b64any(claims.get("eat_nonce")) != nonce:
        raise EvidenceError("the Veraison attestation result is for another nonce")
    submods = claims.get("submods")
    platform = submods.get(PLATFORM_SUBMOD) if isinstance(submods, dict) else None
    realm = submods.get(REALM_SUBMOD) if isinstance(submods, dict) else None
    if not isinstance(platform, dict) or not isinstance(realm, dict):
        raise EvidenceError(
            f"the Veraison attestation result lacks the {PLATFORM_SUBMOD} or {REALM_SUBMOD} "
            "appraisal"
        )
    if platform.get("ear.status") != "affirming":
        raise EvidenceError(
            f"Veraison did not affirm the CCA platform (status "
            f"{str(platform.get('ear.status'))[:32]!r}): its CPAK or firmware is not endorsed"
        )
    vector = realm.get("ear.trustworthiness-vector")
    if not isinstance(vector, dict) or not _affirming(vector.get("instance-identity")):
        raise EvidenceError(
            "Veraison did not affirm the CCA realm's instance identity (RAK signature or binding)"
        )
    return claims

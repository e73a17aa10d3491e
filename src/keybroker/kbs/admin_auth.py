"""Admin authentication and authorization: bearer JWTs from trusted identity providers, and
role ACLs over the request path.

An identity provider is trusted through PEM public keys (``public_key_uri``: a path,
``file://`` or ``https://``) and/or a JWK set (``jwk_set_uri``: a path, ``file://``,
``https://``, or an ``https://.../.well-known/openid-configuration`` discovery document; an
``https://`` URL that holds no key set is taken as an issuer and its discovery document read,
as upstream does).
Remote key material is fetched with a timeout, cached, and re-fetched when a token names a
``kid`` the cached set lacks (at most once per ``REFRESH_INTERVAL``, so unknown kids cannot be
used to hammer the provider). Fetches are asynchronous (``httpx.AsyncClient``), on first use
rather than at start-up, one at a time per provider: a slow identity provider delays the
requests that need its keys, never the event loop and so never the other requests. Callers
await :meth:`IdentityProviderKeys.ensure_keys` before the synchronous, cache-only
:meth:`IdentityProviderKeys.keys_for`.

A token is accepted when its signature verifies with one provider's key (the algorithm must
fit the key: no ``none``, no HMAC with a public key), it has an ``exp`` (60 s leeway) and a
string ``role``, and the provider's ``issuer``/``audience`` match when configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keybroker.config import AclRule, IdentityProvider
from keybroker.errors import (
    AdminDeniedError,
    AdminUnauthenticatedError,
    ConfigError,
    ServiceUnavailableError,
    TokenVerificationError,
)
from keybroker.protocol.jws import PublicKey, decode_unverified, public_key_from_jwk, verify_jwt
from keybroker.protocol.models import JsonValue

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 60.0
FETCH_TIMEOUT_SECONDS = 5.0
REFRESH_INTERVAL = 30.0
_MAX_DOCUMENT_BYTES = 1024 * 1024
_DISCOVERY = "/.well-known/openid-configuration"
# Paths an admin ACL must never match, whatever its author meant: a pattern that matches one
# of them is not confined to the KBS API.
_OUTSIDE_KBS = ("/", "/healthz", "/metrics", "/kbs", "/kbsx/v0/resource", "/other/kbs/v0/x")

Fetch = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True)
class AdminIdentity:
    """Who made an admin request (for the audit log)."""

    role: str
    issuer: str | None
    subject: str | None


async def https_fetch(url: str) -> bytes:
    """GET ``url`` over HTTPS (system trust, or ``SSL_CERT_FILE``), bounded in time and size."""
    try:
        async with httpx.AsyncClient(
            timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False
        ) as client:
            # the whole exchange, not each read: a provider trickling bytes cannot hold us
            async with asyncio.timeout(FETCH_TIMEOUT_SECONDS):
                return await _read_bounded(client, url)
    except (httpx.HTTPError, TimeoutError) as e:
        raise ServiceUnavailableError(f"cannot fetch {url}: {str(e) or 'timed out'}") from None


async def _read_bounded(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise ServiceUnavailableError(f"cannot fetch {url}: HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_DOCUMENT_BYTES:
                raise ServiceUnavailableError(
                    f"{url} returned more than {_MAX_DOCUMENT_BYTES} bytes"
                )
        return bytes(body)


def _read_local(uri: str) -> bytes:
    path = Path(urlparse(uri).path if uri.startswith("file://") else uri)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key material {path}: {e.strerror}") from None


def _is_remote(uri: str) -> bool:
    if uri.startswith("https://"):
        return True
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported scheme in {uri}: use a path, file:// or https://")
    return False


def _pem_keys(data: bytes, source: str) -> list[PublicKey]:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{source} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(f"{source}: admin keys must be EC, RSA or Ed25519")
    return [key]


def _jwks(data: bytes, source: str) -> dict[str | None, PublicKey]:
    try:
        document = json.loads(data)
        keys = document["keys"]
        if not isinstance(keys, list):
            raise TypeError("keys is not a list")
        return {jwk.get("kid"): public_key_from_jwk(jwk) for jwk in keys}
    except (ValueError, KeyError, TypeError, AttributeError, TokenVerificationError) as e:
        raise ConfigError(f"{source} is not a usable JWK set: {e}") from None


class IdentityProviderKeys:
    """The keys of one identity provider, loaded and refreshed as described above."""

    def __init__(
        self,
        config: IdentityProvider,
        *,
        fetch: Fetch = https_fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.public_key_uri is None and config.jwk_set_uri is None:
            raise ConfigError("an identity provider needs public_key_uri and/or jwk_set_uri")
        self.config = config
        self._fetch = fetch
        self._clock = clock
        self._pem: list[PublicKey] = []
        self._jwk: dict[str | None, PublicKey] = {}
        self._fetched_at: float | None = None
        self._loaded = False
        self._pem_loaded = False
        self._fetching = asyncio.Lock()  # one fetch at a time; the others wait and reuse it
        if config.public_key_uri is not None and not _is_remote(config.public_key_uri):
            self._pem = _pem_keys(_read_local(config.public_key_uri), config.public_key_uri)
            self._pem_loaded = True
        if config.public_key_uri is None:
            self._pem_loaded = True
        if config.jwk_set_uri is not None and not _is_remote(config.jwk_set_uri):
            self._jwk = _jwks(_read_local(config.jwk_set_uri), config.jwk_set_uri)
            self._loaded = True

    async def ensure_keys(self, kid: str | None) -> None:
        """Fetch what :meth:`keys_for` will need for a token naming ``kid``: remote keys never
        fetched yet, or a key set lacking ``kid`` (at most once per ``REFRESH_INTERVAL``).
        Raises ServiceUnavailableError when a remote provider cannot be reached."""
        if not self._needs_fetch(kid):
            return
        async with self._fetching:
            if not self._needs_fetch(kid):  # fetched while this request waited
                return
            uri = self.config.public_key_uri
            if not self._pem_loaded and uri is not None:
                self._pem = _pem_keys(await self._fetch(uri), uri)
                self._pem_loaded = True
            if self.config.jwk_set_uri is not None and self._jwk_needs_fetch(kid):
                await self._refresh()

    def _needs_fetch(self, kid: str | None) -> bool:
        return not self._pem_loaded or (
            self.config.jwk_set_uri is not None and self._jwk_needs_fetch(kid)
        )

    def _jwk_needs_fetch(self, kid: str | None) -> bool:
        return not self._loaded or (
            kid is not None and kid not in self._jwk and self._may_refresh()
        )

    def keys_for(self, kid: str | None) -> list[PublicKey]:
        """Keys that may have signed a token naming ``kid``, from the cache (await
        :meth:`ensure_keys` first). Raises ServiceUnavailableError while remote keys have
        never been fetched successfully."""
        if not self._pem_loaded or (self.config.jwk_set_uri is not None and not self._loaded):
            raise ServiceUnavailableError(
                "the identity provider's keys could not be fetched yet: retry shortly"
            )
        if self.config.jwk_set_uri is None:
            return list(self._pem)
        if kid is not None:
            found = self._jwk.get(kid)
            return [*([found] if found else []), *self._pem]
        return [*self._jwk.values(), *self._pem]

    def _may_refresh(self) -> bool:
        uri = self.config.jwk_set_uri
        if uri is None or not _is_remote(uri):
            return False
        return self._fetched_at is None or self._clock() - self._fetched_at >= REFRESH_INTERVAL

    async def _refresh(self) -> None:
        uri = self.config.jwk_set_uri
        assert uri is not None  # noqa: S101 - only called for JWK-set providers
        self._fetched_at = self._clock()
        if urlparse(uri).path.endswith(_DISCOVERY):
            self._jwk = await self._fetch_jwks(await self._discover(uri))
        else:
            try:
                keys = await self._fetch_jwks(uri)
            except ServiceUnavailableError:
                keys = {}
            if not keys:
                # As upstream: a URL that holds no key set names an issuer (Intel Trust
                # Authority's portal URL, say) whose discovery document says where its keys are.
                discovery = uri.rstrip("/") + _DISCOVERY
                keys = await self._fetch_jwks(await self._discover(discovery))
            self._jwk = keys
        self._loaded = True

    async def _discover(self, uri: str) -> str:
        try:
            jwks_uri = json.loads(await self._fetch(uri))["jwks_uri"]
        except (ValueError, KeyError, TypeError):
            raise ServiceUnavailableError(f"{uri} has no jwks_uri") from None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ServiceUnavailableError(f"{uri}: jwks_uri must be an https URL")
        return jwks_uri

    async def _fetch_jwks(self, uri: str) -> dict[str | None, PublicKey]:
        try:
            return _jwks(await self._fetch(uri), uri)
        except ConfigError as e:  # a bad document from a remote provider is an outage, not config
            raise ServiceUnavailableError(e.detail) from None


class BearerJwtAuthenticator:
    def __init__(
        self,
        providers: Sequence[IdentityProviderKeys],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not providers:
            raise ConfigError(
                "AuthenticatedAuthorization needs at least one entry in "
                "[admin.authentication.bearer_jwt] identity_providers"
            )
        self._providers = list(providers)
        self._clock = clock

    async def authenticate(self, authorization: str | None) -> AdminIdentity:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AdminUnauthenticatedError("admin requests need an Authorization: Bearer token")
        token = token.strip()
        try:
            header, _ = decode_unverified(token)
        except TokenVerificationError as e:
            raise AdminUnauthenticatedError(f"admin token is malformed: {e.detail}") from None
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else None
        reasons: list[str] = []
        for provider in self._providers:
            await provider.ensure_keys(kid)
            identity = self._try(provider, token, kid, reasons)
            if identity is not None:
                return identity
        raise AdminUnauthenticatedError(
            f"cannot verify token with any of the issuers ({'; '.join(reasons[:4])})"
        )

    def _try(
        self, provider: IdentityProviderKeys, token: str, kid: str | None, reasons: list[str]
    ) -> AdminIdentity | None:
        keys = provider.keys_for(kid)
        if not keys:
            reasons.append(f"no key with kid {kid!r}" if kid else "no keys")
            return None
        for key in keys:
            try:
                claims = verify_jwt(token, key, now=self._clock(), leeway=LEEWAY_SECONDS)
            except TokenVerificationError as e:
                reasons.append(e.detail)
                continue
            return self._identity(provider.config, claims, reasons)
        return None

    @staticmethod
    def _identity(
        config: IdentityProvider, claims: Mapping[str, JsonValue], reasons: list[str]
    ) -> AdminIdentity | None:
        if not isinstance(claims.get("exp"), int | float):
            reasons.append("token has no exp")
            return None
        issuer = claims.get("iss")
        if config.issuer is not None and issuer != config.issuer:
            reasons.append(f"issuer {str(issuer)[:64]!r} is not {config.issuer!r}")
            return None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if config.audience is not None and config.audience not in audiences:
            reasons.append(f"audience is not {config.audience!r}")
            return None
        role = claims.get("role")
        if not isinstance(role, str) or not role:
            reasons.append("token has no string role claim")
            return None
        subject = claims.get("sub")
        return AdminIdentity(
            role=role,
            issuer=issuer if isinstance(issuer, str) else None,
            subject=subject if isinstance(subject, str) else None,
        )


class RegexAcl:
    """``{role, allowed_endpoints}`` rules; a request is allowed when a rule of its role
    matches the whole of its path and query."""

    def __init__(self, rules: Sequence[AclRule]) -> None:
        self._rules = [(rule.role, _compile_acl(rule.allowed_endpoints)) for rule in rules]

    def authorize(self, identity: AdminIdentity, uri: str) -> None:
        for role, pattern in self._rules:
            if role == identity.role and pattern.fullmatch(uri):
                return
        raise AdminDeniedError(f"role {identity.role} not allowed for path {uri[:200]}")


def _compile_acl(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("^/kbs") or not pattern.endswith("$"):
        raise ConfigError(f"ACL pattern {pattern!r} must start with ^/kbs and end with $")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"ACL pattern {pattern!r} is not a valid regex: {e}") from None
    too_broad = [path for path in _OUTSIDE_KBS if compiled.fullmatch(path)]
    if too_broad:
        raise ConfigError(
            f"ACL pattern {pattern!r} matches {too_broad[0]!r}, outside the KBS API: "
            "anchor every alternative (e.g. ^/kbs/v0/(resource|resource-policy)/.*$)"
        )
    return compiled

"""Attestation-token verification on the KBS side, and finding the TEE key a token vouches for.

Where the verification key comes from (upstream's ``[attestation_token]`` semantics):

- the builtin Attestation Service's own key, trusted automatically (it lives in this process);
- a header ``jwk``: trusted only if the header's ``x5c`` chain starts with a certificate for
  that very key and leads to a certificate in ``trusted_certs_paths`` (any order, partial
  chains accepted, bounded by ``keybroker.protocol.x509chain``); the token's signature is
  checked with that key first, so a forged token costs no chain search; with
  ``insecure_header_jwk = true`` the chain check is skipped (logged on every use) but the
  signature is still checked;
- a header ``kid``: looked up in the ``trusted_jwk_sets`` (files or https, cached, refreshed on
  an unknown kid).

The token must not be expired or not yet valid. No trust material at all means every token is
rejected, and a resource-only KBS refuses to start that way.

A guest fetching several resources presents the same token each time. A token whose signature
verified with one of the fixed trusted keys (the builtin AS's, or ``trusted_keys`` given here) is
remembered, by its exact text, in a bounded LRU: the signature is not checked again, its
``exp``/``nbf`` are, on every use. Tokens accepted through a header ``x5c`` chain or a JWK set
are verified every time, since certificates expire and key sets rotate.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from keybroker.config import AttestationTokenConfig, IdentityProvider
from keybroker.errors import BadRequestError, ConfigError, TokenVerificationError
from keybroker.kbs.admin_auth import Fetch, IdentityProviderKeys, https_fetch
from keybroker.protocol.jwk import TeePublicKey, parse_tee_pubkey
from keybroker.protocol.jws import (
    PublicKey,
    check_time_window,
    decode_unverified,
    public_key_from_jwk,
    verify_jwt,
)
from keybroker.protocol.models import JsonValue
from keybroker.protocol.x509chain import MAX_CHAIN_LENGTH, build_path

log = logging.getLogger(__name__)

# Where each issuer puts the guest's key (JSON pointers), tried after the configured ones.
DEFAULT_TEE_PUBKEY_PATHS = (
    "/tdx/attester_runtime_data/tee-pubkey",
    "/tdx/attester_user_data/tee-pubkey",
    "/sgx/attester_runtime_data/tee-pubkey",
    "/customized_claims/runtime_data/tee-pubkey",
    "/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey",
    "/tee-pubkey",
)
VERIFIED_CACHE_SIZE = 2048
# a parsed TEE key is remembered only if its JWK is at most this long (an RSA-4096 or ML-KEM key
# fits; a bigger one is parsed each time rather than held)
_MAX_REMEMBERED_JWK = 4096


def load_trusted_certs(paths: Sequence[str]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for path in paths:
        try:
            found = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read trusted certificate {path}: {e.strerror}") from None
        except ValueError:
            raise ConfigError(f"{path} holds no PEM certificates") from None
        certs.extend(found)
    return certs


class TokenVerifier:
    def __init__(
        self,
        trusted_keys: Sequence[PublicKey],
        *,
        trusted_certs: Sequence[x509.Certificate] = (),
        jwk_sets: Sequence[IdentityProviderKeys] = (),
        insecure_header_jwk: bool = False,
        extra_teekey_paths: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._trusted_keys = list(trusted_keys)
        self._trusted_certs = list(trusted_certs)
        self._jwk_sets = list(jwk_sets)
        self._insecure_header_jwk = insecure_header_jwk
        self._paths = [*extra_teekey_paths, *DEFAULT_TEE_PUBKEY_PATHS]
        self._clock = clock
        self._verified: OrderedDict[str, dict[str, JsonValue]] = OrderedDict()
        self._verified_lock = threading.Lock()
        self._tee_keys: OrderedDict[str, TeePublicKey] = OrderedDict()  # by canonical JWK
        if insecure_header_jwk:
            log.warning(
                "attestation_token.insecure_header_jwk = true: tokens are verified with the key "
                "they carry themselves, so ANY well-formed token is accepted as attested"
            )

    @classmethod
    def from_config(
        cls,
        config: AttestationTokenConfig,
        trusted_keys: Sequence[PublicKey],
        *,
        fetch: Fetch = https_fetch,
        clock: Callable[[], float] = time.time,
    ) -> TokenVerifier:
        jwk_sets = [
            IdentityProviderKeys(IdentityProvider(jwk_set_uri=uri), fetch=fetch, clock=clock)
            for uri in config.trusted_jwk_sets
        ]
        return cls(
            trusted_keys,
            trusted_certs=load_trusted_certs(config.trusted_certs_paths),
            jwk_sets=jwk_sets,
            insecure_header_jwk=config.insecure_header_jwk,
            extra_teekey_paths=config.extra_teekey_paths,
            clock=clock,
        )

    @property
    def has_trust_anchors(self) -> bool:
        return bool(
            self._trusted_keys or self._trusted_certs or self._jwk_sets or self._insecure_header_jwk
        )

    async def ensure_keys(self, token: str) -> None:
        """Fetch the ``trusted_jwk_sets`` keys a token's ``kid`` needs (asynchronously: see
        :mod:`keybroker.kbs.admin_auth`), before the synchronous :meth:`verify`."""
        if not self._jwk_sets:
            return
        try:
            header, _ = decode_unverified(token)
        except TokenVerificationError:
            return  # verify() reports it
        kid = header.get("kid")
        if isinstance(kid, str) and not isinstance(header.get("jwk"), Mapping):
            for jwk_set in self._jwk_sets:
                await jwk_set.ensure_keys(kid)

    def verify(self, token: str) -> dict[str, JsonValue]:
        """The token's claims once it verifies. They may be shared with later calls for the
        same token: do not mutate them."""
        if not self.has_trust_anchors:
            raise TokenVerificationError(
                "no trusted token issuers are configured, so no attestation token is accepted"
            )
        known = self.recall(token)
        if known is not None:
            return known
        header, _ = decode_unverified(token)
        errors: list[str] = []
        header_jwk = header.get("jwk")
        if isinstance(header_jwk, Mapping):
            return self._verify_with_header_key(token, header_jwk)
        for key in self._candidate_keys(header, errors):
            try:
                claims: dict[str, JsonValue] = verify_jwt(token, key, now=self._clock())
            except TokenVerificationError as e:
                errors.append(e.detail)
                continue
            if any(key is trusted for trusted in self._trusted_keys):
                self._remember(token, claims)
            return claims
        reason = errors[-1] if errors else "no trusted key for this token"
        raise TokenVerificationError(f"attestation token not accepted: {reason}")

    def recall(self, token: str) -> dict[str, JsonValue] | None:
        """The claims of ``token`` if it was verified before with a trusted key and is still
        inside its time window (raises if it is not), else None: a dictionary look-up, cheap
        enough for the event loop, unlike :meth:`verify`."""
        with self._verified_lock:
            known = self._verified.get(token)
            if known is not None:
                self._verified.move_to_end(token)
        if known is not None:
            try:
                check_time_window(known, self._clock())
            except TokenVerificationError as e:
                raise TokenVerificationError(
                    f"attestation token not accepted: {e.detail}"
                ) from None
        return known

    def remember_issued(self, token: str, claims: dict[str, JsonValue]) -> None:
        """Remember a token this process's own attestation service has just signed with the
        signer key this verifier trusts, so the session's first GET does not check again the
        signature it just made. The caller vouches for both; ``recall`` still checks the time
        window on every use."""
        self._remember(token, claims)

    def remembered(self) -> int:
        """How many verified tokens are remembered."""
        with self._verified_lock:
            return len(self._verified)

    def _remember(self, token: str, claims: dict[str, JsonValue]) -> None:
        with self._verified_lock:
            self._verified[token] = claims
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)

    def _verify_with_header_key(
        self, token: str, header_jwk: Mapping[str, object]
    ) -> dict[str, JsonValue]:
        """A token that carries its signer key: its signature is checked with that key before
        the key's certificate chain is looked at, so a token nobody signed (built to make the
        path search expensive, say) is refused for the price of one signature check."""
        try:
            unverified_key = public_key_from_jwk(header_jwk)
            claims: dict[str, JsonValue] = verify_jwt(token, unverified_key, now=self._clock())
            key = self.trusted_header_key(header_jwk)
        except TokenVerificationError as e:
            raise TokenVerificationError(f"attestation token not accepted: {e.detail}") from None
        if any(key is trusted for trusted in self._trusted_keys):
            self._remember(token, claims)
        return claims

    def _candidate_keys(self, header: Mapping[str, object], errors: list[str]) -> list[PublicKey]:
        kid = header.get("kid")
        if isinstance(kid, str) and self._jwk_sets:
            return [k for jwk_set in self._jwk_sets for k in jwk_set.keys_for(kid)]
        return list(self._trusted_keys)

    def trusted_header_key(self, header_jwk: Mapping[str, object]) -> PublicKey:
        """The key a token header carries, if we may trust it; else TokenVerificationError."""
        key = public_key_from_jwk(header_jwk)
        for trusted in self._trusted_keys:
            if key == trusted:
                return trusted  # the very object: `verify` remembers what it verified
        if self._insecure_header_jwk:
            log.warning("accepting a token signer from its own header (insecure_header_jwk)")
            return key
        self._check_x5c(header_jwk, key)
        return key

    def _check_x5c(self, header_jwk: Mapping[str, object], key: PublicKey) -> None:
        if not self._trusted_certs:
            raise TokenVerificationError(
                "the token carries its signer key, but no trusted_certs_paths are configured"
            )
        x5c = header_jwk.get("x5c")
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise TokenVerificationError("the token's header jwk has no x5c certificate chain")
        if len(x5c) > 1 + MAX_CHAIN_LENGTH:  # refused before any certificate is even parsed
            raise TokenVerificationError(
                f"the token's x5c holds {len(x5c)} certificates, at most "
                f"{1 + MAX_CHAIN_LENGTH} are accepted"
            )
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in x5c]
        except (binascii.Error, ValueError):
            raise TokenVerificationError("the token's x5c is not a chain of certificates") from None
        if chain[0].public_key() != key:
            raise TokenVerificationError("the x5c leaf certificate does not match the header jwk")
        now = datetime.fromtimestamp(self._clock(), UTC)
        build_path(
            chain[0],
            chain[1:],
            self._trusted_certs,
            now=now,
            error=TokenVerificationError,
            what="the token signer's certificate chain",
        )

    def tee_pubkey(self, claims: Mapping[str, JsonValue]) -> TeePublicKey:
        """The TEE key of verified ``claims``, parsed; remembered by its JWK (a bounded LRU),
        since every GET of a session asks for the same key and parsing an EC point costs
        more than the look-up."""
        for path in self._paths:
            value = pointer(claims, path)
            if value is not None:
                return self._parsed_tee_pubkey(path, value)
        raise TokenVerificationError("the attestation token carries no tee-pubkey claim")

    def _parsed_tee_pubkey(self, path: str, value: JsonValue) -> TeePublicKey:
        try:
            jwk = json.dumps(value, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            jwk = None  # parse_tee_pubkey says why
        if jwk is not None and len(jwk) <= _MAX_REMEMBERED_JWK:
            with self._verified_lock:
                known = self._tee_keys.get(jwk)
                if known is not None:
                    self._tee_keys.move_to_end(jwk)
                    return known
        try:
            parsed = parse_tee_pubkey(value)
        except BadRequestError as e:
            raise TokenVerificationError(
                f"the token's tee-pubkey at {path} is unusable: {e.detail}"
            ) from None
        if jwk is not None and len(jwk) <= _MAX_REMEMBERED_JWK:
            with self._verified_lock:
                self._tee_keys[jwk] = parsed
                while len(self._tee_keys) > VERIFIED_CACHE_SIZE:
                    self._tee_keys.popitem(last=False)
        return parsed


def pointer(document: JsonValue, json_pointer: str) -> JsonValue:
    """RFC 6901 lookup; None when absent."""
    node = document
    for raw in json_pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node

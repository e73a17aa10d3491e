"""The release decision: what a call to ``/kbs/v0/<plugin>/<path...>`` may do, and for whom.

``kbs.app`` parses the request into an :class:`~keybroker.kbs.calls.ApiCall`, calls
:meth:`ReleaseService.plugin` once and serializes what it returns. Everything in between
happens here, with no HTTP:

- plugin dispatch: the plugin named, the methods it answers at that path (else 405), its own
  check of the request, and whether the call is an admin's or a guest's;
- an admin's call: the admin guard (bearer JWT, role ACL over the path as sent), then the
  operation, with exactly one audit record ``admin <METHOD> <name>``. The admin endpoints of
  ``admin_api`` are guarded the same way, through :meth:`ReleaseService.as_admin`;
- a guest's release: the token (the session's first, then ``Authorization: Bearer``),
  verified again or recalled; the version to release fixed; the governing resource policy
  (a tenant's, else the global one) asked, and counted in ``kbs_policy_*``; the TEE key found
  before the secret is read; the answer sealed as a JWE; and exactly one audit record
  ``release <METHOD> <plugin>``, written before anything is released (no record, no release).

Every refusal is a ``KeybrokerError`` (the app renders it), recorded first. The answer is a
``PluginResponse`` to send as it is, or the members of a flattened JWE to send as JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TypeAlias, TypeVar

from keybroker.errors import (
    KeybrokerError,
    MethodNotAllowedError,
    PluginNotFoundError,
    PolicyDeniedError,
    TokenNotFoundError,
)
from keybroker.kbs.auditing import admin_subject, guest_subject, new_request_id
from keybroker.kbs.calls import ApiCall
from keybroker.kbs.resource_policy import decision
from keybroker.kbs.services import KbsServices
from keybroker.kbs.tokens import pointer
from keybroker.plugins.base import Plugin, PluginRequest, PluginResponse
from keybroker.protocol.jwe import seal
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import ResourcePath

T = TypeVar("T")

# What a plugin call answers: a plugin's response as it is, or the flattened JWE that seals
# it to the guest's TEE key.
Released: TypeAlias = PluginResponse | dict[str, str]

# (token digest, governing policy id, its text (the compiled policy's own string, shared),
# digest of the request data as canonical JSON)
_DecisionKey: TypeAlias = tuple[bytes, str, str, bytes]
# decisions remembered per worker: a session's GETs repeat one question (LRU beyond this)
DECISIONS_REMEMBERED = 4096

_INIT_DATA_CLAIMS = "/submods/cpu0/ear.veraison.annotated-evidence/init_data_claims"


class ReleaseService:
    """Plugin dispatch, admin guarding and guest release over the KBS's services."""

    def __init__(self, services: KbsServices) -> None:
        self._services = services
        # the release decisions of recent sessions (see _allowed); the event loop's alone
        self._decisions: OrderedDict[_DecisionKey, bool] = OrderedDict()  # allows only

    async def plugin(self, call: ApiCall) -> Released:
        """The answer to ``call`` (a plugin's path), or the ``KeybrokerError`` that refuses it."""
        services = self._services
        plugin = services.plugins.get(call.name)
        if plugin is None:
            raise PluginNotFoundError(f"Plugin {call.name[:64]} not found")
        request = PluginRequest(
            method=call.method, path=call.rest, query=call.query, body=call.body
        )
        allowed = plugin.methods(request)
        if call.method not in allowed:
            raise MethodNotAllowedError(
                f"plugin {call.name} does not answer {call.method}", allow=allowed
            )
        plugin.check(request)
        if await plugin.ask_requires_admin(request):
            return await self.as_admin(call, partial(self._handle, plugin, request))
        # one generation stamp for the release's cached reads, read at the first of them
        with services.read_cache.release():
            return await self._release(call, plugin, request)

    async def as_admin(self, call: ApiCall, operation: Callable[[], Awaitable[T]]) -> T:
        """Admit, check the audit log can take the record, act, record: exactly one record."""
        services = self._services
        action, target = f"admin {call.method} {call.name}", "/".join(call.rest)
        record = partial(
            services.audit.record,
            action=action,
            target=target,
            request_id=new_request_id(),
            peer=call.peer,
        )
        try:
            # the path and query exactly as sent: role ACLs are regexes over them
            identity = await services.admin.check(call.target(), call.authorization)
        except KeybrokerError as e:
            await record(decision="deny", subject=None, reason=e.detail)
            raise
        services.audit.ensure_writable()  # refuse the change if it could not be recorded
        try:
            result = await operation()
        except KeybrokerError as e:
            await record(decision="failure", subject=admin_subject(identity), reason=e.detail)
            raise
        await record(decision="allow", subject=admin_subject(identity))
        return result

    async def _release(self, call: ApiCall, plugin: Plugin, request: PluginRequest) -> Released:
        """A guest's call: token, policy, key, plugin, seal, with exactly one record."""
        services = self._services
        record = partial(
            services.audit.record,
            action=f"release {call.method} {call.name}",
            target="/".join(call.rest),
            request_id=new_request_id(),
            peer=call.peer,
        )
        try:
            token = await self._guest_token(call)
            await services.tokens.ensure_keys(token)  # a JWK-set fetch, if any, off the loop
            # signature and certificate-chain checks are CPU work: off the event loop, so a
            # costly token delays only its own request, never /healthz or other guests. A token
            # already verified with a trusted key is a look-up, not worth a thread hop.
            claims = services.tokens.recall(token)
            if claims is None:
                claims = await asyncio.to_thread(services.tokens.verify, token)
        except KeybrokerError as e:
            await record(decision="deny", subject=None, reason=e.detail)
            raise
        subject = guest_subject(claims, token)
        try:
            # The version to release is fixed before the policy judges it (a resource plugin read)
            request = await plugin.prepare_release(request)
        except KeybrokerError as e:
            await record(decision="failure", subject=subject, reason=e.detail)
            raise
        policy_data: dict[str, JsonValue] = {
            "plugin": call.name,
            "resource-path": list(call.rest),
            "query": dict(call.query),
        }
        released = request.resolved_version
        if released is not None:
            policy_data["version"] = released.number
        repository = plugin.repository_path(request)  # a tenant policy may decide
        permitted, policy_id = await self._allowed(token, claims, policy_data, repository)
        if not permitted:
            reason = f"denied by the resource policy {policy_id}"
            await record(decision="deny", subject=subject, reason=reason)
            raise PolicyDeniedError(
                "Access denied by policy: the resource policy refused this token for this "
                "resource (an admin can see why with `kbs-client config evaluate-policy`)"
            )
        services.audit.ensure_writable()
        try:
            # Find the key to encrypt to before touching the secret: no key, no read.
            encrypt = await plugin.ask_needs_encryption(request)
            recipient = services.tokens.tee_pubkey(claims) if encrypt else None
            with services.metrics.plugin_call(plugin.name):
                result = await plugin.handle(
                    replace(request, init_data_claims=pointer(claims, _INIT_DATA_CLAIMS))
                )
            answer: Released = result if recipient is None else seal(recipient, result.body)
        except KeybrokerError as e:
            await record(decision="failure", subject=subject, reason=e.detail)
            raise
        # no record, no release: a failure answers 503. The record names the version released.
        await record(
            decision="allow",
            subject=subject,
            reason="" if released is None else f"version {released.number}",
        )
        return answer

    async def _guest_token(self, call: ApiCall) -> str:
        """The session's token first, then ``Authorization: Bearer``; re-verified either way."""
        sessions = self._services.sessions
        if sessions is not None:
            session = await sessions.get(call.session_id)
            if session is not None and session.token is not None:
                return session.token
        scheme, _, credentials = (call.authorization or "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        raise TokenNotFoundError(
            "Attestation Token not found: attest first (/auth, /attest) or send a bearer token"
        )

    async def _allowed(
        self,
        token: str,
        claims: JsonValue,
        policy_data: dict[str, JsonValue],
        repository: ResourcePath | None,
    ) -> tuple[bool, str]:
        """The answer of the policy that governs ``repository`` (a tenant's, else the global
        one), counted (``kbs_policy_*``), and that policy's id.

        A session's GETs ask the same question again and again: an allow is remembered by
        (token, policy text, request data), for a deterministic policy only (a denial is not:
        it may be a policy that hit its time or memory limit), so a repeat costs a
        look-up instead of serializing the token's claims for the policy's own memory. A changed
        policy text, another governing policy or another version is another key. The token's
        time window is checked before this, on every call."""
        metrics = self._services.metrics
        metrics.policy_evaluations.inc()
        try:
            governing = await self._services.resource_policy.governing(repository)
            key = None
            if governing.policy.remembers:
                # digests, not the texts: a guest's query string must not grow the memory
                data_json = json.dumps(policy_data, sort_keys=True, separators=(",", ":"))
                data = hashlib.blake2b(data_json.encode(), digest_size=16).digest()
                digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
                key = (digest, governing.policy_id, governing.policy.source, data)
            allowed = None
            if key is not None:
                allowed = self._decisions.get(key)
                if allowed is not None:
                    self._decisions.move_to_end(key)
            if allowed is None:
                allowed = await decision(governing.policy, claims, policy_data)
                if key is not None and allowed:  # a denial may be a limit hit: ask again
                    self._remember(key)
        except Exception:
            metrics.policy_errors.inc()
            raise
        (metrics.policy_approvals if allowed else metrics.policy_violations).inc()
        return allowed, governing.policy_id

    def _remember(self, key: _DecisionKey) -> None:
        self._decisions[key] = True
        while len(self._decisions) > DECISIONS_REMEMBERED:
            self._decisions.popitem(last=False)

    async def _handle(self, plugin: Plugin, request: PluginRequest) -> PluginResponse:
        with self._services.metrics.plugin_call(plugin.name):
            return await plugin.handle(request)

"""The release decision as a service, driven without HTTP: ``ReleaseService`` over the real
services (session store, builtin AS, token verifier, policy workers, resource plugin, file
audit log) that ``build_services`` makes from a config. A guest attests through the real
handshake; what the HTTP handler would parse is handed over as an ``ApiCall``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from conftest import FakeClock, kbs_config
from keybroker.client.attesters import SampleAttester
from keybroker.client.keys import TeeKey
from keybroker.errors import (
    AdminDeniedError,
    MethodNotAllowedError,
    PluginNotFoundError,
    PolicyDeniedError,
    TokenNotFoundError,
    TokenVerificationError,
)
from keybroker.kbs import release
from keybroker.kbs.app import KbsState, create_app, kbs_state
from keybroker.kbs.calls import ApiCall
from keybroker.kbs.release import ReleaseService
from keybroker.kbs.resource_policy import POLICY_ID, TenantPrefix, builtin_policy, decision
from keybroker.kbs.services import KbsServices, build_services
from keybroker.plugins.base import PluginResponse
from keybroker.protocol.canonical import runtime_data, runtime_data_digest
from keybroker.protocol.models import PROTOCOL_VERSION, JsonValue

SECRET = b"released by the service"
PATH = ("default", "key", "one")
ALLOW, DENY = builtin_policy("allow_all"), builtin_policy("deny_all")


@dataclass
class Kbs:
    services: KbsServices
    release: ReleaseService
    audit_log: Path

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def metric(self, name: str) -> float:
        text = self.services.metrics.render().decode()
        found = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]
        return sum(found)


def _call(
    method: str,
    *rest: str,
    body: bytes = b"",
    session_id: str | None = None,
    authorization: str | None = None,
) -> ApiCall:
    """What the handler would parse from ``<method> /kbs/v0/resource/<rest>``."""
    return ApiCall(
        method=method,
        name="resource",
        rest=rest,
        query={},
        body=body,
        raw_path="/kbs/v0/resource/" + "/".join(rest),
        peer="192.0.2.7",
        session_id=session_id,
        authorization=authorization,
    )


def _run(
    tmp_path: Path,
    test: Callable[[Kbs], Awaitable[None]],
    clock: FakeClock | None = None,
    **sections: object,
) -> None:
    async def main() -> None:
        async with _kbs(tmp_path, clock, **sections) as kbs:
            await test(kbs)

    asyncio.run(main())


@asynccontextmanager
async def _kbs(
    tmp_path: Path, clock: FakeClock | None = None, **sections: object
) -> AsyncIterator[Kbs]:
    log = tmp_path / "audit.log"
    config = kbs_config(audit={"path": str(log), "fsync": "never"}, **sections)
    services = build_services(config, clock=clock or FakeClock())
    await services.start()
    try:
        yield Kbs(services, ReleaseService(services), log)
    finally:
        await services.stop()


async def _store(kbs: Kbs, value: bytes = SECRET, path: tuple[str, ...] = PATH) -> None:
    """Upload a resource through the service's admin path (InsecureAllowAll in tests)."""
    answer = await kbs.release.plugin(_call("POST", *path, body=value))
    assert isinstance(answer, PluginResponse)  # an admin's answer is never sealed
    assert answer.status == 200


def _sealed(answer: PluginResponse | dict[str, str]) -> dict[str, str]:
    assert isinstance(answer, dict), "a guest's answer is the JWE members, not the plaintext"
    return answer


async def _attest(kbs: Kbs, key: TeeKey) -> tuple[str, str]:
    """The real handshake on the services: (session id, token)."""
    handshake = kbs.services.handshake
    assert handshake is not None
    request = {"version": PROTOCOL_VERSION, "tee": "sample", "extra-params": {}}
    challenge, session = await handshake.auth(json.dumps(request).encode())
    tee_pubkey = key.public_jwk()
    data = runtime_data(challenge.nonce, tee_pubkey, "")
    algorithm = session.hash_algorithm
    evidence = SampleAttester().evidence(runtime_data_digest(data, algorithm))
    body: JsonValue = {
        "init-data": None,
        "runtime-data": {"nonce": challenge.nonce, "tee-pubkey": tee_pubkey},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }
    token, _ = await handshake.attest(json.dumps(body).encode(), session.id)
    return session.id, token


def test_a_session_s_token_releases_the_resource_sealed_to_its_tee_key(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        await _store(kbs)
        key = TeeKey.generate()
        session_id, _ = await _attest(kbs, key)
        sealed = _sealed(await kbs.release.plugin(_call("GET", *PATH, session_id=session_id)))
        assert SECRET not in json.dumps(sealed).encode()
        assert key.decrypt(sealed) == SECRET
        upload, release = kbs.records()
        assert (upload["action"], upload["decision"]) == ("admin POST resource", "allow")
        assert (release["action"], release["decision"]) == ("release GET resource", "allow")
        assert release["target"] == "default/key/one"
        assert release["peer"] == "192.0.2.7"
        assert release["subject"]["kind"] == "guest"
        assert release["subject"]["tee"] == "sample"
        assert release["reason"] == "version 1"
        assert upload["request_id"] != release["request_id"]
        assert kbs.metric("kbs_policy_approvals_total") == 1

    _run(tmp_path, test)


def test_a_bearer_token_is_taken_when_the_call_names_no_session(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        await _store(kbs)
        key = TeeKey.generate()
        _, token = await _attest(kbs, key)
        call = _call("GET", *PATH, authorization=f"Bearer {token}")
        assert key.decrypt(_sealed(await kbs.release.plugin(call))) == SECRET

    _run(tmp_path, test)


def test_resource_request_without_token_is_refused_and_recorded(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        await _store(kbs)
        with pytest.raises(TokenNotFoundError):
            await kbs.release.plugin(_call("GET", *PATH, session_id="0" * 32))
        denial = kbs.records()[-1]
        assert (denial["action"], denial["decision"]) == ("release GET resource", "deny")
        assert denial["subject"] is None
        assert "Attestation Token not found" in denial["reason"]
        assert kbs.metric("kbs_policy_evaluations_total") == 0  # refused before the policy

    _run(tmp_path, test)


def test_policy_denial_is_counted_and_recorded_with_the_deciding_policy(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(DENY)
        await _store(kbs)
        session_id, _ = await _attest(kbs, TeeKey.generate())
        with pytest.raises(PolicyDeniedError):
            await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))
        denial = kbs.records()[-1]
        assert denial["decision"] == "deny"
        assert denial["reason"] == f"denied by the resource policy {POLICY_ID}"
        assert denial["subject"]["tee"] == "sample"
        assert kbs.metric("kbs_policy_violations_total") == 1
        assert kbs.metric("kbs_policy_approvals_total") == 0

    _run(tmp_path, test)


def test_a_tenant_policy_decides_for_its_prefix_only(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        policies = kbs.services.resource_policy
        await policies.set(DENY)
        await policies.set(ALLOW, TenantPrefix.parse(["tenant-a"]))
        inside, outside = ("tenant-a", "key", "one"), ("tenant-b", "key", "one")
        await _store(kbs, path=inside)
        await _store(kbs, path=outside)
        key = TeeKey.generate()
        session_id, _ = await _attest(kbs, key)
        call = _call("GET", *inside, session_id=session_id)
        assert key.decrypt(_sealed(await kbs.release.plugin(call))) == SECRET
        with pytest.raises(PolicyDeniedError):
            await kbs.release.plugin(_call("GET", *outside, session_id=session_id))
        assert kbs.records()[-1]["reason"] == f"denied by the resource policy {POLICY_ID}"

    _run(tmp_path, test)


def test_unknown_plugin_and_unanswered_method_are_refused_before_any_record(
    tmp_path: Path,
) -> None:
    async def test(kbs: Kbs) -> None:
        with pytest.raises(PluginNotFoundError):
            await kbs.release.plugin(ApiCall("GET", "no-such-plugin", (), {}, b""))
        with pytest.raises(MethodNotAllowedError) as refused:
            await kbs.release.plugin(_call("PATCH", *PATH))
        assert "PATCH" not in refused.value.allow
        assert not kbs.audit_log.exists() or kbs.records() == []

    _run(tmp_path, test)


def test_admin_call_under_deny_all_is_refused_recorded_and_never_runs(tmp_path: Path) -> None:
    ran: list[bool] = []

    async def operation() -> str:
        ran.append(True)
        return "changed"

    async def test(kbs: Kbs) -> None:
        call = ApiCall("POST", "resource-policy", (), {}, b"", raw_path="/kbs/v0/resource-policy")
        with pytest.raises(AdminDeniedError):
            await kbs.release.as_admin(call, operation)
        assert ran == []
        (denial,) = kbs.records()
        assert (denial["action"], denial["decision"]) == ("admin POST resource-policy", "deny")
        assert "DenyAll" in denial["reason"]

    _run(tmp_path, test, admin={"authorization_mode": "DenyAll"})


def test_the_app_s_state_is_reached_through_the_typed_accessor_only() -> None:
    app = create_app(kbs_config())
    state = kbs_state(app)
    assert isinstance(state, KbsState)
    assert isinstance(state.release, ReleaseService)
    assert state.instance_id == "in-process"
    assert state.metrics_access == "loopback"
    assert state.console is None
    with pytest.raises(TypeError, match="create_app"):
        kbs_state(Starlette())  # an app this module did not build
    with pytest.raises(TypeError, match="create_app"):
        kbs_state(object())
    asyncio.run(state.services.stop())


class _CountedDecisions:
    """``release.decision``, counted: how often the policy workers' answer was asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._decision = decision
        monkeypatch.setattr(release, "decision", self)

    async def __call__(self, *args: Any) -> bool:
        self.calls += 1
        return await self._decision(*args)


def test_a_session_s_repeated_gets_ask_the_policy_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = _CountedDecisions(monkeypatch)

    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        await _store(kbs)
        key = TeeKey.generate()
        session_id, _ = await _attest(kbs, key)
        for _ in range(3):
            sealed = _sealed(await kbs.release.plugin(_call("GET", *PATH, session_id=session_id)))
            assert key.decrypt(sealed) == SECRET
        assert counted.calls == 1
        # every release is still counted and recorded
        assert kbs.metric("kbs_policy_approvals_total") == 3
        assert [r["decision"] for r in kbs.records()[1:]] == ["allow"] * 3
        # another session (another token) is another question
        other, _ = await _attest(kbs, TeeKey.generate())
        await kbs.release.plugin(_call("GET", *PATH, session_id=other))
        assert counted.calls == 2

    _run(tmp_path, test)


def test_a_remembered_allow_does_not_outlive_a_policy_change(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        policies = kbs.services.resource_policy
        await policies.set(ALLOW)
        await _store(kbs)
        session_id, _ = await _attest(kbs, TeeKey.generate())
        await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))
        await policies.set(DENY)
        with pytest.raises(PolicyDeniedError):
            await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))
        # nor a tenant policy that now governs the path
        await policies.set(ALLOW)
        await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))
        await policies.set(DENY, TenantPrefix.parse(["default"]))
        with pytest.raises(PolicyDeniedError):
            await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))

    _run(tmp_path, test)


def test_a_remembered_allow_does_not_outlive_its_token(tmp_path: Path) -> None:
    clock = FakeClock()

    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        await _store(kbs)
        _, token = await _attest(kbs, TeeKey.generate())
        call = _call("GET", *PATH, authorization=f"Bearer {token}")
        await kbs.release.plugin(call)
        clock.advance(24 * 3600)  # far past the token's expiry
        with pytest.raises(TokenVerificationError):
            await kbs.release.plugin(call)
        assert kbs.records()[-1]["decision"] == "deny"

    _run(tmp_path, test, clock)


def test_a_denial_is_asked_again_never_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = _CountedDecisions(monkeypatch)

    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(DENY)
        await _store(kbs)
        session_id, _ = await _attest(kbs, TeeKey.generate())
        for _ in range(2):
            with pytest.raises(PolicyDeniedError):
                await kbs.release.plugin(_call("GET", *PATH, session_id=session_id))
        assert counted.calls == 2

    _run(tmp_path, test)


def test_remembered_decisions_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "DECISIONS_REMEMBERED", 2)

    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        paths = [("default", "key", f"k{i}") for i in range(4)]
        for path in paths:
            await _store(kbs, path=path)
        session_id, _ = await _attest(kbs, TeeKey.generate())
        for path in paths:
            await kbs.release.plugin(_call("GET", *path, session_id=session_id))
        assert len(kbs.release._decisions) == 2

    _run(tmp_path, test)


def test_a_huge_request_does_not_grow_the_remembered_decisions(tmp_path: Path) -> None:
    async def test(kbs: Kbs) -> None:
        await kbs.services.resource_policy.set(ALLOW)
        long_tag = "t" * 200
        await _store(kbs, path=("default", "key", long_tag))
        session_id, _ = await _attest(kbs, TeeKey.generate())
        await kbs.release.plugin(_call("GET", "default", "key", long_tag, session_id=session_id))
        (key,) = kbs.release._decisions
        token_digest, _policy_id, _source, data_digest = key
        assert len(token_digest) == len(data_digest) == 16  # digests, never the request itself

    _run(tmp_path, test)

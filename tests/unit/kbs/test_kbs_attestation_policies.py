"""Upstream's attestation-service cases through the real HTTP API, with the SDK as the peer:
attestation policies, reference values, composite (device) evidence, init-data, explain."""

from __future__ import annotations

import base64
import hashlib
from functools import partial
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import Kbs, kbs_config, vector
from json_shapes import at
from keybroker.client.admin import AdminClient
from keybroker.client.attesters import SampleDeviceAttester
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.jws import decode_unverified

SECRET = b"released only to trustworthy guests"
CPU_NOT_CONTRAINDICATED = """
package policy
import rego.v1
default allow := false
allow if input.submods.cpu0["ear.status"] != "contraindicated"
"""
CPU_AND_GPU_NOT_CONTRAINDICATED = """
package policy
import rego.v1
default allow := false
allow if {
    input.submods.cpu0["ear.status"] != "contraindicated"
    input.submods.gpu0["ear.status"] != "contraindicated"
}
"""
GPU_POLICY = """
package policy
import rego.v1
default hardware := 97
hardware := 2 if input.sampledevice.svn in query_reference_value("device_svn")
trust_claims := {"hardware": hardware}
"""


def _claims(token: str) -> Any:
    return decode_unverified(token)[1]


def _admin(kbs: Kbs) -> AdminClient:
    return AdminClient("http://testserver", http=kbs.client)


def _guest(kbs: Kbs, **options: object) -> KbsClient:
    kbs.client.cookies.clear()
    return KbsClient("http://testserver", http=kbs.client, **options)  # type: ignore[arg-type]


def _register_sample_reference_values(admin: AdminClient) -> None:
    admin.set_sample_reference_value("svn", ["1"])
    admin.set_sample_reference_value("launch_digest", ["abcde"])
    admin.set_sample_reference_value("major_version", 1)
    admin.set_sample_reference_value("minimum_minor_version", 1)


def _denied(guest: KbsClient) -> int:
    with pytest.raises(KbsRejectedError) as rejected:
        guest.get_resource("default/key/one")
    return rejected.value.http_status


def test_deny_all_resource_policy(kbs: Kbs) -> None:
    _admin(kbs).set_resource("default/key/one", SECRET)
    _admin(kbs).set_resource_policy(builtin_policy("deny_all"))
    assert _denied(_guest(kbs)) == 403


def test_a_policy_denial_points_to_evaluate_policy(kbs: Kbs) -> None:
    _admin(kbs).set_resource("default/key/one", SECRET)
    _admin(kbs).set_resource_policy(builtin_policy("deny_all"))
    with pytest.raises(KbsRejectedError) as rejected:
        _guest(kbs).get_resource("default/key/one")
    assert "kbs-client config evaluate-policy" in rejected.value.detail


def test_reference_values_turn_contraindicated_into_release(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource("default/key/one", SECRET)
    admin.set_resource_policy(CPU_NOT_CONTRAINDICATED)
    assert _denied(_guest(kbs)) == 403
    _register_sample_reference_values(admin)
    assert admin.get_reference_value("svn") == ["1"]
    assert admin.get_reference_value("major_version") == 1
    guest = _guest(kbs)
    assert guest.get_resource("default/key/one") == SECRET
    assert guest.token is not None
    claims = _claims(guest.token)
    cpu0 = claims["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming"
    assert cpu0["ear.trustworthiness-vector"]["executables"] == 3
    assert cpu0["ear.trustworthiness-vector"]["hardware"] == 2


def test_expired_reference_value_no_longer_counts(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource("default/key/one", SECRET)
    admin.set_resource_policy(CPU_NOT_CONTRAINDICATED)
    _register_sample_reference_values(admin)
    assert _guest(kbs).get_resource("default/key/one") == SECRET
    kbs.clock.advance(366 * 24 * 3600)
    assert _denied(_guest(kbs)) == 403
    with pytest.raises(KbsRejectedError) as missing:
        admin.get_reference_value("svn")
    assert missing.value.http_status == 404


def test_sample_device_needs_its_own_reference_value_and_policy(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource("default/key/one", SECRET)
    admin.set_resource_policy(CPU_AND_GPU_NOT_CONTRAINDICATED)
    _register_sample_reference_values(admin)
    with_device = {"device_attesters": [SampleDeviceAttester()]}
    assert _denied(_guest(kbs, **with_device)) == 403  # gpu0 contraindicated
    admin.set_attestation_policy(GPU_POLICY, policy_id="default_gpu")
    assert _denied(_guest(kbs, **with_device)) == 403  # no device_svn yet
    admin.set_sample_reference_value("device_svn", ["2"])
    guest = _guest(kbs, **with_device)
    assert guest.get_resource("default/key/one") == SECRET
    assert guest.token is not None
    claims = _claims(guest.token)
    gpu0 = claims["submods"]["gpu0"]
    assert gpu0["ear.trustworthiness-vector"] == {"hardware": 2}
    assert gpu0["ear.veraison.annotated-evidence"]["sampledevice"] == {"svn": "2"}
    # the device bound the runtime data without the additional evidence
    assert (
        "additional-evidence" not in gpu0["ear.veraison.annotated-evidence"]["runtime_data_claims"]
    )


def _init_data() -> str:
    return vector("integration", "init-data-with-policy.toml").read_text()


def test_agent_policy_identifiers_extension(kbs: Kbs) -> None:
    token = _guest(kbs, init_data=_init_data()).attest()
    claims = _claims(token)
    identifiers = claims["submods"]["cpu0"]["ear.trustee.identifiers"]
    assert identifiers["validated"] == {
        "container_images": ["bitnami/nginx:latest"],
        "container_uids": [65535, 1001],
    }


def test_init_data_hash_config_and_agent_policy_claims(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource("default/key/one", SECRET)
    text = _init_data()
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    evidence = 'input.submods.cpu0["ear.veraison.annotated-evidence"]'
    cases = {
        "hash": f'{evidence}.init_data == "{digest}"',
        "agent-policy claim": (
            f"{evidence}.init_data_claims.agent_policy_claims.containers[1]"
            ".OCI.Process.User.UID == 1001"
        ),
    }
    for rule in cases.values():
        admin.set_resource_policy(
            f"package policy\ndefault allow := false\nallow if {{ {rule} }}\n"
        )
        assert _guest(kbs, init_data=text).get_resource("default/key/one") == SECRET
        assert _denied(_guest(kbs)) == 403  # without init-data the claim is absent


def test_init_data_config_claim(kbs: Kbs) -> None:
    admin = _admin(kbs)
    admin.set_resource("default/key/one", SECRET)
    admin.set_resource_policy(
        "package policy\ndefault allow := false\n"
        'allow if { input.submods.cpu0["ear.veraison.annotated-evidence"]'
        '.init_data_claims["cdh.toml"].kbc.name == "cc_kbc" }\n'
    )
    init_data = (
        'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n'
        '"cdh.toml" = """\n[kbc]\nname = "cc_kbc"\nurl = "http://kbs"\n"""\n'
    )
    assert _guest(kbs, init_data=init_data).get_resource("default/key/one") == SECRET
    other = init_data.replace("cc_kbc", "offline_fs_kbc")
    assert _denied(_guest(kbs, init_data=other)) == 403


def test_malformed_attestation_policy_is_400_with_rego_error(kbs: Kbs) -> None:
    with pytest.raises(KbsRejectedError) as rejected:
        _admin(kbs).set_attestation_policy("package policy\ntrust_claims := {", policy_id="x")
    assert rejected.value.http_status == 400
    assert "unclosed" in rejected.value.remote_detail
    with pytest.raises(KbsRejectedError) as unknown_fn:
        _admin(kbs).set_attestation_policy("package policy\nx := nope(1)\n", policy_id="x")
    assert "Function not found: nope" in unknown_fn.value.remote_detail


# a claim name no scan of the text can see, set only for some evidence: only an appraisal
# of that evidence finds it
COMPUTED_UNKNOWN_CLAIM = (
    'package policy\ntrust_claims := {concat("-", ["made", "up"]): 2} if input.sample\n'
)


def test_unknown_trust_claim_set_only_for_some_evidence_is_a_clear_error(kbs: Kbs) -> None:
    bad = COMPUTED_UNKNOWN_CLAIM
    _admin(kbs).set_attestation_policy(bad, policy_id="default_cpu")
    with pytest.raises(KbsRejectedError) as failed:
        _guest(kbs).attest()
    assert "unknown trust claim 'made-up'" in failed.value.remote_detail


def test_misspelled_trust_claim_is_refused_at_upload(kbs: Kbs) -> None:
    admin = _admin(kbs)
    for bad, expected in (
        ('trust_claims := {"executable": 3}', "unknown trust claim 'executable'"),
        ('trust_claims := {"executable": 3} if input.sample', "unknown trust claim 'executable'"),
        ('trust_claims["hardwar"] := 2 if input.sample', "unknown trust claim 'hardwar'"),
        ('trust_claims := {"executables": 300}', "trust claim executables must be -128..127"),
        ('trust_claims := {"hardware": "2"}', "trust claim hardware must be -128..127"),
        ('trust_claims := {"hardware": 2}\nextensions := [{"name": "x"}]', "needs key, value"),
    ):
        with pytest.raises(KbsRejectedError) as refused:
            admin.set_attestation_policy(f"package policy\n{bad}\n", policy_id="default_cpu")
        assert refused.value.http_status == 400
        assert expected in refused.value.remote_detail
    token = _guest(kbs).attest()  # the stored default policy still appraises
    assert _claims(token)["submods"]["cpu0"]["ear.status"] == "contraindicated"


def test_explain_reports_the_error_a_real_appraisal_gives(kbs: Kbs) -> None:
    admin = _admin(kbs)
    bad = COMPUTED_UNKNOWN_CLAIM
    admin.set_attestation_policy(bad, policy_id="default_cpu")
    with pytest.raises(KbsRejectedError) as failed:
        _guest(kbs).attest()
    evidence = {"sample": {"svn": "1"}}
    stored = admin.explain_policy({"kind": "attestation", "input": evidence})
    draft = admin.explain_policy(
        {
            "kind": "attestation",
            "input": evidence,
            "policy": base64.urlsafe_b64encode(bad.encode()).decode(),
        }
    )
    for explained in (stored, draft):
        assert explained["decision"] is None
        assert explained["error"] == failed.value.remote_detail
        assert explained["rules"] == {"trust_claims": {"made-up": 2}}


def test_explain_shows_the_failing_rule_on_deny(kbs: Kbs) -> None:
    admin = _admin(kbs)
    token = _guest(kbs).attest()
    explained = admin.explain_policy(
        {
            "kind": "resource",
            "token": token,
            "data": {"plugin": "resource", "resource-path": ["default", "key", "one"]},
        }
    )
    assert explained["decision"] == {"allow": False}
    assert explained["rules"] == {"allow": False, "from_sample_tee": True}
    appraisal = admin.explain_policy({"kind": "attestation", "token": token})
    assert at(appraisal, "decision", "status") == "contraindicated"
    assert at(appraisal, "rules", "hardware") == 97
    assert at(appraisal, "rules", "executables") == 33


ENVIRONMENT_READERS = (
    "opa.runtime().env",
    'opa["runtime"]().env',
    "opa #\n.runtime().env",
    'object.get(opa.runtime(), "env", {})',
)


def test_policy_cannot_read_the_process_environment(
    kbs: Kbs, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "keybroker-env-marker-5e2b"
    monkeypatch.setenv("KEYBROKER_TEST_SECRET", marker)
    admin = _admin(kbs)
    replies: list[str] = []
    for reader in ENVIRONMENT_READERS:
        attestation = (
            'package policy\ntrust_claims := {"hardware": 2}\n'
            f'extensions := [{{"name": "leak", "key": 70000, "value": {reader}}}]\n'
        )
        resource = f"package policy\nallow := count({reader}) > 0\n"
        attempts = (
            partial(admin.set_attestation_policy, attestation, policy_id="default_cpu"),
            partial(admin.set_resource_policy, resource),
            partial(
                admin.explain_policy, {"kind": "resource", "input": {}, "policy": _b64(resource)}
            ),
            partial(
                admin.explain_policy,
                {"kind": "attestation", "input": {}, "policy": _b64(attestation)},
            ),
        )
        for attempt in attempts:
            with pytest.raises(KbsRejectedError) as refused:
                attempt()
            assert refused.value.http_status == 400
            assert "opa.runtime() reveals the KBS environment" in refused.value.remote_detail
            replies.append(refused.value.remote_detail)
    token = _guest(kbs).attest()
    explained = admin.explain_policy({"kind": "attestation", "token": token})
    assert all(marker not in text for text in (*replies, token, str(explained)))


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def test_explain_a_draft_policy_and_report_errors(kbs: Kbs) -> None:
    draft = base64.urlsafe_b64encode(b"package policy\nallow := input.x > 1\n").decode()
    result = _admin(kbs).explain_policy(
        {"kind": "resource", "policy": draft, "input": {"x": 2}, "data": {}}
    )
    assert result["decision"] == {"allow": True}
    with pytest.raises(KbsRejectedError) as both:
        _admin(kbs).explain_policy({"kind": "resource", "input": {}, "token": "x.y.z"})
    assert both.value.http_status == 400


def test_reference_value_message_validation(kbs: Kbs) -> None:
    admin = _admin(kbs)
    for message in (
        {"version": "0.2.0", "type": "sample", "payload": ""},
        {"type": "nope", "payload": ""},
        {"type": "sample", "payload": "not base64!"},
    ):
        with pytest.raises(KbsRejectedError) as rejected:
            admin.register_reference_value(message)
        assert rejected.value.http_status == 400


def test_policy_endpoints_are_admin_only() -> None:
    config = kbs_config(admin={"authorization_mode": "DenyAll"})
    with TestClient(create_app(config)) as client:
        for path in ("attestation-policy", "reference-value", "policy-explain"):
            assert client.post(f"/kbs/v0/{path}", json={}).status_code == 403
        assert client.get("/kbs/v0/reference-value/svn").status_code == 403

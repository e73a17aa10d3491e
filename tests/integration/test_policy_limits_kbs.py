"""Policies that never finish, or grow without bound, at upload and at request time: the KBS
refuses or denies, names the limit, and keeps serving (every evaluation runs in a worker
process, killed at ``[policy] timeout_seconds`` or ``memory_mib``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from starlette.testclient import TestClient

from conftest import FakeClock, Kbs, kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.app import create_app, kbs_state
from keybroker.kbs.resource_policy import builtin_policy

SECRET = b"released only when the policy says so"
# about 10^10 steps with two 10^5-element arrays: CPU without much memory
SPINS = "every i in numbers.range(1, 100000) { every j in numbers.range(1, 100000) { i != -j } }"
CPU_RUNAWAY = f"package policy\nimport rego.v1\nallow if {{ {SPINS} }}\n"
MEMORY_RUNAWAY = "package policy\nallow := count(numbers.range(1, 100000000)) > 0\n"
# cheap on the empty input of the upload check, endless for a real guest
RUNAWAY_FOR_GUESTS = (
    "package policy\nimport rego.v1\ndefault allow := false\n"
    f"allow if {{ input.submods\n{SPINS} }}\n"
)


@contextmanager
def _kbs(**limits: object) -> Iterator[Kbs]:
    config = kbs_config(policy=limits)
    clock = FakeClock()
    with TestClient(create_app(config, clock=clock)) as client:
        yield Kbs(client, clock, config)


def _admin(kbs: Kbs) -> AdminClient:
    return AdminClient("http://testserver", http=kbs.client)


def _refusal(call: object) -> KbsRejectedError:
    assert callable(call)
    with pytest.raises(KbsRejectedError) as refused:
        call()
    return refused.value


def test_runaway_policy_upload_is_refused_with_the_limit_named() -> None:
    with _kbs(timeout_seconds=1, memory_mib=4096) as kbs:
        admin = _admin(kbs)
        slow = _refusal(lambda: admin.set_resource_policy(CPU_RUNAWAY))
        assert slow.http_status == 400
        assert "exceeded the time limit of 1 s ([policy] timeout_seconds)" in slow.remote_detail
        attestation = (
            f'package policy\nimport rego.v1\ntrust_claims := {{"hardware": 2}} if {{ {SPINS} }}\n'
        )
        slow_as = _refusal(lambda: admin.set_attestation_policy(attestation))
        assert slow_as.http_status == 400 and "time limit of 1 s" in slow_as.remote_detail
        admin.set_resource("default/key/one", SECRET)  # the KBS still serves, with new workers
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://testserver", http=kbs.client)
        assert guest.get_resource("default/key/one") == SECRET
    with _kbs(timeout_seconds=60, memory_mib=256) as kbs:
        big = _refusal(lambda: _admin(kbs).set_resource_policy(MEMORY_RUNAWAY))
        assert big.http_status == 400
        assert "exceeded the memory limit of 256 MiB ([policy] memory_mib)" in big.remote_detail


def test_runaway_policy_at_request_time_denies(caplog: pytest.LogCaptureFixture) -> None:
    with _kbs(timeout_seconds=1) as kbs:
        admin = _admin(kbs)
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(RUNAWAY_FOR_GUESTS)  # passes the upload check
        guest = KbsClient("http://testserver", http=kbs.client)
        denied = _refusal(lambda: guest.get_resource("default/key/one"))
        assert denied.http_status == 403
        assert "exceeded the time limit of 1 s" in caplog.text
        admin.set_resource_policy(builtin_policy("allow_all"))
        assert guest.get_resource("default/key/one") == SECRET


def test_healthz_answers_while_a_runaway_policy_evaluates() -> None:
    with _kbs(timeout_seconds=10, workers=1) as kbs:
        services = kbs_state(kbs.client.app).services
        refusals: list[KbsRejectedError] = []
        upload = threading.Thread(
            target=lambda: refusals.append(
                _refusal(lambda: _admin(kbs).set_resource_policy(CPU_RUNAWAY))
            )
        )
        upload.start()
        waited = threading.Event()
        for _ in range(1000):  # until the worker is busy with it (a no-hang bound)
            if services.policy_workers.busy:
                break
            waited.wait(0.01)
        assert services.policy_workers.busy == 1
        reply = kbs.client.get("/healthz")
        assert reply.status_code == 200 and upload.is_alive()
        upload.join(timeout=60)
        assert [r.http_status for r in refusals] == [400]


def test_policy_that_crashes_rego_cpp_is_refused_and_the_kbs_survives() -> None:
    with _kbs() as kbs:
        admin = _admin(kbs)
        crash = "package policy\nimport rego.v1\nallow if { some k; data[k] == 1 }\n"
        refused = _refusal(lambda: admin.set_resource_policy(crash))
        assert refused.http_status == 400
        assert "the policy worker died" in refused.remote_detail
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        guest = KbsClient("http://testserver", http=kbs.client)
        assert guest.get_resource("default/key/one") == SECRET

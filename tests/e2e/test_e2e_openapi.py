"""The KBS API as a contract: schemathesis against a live ``kbs``, with the served document.

Two bounded, seeded runs (every check schemathesis has): one with the open dev admin
(InsecureAllowAll), one with JWT admin auth. Each must end with no failure at all: no 5xx, no
response the document does not describe, no undeclared method answered with anything but a
405 carrying the right ``Allow``. The stateful phase follows the document's link from /auth to
/attest (session cookie and nonce carried over); real evidence cannot be fuzzed, so a third
process walks the paths fuzzing cannot reach (a sample guest attests and gets a resource, a
body over the size limit, a client over its rate limit) and validates each answer against the
document. Then every documented (operation, status) must have been seen, or be listed in
``UNREACHABLE`` with the reason. ``docs/api.md`` says how to run a longer campaign.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ed25519

from admin_tokens import mint, write_public_pem
from kbs_process import BIN, running_kbs
from keybroker.attestation.policy import builtin_attestation_policy
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.kbs.openapi import document
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
# Bounded for `make test` on a loaded 2-core machine: a fixed number of cases per operation,
# one fixed seed, no example database carried between runs. docs/api.md: the longer run.
MAX_EXAMPLES = int(os.environ.get("KBS_SCHEMATHESIS_MAX_EXAMPLES", "8"))
SEED = int(os.environ.get("KBS_SCHEMATHESIS_SEED", "20"))
METHODS = ("get", "post", "put", "delete")

Operation = tuple[str, str, int]  # path template, method, status

_5XX = "a healthy deployment; that no request gets a 5xx is what the runs assert"
_NO_AS = "this KBS has an attestation service; passport mode is tests/unit/kbs/test_kbs_passport.py"
_PKCS11 = "the pkcs11 plugin needs an HSM; tests/e2e/test_e2e_pkcs11.py runs it with SoftHSM"
_METHOD_405 = (
    "every documented method of this endpoint is served in this deployment (the 405s are for "
    "undocumented methods, which schemathesis sends too)"
)


_REMOTE_ONLY = (
    "answered (405 UnsupportedOperation) by a KBS whose attestation service or RVPS is remote, "
    "which cannot list, read or delete; tests/unit/kbs/test_kbs_policy_read_back.py has them"
)
_METRICS_LOOPBACK = (
    "both runs serve /metrics to loopback clients ([metrics] access = loopback, the default), "
    "which is what schemathesis is; admin mode's 401 and 403 are in tests/unit/kbs/"
    "test_kbs_metrics.py"
)


_HAS_RESOURCE_PLUGIN = "this KBS has a resource plugin (a listing without one is a 404)"
_LISTINGS = (
    "/kbs/v0/resources",
    "/kbs/v0/resources/{repository}",
    "/kbs/v0/resources/{repository}/{type}",
)
_META = "/kbs/v0/resource-meta/{repository}/{type}/{tag}"
_STDOUT_AUDIT = (
    "every run writes its audit log to a file, which the KBS can read back; the stdout sink's "
    "404 is tests/unit/kbs/test_kbs_audit_read.py"
)


def _unreachable() -> dict[Operation, str]:
    """(operation, status) pairs no run reaches, and why. Kept exact: a pair that a run does
    reach must leave this table (the test says so)."""
    table: dict[Operation, str] = {}
    for path, method, status in _documented():
        if status >= 500:
            table[path, method, status] = _5XX
        elif path.startswith("/kbs/v0/pkcs11/") and status not in (404, 413):
            table[path, method, status] = _PKCS11
    for path in ("/kbs/v0/auth", "/kbs/v0/attest"):
        table[path, "post", 404] = _NO_AS
        table[path, "post", 405] = _METHOD_405
    for path, method in [
        ("/kbs/v0/resource-policy", "get"),
        ("/kbs/v0/resource-policy", "post"),
        ("/kbs/v0/attestation-policy", "post"),
        ("/kbs/v0/reference-value", "post"),
        ("/kbs/v0/reference-value/{reference_value_id}", "get"),
        ("/kbs/v0/policy-explain", "post"),
        ("/kbs/v0/resource-policy/{policy_id}", "get"),
        ("/kbs/v0/resource-policy/{repository}/{type}", "get"),
        ("/kbs/v0/resource-policy/{repository}/{type}", "post"),
        ("/kbs/v0/resource-policy/{repository}/{type}", "delete"),
        *[(path, "get") for path in _LISTINGS],
        (_META, "get"),
        *[(f"{_META}/{action}", "post") for action in ("delete", "purge", "rollback", "undelete")],
        ("/kbs/v0/audit-log", "get"),
        ("/kbs/v0/audit-log/attestations", "get"),
        ("/kbs/v0/console/{file}", "get"),
    ]:
        table[path, method, 405] = _METHOD_405
    # (the fixed seed reaches the router's 404 on the two-segment form, with a newline in it)
    for path in _LISTINGS[:2]:
        table[path, "get", 404] = _HAS_RESOURCE_PLUGIN
    for path in ("/kbs/v0/audit-log", "/kbs/v0/audit-log/attestations"):
        table[path, "get", 404] = _STDOUT_AUDIT
    for path, method in [
        ("/kbs/v0/attestation-policy", "get"),
        ("/kbs/v0/attestation-policy/{policy_id}", "get"),
        ("/kbs/v0/attestation-policy/{policy_id}", "delete"),
        ("/kbs/v0/reference-value", "get"),
        ("/kbs/v0/reference-value/{reference_value_id}", "delete"),
    ]:
        table[path, method, 405] = _REMOTE_ONLY
    for path, method in [
        ("/kbs/v0/attestation-policy", "post"),
        ("/kbs/v0/attestation-policy", "get"),
        ("/kbs/v0/reference-value", "post"),
        ("/kbs/v0/reference-value", "get"),
    ]:
        table[path, method, 404] = _NO_AS
    for status in (401, 403):
        table["/metrics", "get", status] = _METRICS_LOOPBACK
    return table


def _documented() -> set[Operation]:
    return {
        (path, method, int(status))
        for path, item in document()["paths"].items()
        for method in METHODS
        if method in item
        for status in item[method]["responses"]
    }


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/?]+", re.escape(path)) + "(\\?.*)?$")


TEMPLATES = [(path, _template(path)) for path in document()["paths"]]


def _operation(method: str, url: str) -> tuple[str, str] | None:
    path = "/" + url.split("/", 3)[3]
    for template, pattern in TEMPLATES:
        if pattern.match(path) and method.lower() in document()["paths"][template]:
            return template, method.lower()
    return None


def _reached_in(har: Path) -> set[Operation]:
    reached = set()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        operation = _operation(entry["request"]["method"], entry["request"]["url"])
        if operation is not None:
            reached.add((*operation, entry["response"]["status"]))
    return reached


SAMPLE_PLUGIN = '[[plugins]]\nname = "sample"\nitem = "sample"\n'


def _config(
    tmp_path: Path, port: int, admin: str, extra: str = "", sample: str = SAMPLE_PLUGIN
) -> Path:
    config = tmp_path / "kbs.toml"
    config.write_text(
        f"""[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true
{extra}
{admin}

[storage_backend]
storage_type = "LocalFs"
[storage_backend.backends.local_fs]
dir_path = "{tmp_path / "store"}"

[audit]
path = "{tmp_path / "audit.log"}"
fsync = "never"

[[plugins]]
name = "resource"
storage_backend_type = "kvstorage"

{sample}"""
    )
    return config


OPEN_ADMIN = '[admin]\nauthorization_mode = "InsecureAllowAll"\n'
# The open-admin run serves the console (its files' 200s); the JWT run leaves it off (404s).
CONSOLE_ON = "[console]\nenabled = true\n"


def _jwt_admin(public_key: Path) -> str:
    return f"""[admin]
authorization_mode = "AuthenticatedAuthorization"
[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "admin1-issuer", public_key_uri = "{public_key}" }}]
[admin.authorization.regex_acl]
acls = [{{ role = "admin", allowed_endpoints = "^/kbs/v0/(?!sample/).+$" }}]
"""


class Run:
    def __init__(
        self, result: subprocess.CompletedProcess[str], har: Path, walked: set[Operation]
    ) -> None:
        self.returncode = result.returncode
        self.output = result.stdout + result.stderr
        self.reached = _reached_in(har) | walked


def _schemathesis(
    tmp_path: Path,
    admin: str,
    headers: list[str],
    walk: Callable[[httpx.Client], None] | None = None,
) -> Run:
    """One bounded schemathesis run against a fresh kbs; then ``walk`` on the same server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _config(tmp_path, port, admin)
    har = tmp_path / "schemathesis.har"
    record = Recorder()
    with running_kbs(["-c", str(config)], tmp_path, url):
        result = subprocess.run(
            [
                str(BIN / "schemathesis"),
                "--no-color",
                "--config-file",
                str(CONFIG),
                "run",
                f"{url}/kbs/v0/openapi.json",
                "--url",
                url,
                "--checks",
                "all",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                str(SEED),
                "--generation-database",
                "none",
                "--workers",
                "1",
                "--report",
                "har",
                "--report-har-path",
                str(har),
                *headers,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=tmp_path,
        )
        (tmp_path / "schemathesis.out").write_text(result.stdout + result.stderr)
        if walk is not None:
            with httpx.Client(base_url=url, event_hooks={"response": [record]}) as http:
                walk(http)
    return Run(result, har, record.reached)


@pytest.fixture(scope="module")
def open_admin_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _schemathesis(tmp_path_factory.mktemp("open-admin"), OPEN_ADMIN + CONSOLE_ON, [])


@pytest.fixture(scope="module")
def jwt_admin_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    workdir = tmp_path_factory.mktemp("jwt-admin")
    key = ed25519.Ed25519PrivateKey.generate()
    public_key = write_public_pem(key, workdir / "admin.pub.pem")
    header = ["--header", f"Authorization: Bearer {mint(key)}"]

    def refusals(http: httpx.Client) -> None:
        """Every admin operation without a token (401) and with a role the ACL does not name
        (403): schemathesis sends its one admin token everywhere."""
        reader = {"Authorization": f"Bearer {mint(key, role='reader')}"}
        for path, method, status in sorted(_documented()):
            if path.startswith("/kbs/v0/pkcs11/") or path == "/metrics":
                continue  # not configured: 404 (see _PKCS11); loopback access (_METRICS_LOOPBACK)
            if status in (401, 403) and "AdminUnauthenticated" in str(
                document()["paths"][path][method]["responses"].get("401")
            ):
                concrete = re.sub(r"\{[^}]+\}", "a", path)
                headers = reader if status == 403 else {}
                assert http.request(method, concrete, headers=headers).status_code == status

    return _schemathesis(workdir, _jwt_admin(public_key), header, refusals)


class Recorder:
    """Every response an httpx client got, each validated against the document."""

    def __init__(self) -> None:
        self.schema = schemathesis.openapi.from_dict(document())
        self.reached: set[Operation] = set()

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        operation = _operation(response.request.method, str(response.request.url))
        assert operation is not None, response.request.url
        path, method = operation
        self.schema[path][method.upper()].validate_response(response)
        self.reached.add((path, method, response.status_code))


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> set[Operation]:
    """The statuses fuzzing cannot reach, walked on purpose with the SDK and raw requests."""
    tmp_path = tmp_path_factory.mktemp("walk")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    limits = "payload_request_size = 1\n\n[rate_limit]\nrequests_per_second = 0.001\nburst = 12\n"
    # Without the sample plugin: its operations answer the 404 the document gives them then.
    config = _config(tmp_path, port, OPEN_ADMIN, extra=limits, sample="")
    record = Recorder()
    with (
        running_kbs(["-c", str(config)], tmp_path, url),
        httpx.Client(base_url=url, event_hooks={"response": [record]}) as http,
    ):
        admin, guest = AdminClient(url, http=http), KbsClient(url, http=http)
        admin.set_resource("default/key/one", b"secret")
        with pytest.raises(KbsRejectedError, match="403"):
            guest.get_resource("default/key/one")  # the default policy denies a sample guest
        admin.set_resource_policy(builtin_policy("allow_all"))
        assert guest.get_resource("default/key/one") == b"secret"
        with pytest.raises(KbsRejectedError, match="404"):
            guest.get_resource("default/key/absent")
        assert http.get("/kbs/v0/openapi.json").status_code == 200
        admin.set_attestation_policy(builtin_attestation_policy("default_cpu"), policy_id="walked")
        http.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
        assert http.post("/kbs/v0/attest", content=b"[]").status_code == 400  # in a session
        # versions: every action's 200, and their 400s on a bad version
        assert admin.set_resource("default/key/one", b"second") == 2
        assert http.get("/kbs/v0/resource-meta/default/key/one").status_code == 200
        assert admin.rollback_resource("default/key/one", 1) == 3
        admin.delete_resource("default/key/one", version=2)
        admin.undelete_resource("default/key/one", 2)
        admin.purge_resource("default/key/one", 2)
        for action in ("rollback", "purge", "undelete", "delete"):
            bad = http.post(f"/kbs/v0/resource-meta/default/key/one/{action}", json={"version": 0})
            assert bad.status_code == 400
        for listing in (
            "/kbs/v0/resources",
            "/kbs/v0/resources/default",
            "/kbs/v0/resources/default/key",
        ):
            assert http.get(listing).status_code == 200
            assert http.get(listing, params={"limit": "0"}).status_code == 400
        admin.set_sample_reference_value("walked", ["1"])
        assert http.get("/kbs/v0/reference-value/walked").status_code == 200
        _walk_read_back_and_delete(http)
        for method in METHODS:
            assert http.request(method, "/kbs/v0/sample/x").status_code == 404
        too_big = b"x" * (1024 * 1024 + 1)
        for path, method, status in _documented():
            if status == 413:  # refused before the plugin is looked up
                concrete = re.sub(r"\{[^}]+\}", "a", path)
                assert http.request(method, concrete, content=too_big).status_code == 413
        for path in ("/kbs/v0/auth", "/kbs/v0/attest"):
            statuses = [http.post(path, content=b"{}").status_code for _ in range(12)]
            assert 429 in statuses
    return record.reached


def _walk_read_back_and_delete(http: httpx.Client) -> None:
    """Policies and reference values listed, read back, deleted; tenant policies; and the
    400s, 404s and 405s that schema-valid fuzzing does not produce."""
    allow = {"policy": base64.urlsafe_b64encode(builtin_policy("allow_all").encode()).decode()}
    for prefix in ("walked", "walked/keys"):
        assert http.post(f"/kbs/v0/resource-policy/{prefix}", json=allow).status_code == 200
        assert http.get(f"/kbs/v0/resource-policy/{prefix}").status_code == 200
        assert http.delete(f"/kbs/v0/resource-policy/{prefix}").status_code == 200
        assert http.get(f"/kbs/v0/resource-policy/{prefix}").status_code == 404
        assert http.delete(f"/kbs/v0/resource-policy/{prefix}").status_code == 404
    assert http.get("/kbs/v0/resource-policy/resource-policy").status_code == 200
    for method in ("POST", "DELETE"):  # the global policy is set at /kbs/v0/resource-policy
        reply = http.request(method, "/kbs/v0/resource-policy/resource-policy", json=allow)
        assert reply.status_code == 405
    for prefix in (".hidden", ".hidden/keys"):
        for method in ("GET", "POST", "DELETE"):
            reply = http.request(method, f"/kbs/v0/resource-policy/{prefix}", json=allow)
            assert reply.status_code == 400
    assert http.get("/kbs/v0/attestation-policy").status_code == 200
    for status in (200, 404):  # the second time round, it has gone
        for method in ("GET", "DELETE"):
            reply = http.request(method, "/kbs/v0/attestation-policy/walked")
            assert reply.status_code == status
    for method in ("GET", "DELETE"):
        assert http.request(method, "/kbs/v0/attestation-policy/a.b").status_code == 400
    assert http.get("/kbs/v0/reference-value").status_code == 200
    assert http.delete("/kbs/v0/reference-value/walked").status_code == 200
    assert http.delete("/kbs/v0/reference-value/walked").status_code == 404
    assert http.delete("/kbs/v0/reference-value/%F0%97%A9%AC%5Cg").status_code == 400


def test_open_admin_run_finds_no_server_error_and_no_spec_violation(open_admin_run: Run) -> None:
    assert open_admin_run.returncode == 0, open_admin_run.output[-6000:]
    assert open_admin_run.reached  # the HAR recorded the run


def test_jwt_admin_run_finds_no_server_error_and_no_spec_violation(jwt_admin_run: Run) -> None:
    assert jwt_admin_run.returncode == 0, jwt_admin_run.output[-6000:]
    assert ("/kbs/v0/sample/{path}", "get", 403) in jwt_admin_run.reached  # the ACL's refusal


def test_stateful_phase_follows_the_auth_to_attest_link(open_admin_run: Run) -> None:
    assert "Stateful" in open_admin_run.output
    assert re.search(r"API Links:\s+[1-9]\d* covered", open_admin_run.output), (
        open_admin_run.output[-3000:]
    )


def test_every_documented_status_is_reached_or_listed_unreachable(
    open_admin_run: Run, jwt_admin_run: Run, walked: set[Operation]
) -> None:
    reached = open_admin_run.reached | jwt_admin_run.reached | walked
    unreachable = _unreachable()
    missing = sorted(_documented() - reached - set(unreachable))
    assert not missing, f"documented, never reached and not listed unreachable: {missing}"
    stale = sorted(set(unreachable) & reached)
    assert not stale, f"listed unreachable but reached: {stale}"
    assert set(unreachable) <= _documented()
    assert not any(status >= 500 for _path, _method, status in reached)

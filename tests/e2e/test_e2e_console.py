"""The admin web console in a real browser: Debian's chromium driven by playwright against a
real ``kbs`` process with JWT admin auth and a file audit log (one browser and one KBS for the
module; each test opens its own page and logs in, so no state is shared through the page).

What is checked: logging in (pasted and from a file) keeps the token out of every browser
store; the CSP and nosniff headers are present and the CSP is enforced; an uploaded secret is
accepted and its value never shown; a resource policy edited to deny shows as a denial in the
explain view, for a token a sample guest obtained, and a tenant prefix's policy overrides it;
policies and reference values are listed, read back and deleted; the audit log shows a
verified chain (and the CLI reads the same endpoint); recent attestations are counted by TEE;
and HTML planted in a resource name or an audit record is shown as text, never run.

Resources are listed with their versions, and a secret uploaded twice is rolled back to its
first version from the versions table (the KBS then serves that value as version 3).
Screenshots go to build/console-screenshots/ (ignored by git).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from playwright.sync_api import (
    Browser,
    Dialog,
    Page,
    Response,
    Route,
    expect,
    sync_playwright,
)

from admin_tokens import mint, write_public_pem
from kbs_process import kbs_client, running_kbs
from keybroker.attestation.policy import builtin_attestation_policy
from keybroker.kbs.console import CSP
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/system-deps); never a downloaded one
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"
SECRET = "console-secret-value-never-displayed"
DENY_ALL = "package policy\n\ndefault allow := false\n"
# Would set a global and open a dialog if it ever ran.
PAYLOAD = '<img src=x onerror="window.__pwned=1;alert(1)">'


@dataclass(frozen=True)
class ConsoleKbs:
    url: str
    token: str
    token_file: Path
    guest_token: str
    audit_log: Path
    browser: Browser

    @property
    def console(self) -> str:
        return f"{self.url}/kbs/v0/console/"


@pytest.fixture(scope="module")
def kbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleKbs]:
    workdir = tmp_path_factory.mktemp("console")
    key = ed25519.Ed25519PrivateKey.generate()
    public_key = write_public_pem(key, workdir / "admin.pub.pem")
    token = mint(key, exp=int(time.time()) + 3600, sub="operator")
    token_file = workdir / "admin-token"
    token_file.write_text(token + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = workdir / "kbs.toml"
    config.write_text(
        f"""[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[admin]
authorization_mode = "AuthenticatedAuthorization"
[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "admin1-issuer", public_key_uri = "{public_key}" }}]
[admin.authorization.regex_acl]
acls = [{{ role = "admin", allowed_endpoints = "^/kbs/v0/.+$" }}]

[audit]
path = "{workdir / "audit.log"}"
fsync = "never"

[console]
enabled = true
"""
    )
    with running_kbs(["-c", str(config)], workdir, url), sync_playwright() as playwright:
        attested = kbs_client("--url", url, "attest")  # a sample guest's token
        assert attested.returncode == 0, attested.stderr
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield ConsoleKbs(
                url, token, token_file, attested.stdout.strip(), workdir / "audit.log", browser
            )
        finally:
            browser.close()


@pytest.fixture
def page(kbs: ConsoleKbs) -> Iterator[Page]:
    context = kbs.browser.new_context(viewport={"width": 1180, "height": 760})
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


def _log_in(page: Page, kbs: ConsoleKbs) -> None:
    page.goto(kbs.console)
    page.fill("#token", kbs.token)
    page.click("#login-button")
    expect(page.locator("#tabs")).to_be_visible()


def _tab(page: Page, name: str) -> None:
    page.click(f"#tabs button[data-view={name}]")


def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def _dialogs(page: Page) -> list[str]:
    opened: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        opened.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    return opened


def _audit_records(kbs: ConsoleKbs) -> list[dict[str, object]]:
    return [json.loads(line) for line in kbs.audit_log.read_text().splitlines()]


def test_login_keeps_the_token_out_of_storage_and_cookies(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    expect(page.locator("#who")).to_contain_text("role admin")
    stores = page.evaluate(
        "() => [localStorage.length, sessionStorage.length, document.cookie, window.name]"
    )
    assert stores == [0, 0, "", ""]
    assert page.context.cookies() == []
    assert page.input_value("#token") == ""  # not left in the page either
    assert kbs.token not in page.content()
    # the same from the token file, through the file input
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.set_input_files("#token-file", str(kbs.token_file))
    page.click("#login-button")
    expect(page.locator("#who")).to_contain_text("role admin")
    assert page.evaluate("() => [localStorage.length, sessionStorage.length]") == [0, 0]
    assert page.context.cookies() == []


def test_console_is_served_with_csp_and_nosniff_and_the_csp_holds(
    kbs: ConsoleKbs, page: Page
) -> None:
    answers: list[Response] = []

    def seen(response: Response) -> None:  # playwright tags its handlers: no bound methods
        answers.append(response)

    page.on("response", seen)
    response = page.goto(kbs.console)
    assert response is not None and response.status == 200
    expect(page.locator("#login")).to_be_visible()
    files = [a for a in answers if "/kbs/v0/console/" in a.url]
    assert {a.url.rsplit("/", 1)[1] for a in files} == {"", "console.css", "console.js", "api.js"}
    for answer in files:
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
    # an inline script added to the page is refused by the browser (script-src 'self')
    ran = page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__inline = 1'; document.body.append(s);"
        " return window.__inline === 1 }"
    )
    assert ran is False


def test_console_is_off_unless_enabled_and_says_how(kbs: ConsoleKbs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n'
        f'[audit]\npath = "{tmp_path / "audit.log"}"\n'
    )
    with running_kbs(["-c", str(config)], tmp_path, url):
        reply = httpx.get(f"{url}/kbs/v0/console/")
    assert reply.status_code == 404
    assert "[console] enabled = true" in reply.json()["detail"]


def test_upload_a_secret_which_is_never_displayed(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    page.fill("#up-path", "console/test/secret")
    page.fill("#up-value", SECRET)
    page.click("#up-button")
    expect(page.locator("#up-message")).to_have_text("uploaded console/test/secret")
    assert page.input_value("#up-value") == ""  # gone from the page once sent
    [upload] = [
        r
        for r in _audit_records(kbs)
        if r["target"] == "console/test/secret" and r["action"] == ("admin POST resource")
    ]
    assert upload["decision"] == "allow"
    assert upload["subject"] == {
        "kind": "admin",
        "role": "admin",
        "issuer": "admin1-issuer",
        "subject": "operator",
    }
    page.fill("#res-prefix", "console/test")
    page.click("#res-list")
    expect(page.locator("#res-message")).to_have_text('1 resource(s) under "console/test"')
    row = page.locator("#res-table tbody tr")
    expect(row.locator("td").first).to_have_text("console/test/secret")
    expect(row.locator("td").nth(1)).to_have_text("1")
    _shot(page, "resources")
    assert SECRET not in page.content()


def test_a_secret_uploaded_twice_is_rolled_back_in_the_browser(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    for value in ("first value", "second value"):
        page.fill("#up-path", "console/rollback/key")
        page.fill("#up-value", value)
        page.click("#up-button")
        expect(page.locator("#up-message")).to_have_text("uploaded console/rollback/key")
    page.fill("#res-prefix", "console/rollback")
    page.click("#res-list")
    page.locator("#res-table tbody tr button", has_text="versions").click()
    expect(page.locator("#res-versions-title")).to_have_text(
        "Versions of console/rollback/key (current: 2)"
    )
    first = page.locator("#res-versions tbody tr").filter(
        has=page.locator("td", has_text=re.compile(r"^1$"))
    )
    first.locator("button", has_text="make current").click()
    expect(page.locator("#res-message")).to_have_text(
        "console/rollback/key: rollback of version 1 done"
    )
    expect(page.locator("#res-versions-title")).to_have_text(
        "Versions of console/rollback/key (current: 3)"
    )
    expect(page.locator("#res-versions tbody tr")).to_have_count(3)
    _shot(page, "rolled-back")
    assert "first value" not in page.content() and "second value" not in page.content()
    # what a guest now receives is the first value again, as version 3
    meta = httpx.get(
        f"{kbs.url}/kbs/v0/resource-meta/console/rollback/key",
        headers={"Authorization": f"Bearer {kbs.token}"},
    ).json()
    assert meta["current_version"] == 3
    sizes = [version["size"] for version in meta["versions"]]
    assert sizes == [len("first value"), len("second value"), len("first value")]


def test_a_policy_edited_to_deny_shows_as_denied_in_explain(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    _tab(page, "policies")
    expect(page.locator("#rp-id option")).to_have_text(["resource-policy"])  # the global one
    page.fill("#rp-text", builtin_policy("allow_all"))
    page.click("#rp-save")
    expect(page.locator("#rp-message")).to_have_text(
        "resource policy of the global policy installed"
    )
    page.fill("#rp-text", "")
    page.click("#rp-load")  # read back: what was installed
    expect(page.locator("#rp-text")).to_have_value(builtin_policy("allow_all"))

    _tab(page, "explain")
    page.fill("#ex-path", "console/test/secret")
    page.fill("#ex-token", kbs.guest_token)
    page.click("#ex-run")
    expect(page.locator("#ex-decision")).to_have_text("ALLOWED: the resource would be released")
    expect(page.locator("#ex-policy")).to_have_text("decided by: resource-policy")

    _tab(page, "policies")
    page.fill("#rp-text", DENY_ALL)
    page.click("#rp-save")
    expect(page.locator("#rp-message")).to_have_text(
        "resource policy of the global policy installed"
    )
    _tab(page, "explain")
    page.click("#ex-run")
    expect(page.locator("#ex-decision")).to_have_text(
        "DENIED: the resource policy refuses this token"
    )
    expect(page.locator("#ex-rules tbody tr")).to_have_text(["allowfalse"])
    _shot(page, "explain")
    # and the installed policy is what a guest now meets
    denied = kbs_client("--url", kbs.url, "get-resource", "--path", "console/test/secret")
    assert denied.returncode == 1 and "403" in denied.stderr

    # a tenant policy on the prefix "console" governs console/...: the most specific wins
    _tab(page, "policies")
    page.fill("#rp-target", "console")
    page.fill("#rp-text", builtin_policy("allow_all"))
    page.click("#rp-save")
    expect(page.locator("#rp-message")).to_have_text("resource policy of prefix console installed")
    expect(page.locator("#rp-id option")).to_have_text(["console", "resource-policy"])
    _tab(page, "explain")
    page.click("#ex-run")
    expect(page.locator("#ex-decision")).to_have_text("ALLOWED: the resource would be released")
    expect(page.locator("#ex-policy")).to_have_text("decided by: console")
    _tab(page, "policies")
    page.click("#rp-delete")
    expect(page.locator("#rp-message")).to_contain_text("the policy of prefix console is deleted")
    _tab(page, "explain")
    page.click("#ex-run")
    expect(page.locator("#ex-decision")).to_have_text(
        "DENIED: the resource policy refuses this token"
    )


def test_reference_values_and_attestation_policies(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    _tab(page, "reference-values")
    page.fill("#rv-name", "console-version")
    page.fill("#rv-new", '["1.2.3"]')
    page.click("#rv-register")
    expect(page.locator("#rv-message")).to_have_text("reference value console-version registered")
    page.click("#rv-list")
    expect(page.locator("#rv-ids li", has_text="console-version")).to_have_count(1)
    page.fill("#rv-id", "console-version")
    page.click("#rv-get")
    expect(page.locator("#rv-value")).to_contain_text('"1.2.3"')
    page.click("#rv-delete")
    expect(page.locator("#rv-message")).to_have_text("reference value console-version deleted")
    page.click("#rv-get")
    expect(page.locator("#rv-message")).to_contain_text("404 ResourceNotFound")

    _tab(page, "policies")
    rego = builtin_attestation_policy("default_cpu")
    page.fill("#ap-id", "console_cpu")
    page.fill("#ap-text", rego)
    page.click("#ap-save")
    expect(page.locator("#ap-message")).to_have_text("attestation policy console_cpu installed")
    page.click("#ap-list")
    expect(page.locator("#ap-ids li", has_text="console_cpu")).to_have_count(1)
    page.fill("#ap-text", "")
    page.click("#ap-load")
    expect(page.locator("#ap-text")).to_have_value(rego)
    page.click("#ap-delete")
    expect(page.locator("#ap-message")).to_have_text("attestation policy console_cpu deleted")
    page.click("#ap-list")
    expect(page.locator("#ap-ids li", has_text="console_cpu")).to_have_count(0)


def test_audit_log_shows_a_verified_chain(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    page.fill("#up-path", "console/audit/one")
    page.fill("#up-value", SECRET)
    page.click("#up-button")
    expect(page.locator("#up-message")).to_have_text("uploaded console/audit/one")
    _tab(page, "audit")
    page.fill("#au-action", "admin POST")
    page.fill("#au-target", "console/audit/")
    page.click("#au-show")
    expect(page.locator("#au-chain")).to_have_attribute("data-status", "verified")
    expect(page.locator("#au-chain")).to_contain_text("Chain verified: unkeyed")
    expect(page.locator("#au-chain")).to_contain_text("chain of the whole file")
    rows = page.locator("#au-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("admin POST resource")
    expect(rows.first).to_contain_text("console/audit/one")
    page.fill("#au-action", "")
    page.fill("#au-target", "")
    page.click("#au-show")
    expect(page.locator("#au-chain")).to_have_attribute("data-status", "verified")
    _shot(page, "audit-log")
    assert SECRET not in page.content()

    # the CLI reads the same endpoint
    listed = kbs_client(
        "--url", kbs.url, "config", "--admin-token-file", str(kbs.token_file),
        "audit-log", "--action", "admin POST", "--target", "console/audit/", "--verify-file",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    page_json = json.loads(listed.stdout)
    assert [r["target"] for r in page_json["records"]] == ["console/audit/one"]
    assert page_json["chain"]["status"] == "verified" and page_json["chain"]["scope"] == "file"


def test_recent_attestations_by_tee_and_status(kbs: ConsoleKbs, page: Page) -> None:
    _log_in(page, kbs)
    _tab(page, "attestations")
    page.click("#at-show")
    sample = page.locator("#at-counts tbody tr", has_text="sample")
    expect(sample).to_have_count(1)
    expect(page.locator("#at-table tbody tr").first).to_contain_text("sample")
    _shot(page, "attestations")
    listed = kbs_client(
        "--url", kbs.url, "config", "--admin-token-file", str(kbs.token_file),
        "recent-attestations", "--limit", "10",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert any(row["tee"] == "sample" for row in json.loads(listed.stdout)["by_tee"])


def _not_run(page: Page, opened: list[str]) -> None:
    page.wait_for_timeout(300)  # time for an injected onerror to fire, were there one
    assert opened == []
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("main img, #status img").count() == 0  # text, never an element


def test_script_injected_through_a_resource_name_does_not_run(kbs: ConsoleKbs, page: Page) -> None:
    opened = _dialogs(page)
    _log_in(page, kbs)
    # The KBS refuses the name, and its refusal, which quotes the name, is shown as text.
    page.fill("#up-path", f"repo/{PAYLOAD}/tag")
    page.fill("#up-value", "x")
    page.click("#up-button")
    expect(page.locator("#up-message")).to_contain_text(
        f"invalid resource path segment {PAYLOAD!r}"
    )
    page.fill("#res-prefix", PAYLOAD)
    page.click("#res-list")
    expect(page.locator("#res-message")).to_contain_text(f"invalid prefix segment {PAYLOAD!r}")
    _tab(page, "explain")
    page.fill("#ex-path", f"repo/{PAYLOAD}/tag")
    page.fill("#ex-token", kbs.guest_token)
    page.click("#ex-run")
    expect(page.locator("#ex-decision")).not_to_be_empty()
    _not_run(page, opened)

    # The KBS never stores such a name, but a store another writer filled might hold one: the
    # browser is handed listing and version answers carrying it, in the endpoints' own shape,
    # so what the resources view does with a hostile name is checked too.
    summary = {"name": PAYLOAD, "current_version": 2, "version_count": 2, "created": PAYLOAD}
    versions = [
        {"version": 1, "created": PAYLOAD, "size": 3, "deleted": PAYLOAD},
        {"version": 2, "created": "2026-12-07T08:00:00Z", "size": 3, "deleted": None},
    ]
    answers = {
        "/kbs/v0/resources": {"resources": [summary], "next_cursor": None},
        "/kbs/v0/resource-meta/": {**summary, "versions": versions},
    }

    def answer(route: Route) -> None:
        path = urlsplit(route.request.url).path
        [body] = [body for prefix, body in answers.items() if path.startswith(prefix)]
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/kbs/v0/resources?*", answer)
    page.route("**/kbs/v0/resource-meta/**", answer)
    _tab(page, "resources")
    page.fill("#res-prefix", "")
    page.click("#res-list")
    row = page.locator("#res-table tbody tr")
    expect(row.locator("td").first).to_have_text(PAYLOAD)
    expect(row.locator("button")).to_have_text(["versions", "delete"])
    row.locator("button", has_text="versions").click()
    expect(page.locator("#res-versions-title")).to_have_text(f"Versions of {PAYLOAD} (current: 2)")
    expect(page.locator("#res-versions tbody tr").first).to_contain_text(PAYLOAD)
    expect(page.locator("#res-versions tbody tr button")).to_have_text(
        ["make current", "undelete", "purge", "make current", "delete", "purge"]
    )
    _shot(page, "injected-resource-name")
    _not_run(page, opened)


def test_script_injected_through_an_audit_record_does_not_run(kbs: ConsoleKbs, page: Page) -> None:
    # Anyone who can reach the KBS can plant text in the audit log: a refused admin request
    # is recorded with the path it asked for.
    planted = httpx.get(f"{kbs.url}/kbs/v0/policy-explain/{quote(PAYLOAD, safe='')}")
    assert planted.status_code == 401
    assert any(r["target"] == PAYLOAD for r in _audit_records(kbs))

    opened = _dialogs(page)
    _log_in(page, kbs)
    _tab(page, "audit")
    page.select_option("#au-decision", "deny")
    page.fill("#au-target", "<img")
    page.click("#au-show")
    row = page.locator("#au-table tbody tr").first
    expect(row).to_contain_text(PAYLOAD)
    expect(page.locator("#au-chain")).to_have_attribute("data-status", "verified")
    _shot(page, "injected-audit-record")
    _not_run(page, opened)

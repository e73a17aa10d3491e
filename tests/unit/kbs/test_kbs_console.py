"""The admin console's files: off by default, a fixed table of files with strict headers when
on, and source checks that keep its JavaScript to the rules docs/console.md states (the
browser tests in tests/e2e/test_e2e_console.py show them holding in Chromium)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.kbs.app import create_app
from keybroker.kbs.console import CSP

FILES = {
    "": "text/html",
    "index.html": "text/html",
    "console.css": "text/css",
    "api.js": "text/javascript",
    "console.js": "text/javascript",
}
STATIC = resources.files("keybroker.kbs") / "console_static"


@pytest.fixture
def console() -> Iterator[TestClient]:
    with TestClient(create_app(kbs_config(console={"enabled": True}))) as client:
        yield client


def test_console_is_off_by_default_and_answers_404() -> None:
    with TestClient(create_app(kbs_config())) as client:
        for path in ("/kbs/v0/console/", "/kbs/v0/console/api.js", "/kbs/v0/console"):
            reply = client.get(path, follow_redirects=False)
            assert reply.status_code == 404, path
            assert "[console] enabled = true" in reply.json()["detail"]


@pytest.mark.parametrize("name", list(FILES))
def test_every_console_file_is_served_with_strict_headers(console: TestClient, name: str) -> None:
    reply = console.get(f"/kbs/v0/console/{name}")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith(FILES[name])
    assert reply.headers["content-security-policy"] == CSP
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-frame-options"] == "DENY"
    assert "set-cookie" not in reply.headers


def test_csp_allows_nothing_but_this_origin() -> None:
    directives = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert directives == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "connect-src": "'self'",
        "img-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }


def test_console_without_slash_redirects_relatively(console: TestClient) -> None:
    reply = console.get("/kbs/v0/console", follow_redirects=False)
    assert reply.status_code == 308
    assert reply.headers["location"] == "console/"  # works behind a path-prefix proxy too


@pytest.mark.parametrize(
    "path",
    [
        "/kbs/v0/console/x.js",
        "/kbs/v0/console/api.js/x",
        "/kbs/v0/console/..%2fopenapi.json",
        "/kbs/v0/console/%2e%2e/%2e%2e/healthz",
        "/kbs/v0/console/..%2F..%2F..%2Fetc%2Fpasswd",
        "/kbs/v0/console/__init__.py",
    ],
)
def test_path_traversal_through_the_console_answers_404(console: TestClient, path: str) -> None:
    reply = console.get(path)
    assert reply.status_code == 404
    assert reply.json()["type"].endswith("/NotFound")


def test_console_answers_get_only(console: TestClient) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        reply = console.request(method, "/kbs/v0/console/")
        assert reply.status_code == 405 and reply.headers["allow"] == "GET"


def _source(name: str) -> str:
    return (STATIC / name).read_text()


def test_console_scripts_never_write_markup_or_store_the_token() -> None:
    forbidden = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function|"
        r"setAttribute\(\s*['\"]on|localStorage|sessionStorage|document\.cookie|indexedDB"
    )
    for name in ("api.js", "console.js"):
        code = re.sub(r"(^|\s)//.*$", "", _source(name), flags=re.MULTILINE)  # not comments
        assert forbidden.search(code) is None, name


def test_only_the_api_module_talks_to_the_kbs() -> None:
    assert "fetch(" in _source("api.js")
    assert "fetch(" not in _source("console.js") and "XMLHttpRequest" not in _source("console.js")
    assert 'credentials: "omit"' in _source("api.js")  # no cookie ever rides on a call


def test_page_has_no_inline_script_style_or_handlers() -> None:
    page = _source("index.html")
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="console.js">']
    assert "</script>" in page and re.search(r"<script[^>]*>\s*\S+\s*</script>", page) is None
    assert re.search(r"\son[a-z]+\s*=", page) is None  # no onclick= & co.
    assert re.search(r"<style|\sstyle\s*=", page) is None
    assert re.search(r"<form", page) is None  # calls are made by the script, with the token
    assert re.search(r"https?://", page) is None  # no CDN, nothing from elsewhere

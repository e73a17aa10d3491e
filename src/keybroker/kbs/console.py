"""The admin web console: a few static files served at ``/kbs/v0/console/`` when
``[console] enabled = true`` (docs/console.md).

The console is a client of the admin API and nothing else: its JavaScript calls the same
endpoints as ``kbs-client config``, with the operator's admin JWT in ``Authorization: Bearer``
(kept in page memory only, no cookies), so every call is authenticated, authorized by the
role ACLs and audited exactly as from the CLI. These files hold no data and need no
credential; they are the same for everyone.

A request names one file of a fixed table or gets a 404: no part of a request path reaches the
file system. Every answer carries a strict Content-Security-Policy (scripts, styles and
connections from this origin only, no inline script, no framing, no form posts), ``nosniff``,
``no-referrer`` and ``no-store``: a string from a record that slipped into the page as markup
still could not run or send anything anywhere.
"""

from __future__ import annotations

from importlib import resources

from starlette.responses import RedirectResponse, Response

from keybroker.errors import MethodNotAllowedError, NotFoundError

CONSOLE = "console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


class Console:
    """The console's files, read from the package once."""

    def __init__(self) -> None:
        folder = resources.files("keybroker.kbs") / "console_static"
        self._files = {name: (folder / name).read_bytes() for name in _MEDIA_TYPES}

    def answer(self, rest: tuple[str, ...]) -> Response:
        if not rest:
            # relative, so that it also works behind a proxy that maps a path prefix
            return RedirectResponse("console/", status_code=308, headers=SECURITY_HEADERS)
        name = rest[0] or "index.html"
        if len(rest) > 1 or name not in self._files:
            raise NotFoundError(f"the console has no file {'/'.join(rest)[:64]!r}")
        return Response(self._files[name], media_type=_MEDIA_TYPES[name], headers=SECURITY_HEADERS)


def console_response(console: Console | None, method: str, rest: tuple[str, ...]) -> Response:
    """The answer to ``<method> /kbs/v0/console/<rest>``; 404 while the console is off."""
    if method != "GET":
        raise MethodNotAllowedError("/kbs/v0/console/ answers GET", allow=("GET",))
    if console is None:
        raise NotFoundError(
            "the admin console is off: set [console] enabled = true to serve it (docs/console.md)"
        )
    return console.answer(rest)

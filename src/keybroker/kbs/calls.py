"""One request under ``/kbs/v0/``, as the HTTP handler parsed it.

The handler in ``kbs.app`` reads what a service needs from the HTTP request (method, path,
query, body, the session cookie, the ``Authorization`` header, the peer's address) into an
:class:`ApiCall` and hands it on; nothing past the handler sees Starlette. Nothing in an
``ApiCall`` has been checked: the services decide what to believe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ApiCall:
    """``<method> /kbs/v0/<name>/<rest...>?<query>``, unverified."""

    method: str
    name: str
    rest: tuple[str, ...]  # the path after the name, each segment percent-decoded
    query: dict[str, str]
    body: bytes
    # The path as sent (percent-encoding kept, latin-1) and the query string as sent: admin
    # ACLs match these, so an encoded character cannot look like another one to them.
    raw_path: str = ""
    raw_query: bytes = b""
    peer: str | None = None  # the client's address as the server saw it, for audit records
    session_id: str | None = None  # the kbs-session-id cookie: a name to look up, no proof
    authorization: str | None = None  # the Authorization header (bearer token), unverified

    def target(self) -> str:
        """The path and query exactly as sent, as admin ACLs see them."""
        query = self.raw_query
        return self.raw_path + (f"?{query.decode('latin-1')}" if query else "")

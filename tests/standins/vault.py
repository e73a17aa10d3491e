"""A STAND-IN for HashiCorp Vault, for tests: the documented HTTP API subset Keybroker uses.

Not Vault. It serves, over real HTTP or HTTPS on a loopback port, what Vault's API documentation
describes for:

- ``X-Vault-Token`` authentication (403 ``{"errors": ["permission denied"]}`` otherwise), with
  token expiry by an injected clock;
- ``POST /v1/auth/<mount>/login`` (AppRole: ``role_id`` + ``secret_id`` -> ``auth.client_token``,
  ``lease_duration``);
- the KV v1 engine: ``GET``/``POST``/``PUT``/``DELETE``/``LIST`` ``/v1/<mount>/<path>``;
- the KV v2 engine: ``GET``/``POST``/``PUT``/``DELETE`` ``/v1/<mount>/data/<path>`` (versions,
  ``?version=``, ``options.cas``, soft delete of the latest version),
  ``POST /v1/<mount>/delete|undelete/<path>`` and ``PUT /v1/<mount>/destroy/<path>`` (``{"versions":
  [...]}``), ``GET``/``POST``/``DELETE``/``LIST`` ``/v1/<mount>/metadata/<path>`` (``max_versions``,
  default 10: older versions are dropped);
- ``GET /v1/sys/health``, and ``sealed``: then every other request is 503 ``{"errors": ["Vault
  is sealed"]}``, as a sealed Vault answers;
- ``GET /v1/sys/internal/ui/mounts/<path>``, the CLI's preflight: the mount's ``type`` and
  ``options.version`` (403 for a path under no mount, or when ``preflight_allowed`` is False,
  as for a token whose policy does not reach the mount).

Response shapes follow the API documentation (``data`` envelopes, version metadata, 404 ``{"errors":
[]}``, 204 on writes to KV v1 and deletes) and, where the documentation is silent, what Vault is
seen to answer (a KV v1-style path on a KV v2 mount: 404 with the warning "Invalid path for a
versioned K/V secrets engine" and no ``errors``). It does not implement policies beyond "a valid
token may do anything", leases on secrets, namespaces, ``cas_required``,
``delete_version_after``, custom metadata, or anything else. The production client
(``keybroker.storage.vault`` over hvac) is unchanged in tests: only the server differs.

Test instrumentation that is not Vault: ``seen_tokens`` (every ``X-Vault-Token`` received) and
``hold_reads`` (see :meth:`VaultStandIn._latch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from standins.server import ServedApp


@dataclass
class VersionState:
    created: str
    deleted: str = ""
    destroyed: bool = False

    def metadata(self, version: int) -> dict[str, Any]:
        return {
            "created_time": self.created,
            "deletion_time": self.deleted,
            "destroyed": self.destroyed,
            "version": version,
            "custom_metadata": None,
        }


@dataclass
class KvMount:
    version: int
    # v1: path -> fields; v2: path -> list of versions (fields, None once destroyed or
    # dropped by max_versions), newest last, and each version's state (kept ones only)
    v1: dict[str, dict[str, Any]] = field(default_factory=dict)
    v2: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    v2_state: dict[str, dict[int, VersionState]] = field(default_factory=dict)
    v2_max_versions: dict[str, int] = field(default_factory=dict)


def _now_text() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _errors(status: int, *messages: str) -> JSONResponse:
    return JSONResponse({"errors": list(messages)}, status_code=status)


HOLD_LIMIT = 5.0  # seconds a held read waits for the others at most
_VERSIONED_PATH = (
    "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API "
    "endpoints to use. If using the Vault CLI, use 'vault kv get' for this operation."
)


class VaultStandIn:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.mounts: dict[str, KvMount] = {"secret": KvMount(1), "kv2": KvMount(2)}
        self.tokens: dict[str, float] = {}  # token -> deadline (inf: never expires)
        self.approles: dict[str, dict[str, str]] = {}  # mount -> {role_id: secret_id}
        self.approle_ttl = 3600.0
        self.root_token = self.issue_token()
        self.logins = 0
        self.sealed = False
        self.preflight_allowed = True
        self.seen_tokens: set[str] = set()
        self.hold_reads = 0
        self._held = 0
        self._all_held: asyncio.Event | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/sys/health", self._health, methods=["GET"]),
                Route("/v1/auth/{mount}/login", self._login, methods=["POST"]),
                Route("/v1/sys/internal/ui/mounts/{path:path}", self._preflight, methods=["GET"]),
                Route(
                    "/v1/{rest:path}",
                    self._kv,
                    methods=["GET", "POST", "PUT", "DELETE", "LIST"],
                ),
            ]
        )

    # --- state the tests set up ------------------------------------------------------------

    def issue_token(self, ttl: float | None = None) -> str:
        token = "hvs." + secrets.token_urlsafe(18)
        self.tokens[token] = float("inf") if ttl is None else self.clock() + ttl
        return token

    def add_approle(self, role_id: str, secret_id: str, mount: str = "approle") -> None:
        self.approles.setdefault(mount, {})[role_id] = secret_id

    # --- handlers ---------------------------------------------------------------------------

    def _refusal(self, request: Request, *, authenticated: bool = True) -> Response | None:
        """503 while sealed; 403 without a live token where one is needed; else None."""
        token = request.headers.get("x-vault-token", "")
        if token:
            self.seen_tokens.add(token)
        if self.sealed:
            return _errors(503, "Vault is sealed")
        deadline = self.tokens.get(token)
        if authenticated and (deadline is None or self.clock() >= deadline):
            return _errors(403, "permission denied")
        return None

    async def _latch(self) -> None:
        """With ``hold_reads = n``, a read is answered once n reads are in flight (or after
        HOLD_LIMIT): a test sees whether a client has n requests open at once."""
        if self.hold_reads < 2:
            return
        if self._all_held is None:
            self._all_held = asyncio.Event()
        self._held += 1
        if self._held >= self.hold_reads:
            self._all_held.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_held.wait(), HOLD_LIMIT)

    async def _health(self, request: Request) -> Response:
        return JSONResponse(
            {"initialized": True, "sealed": self.sealed, "standby": False, "version": "stand-in"},
            status_code=503 if self.sealed else 200,
        )

    async def _preflight(self, request: Request) -> Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        name = request.path_params["path"].partition("/")[0]
        mount = self.mounts.get(name)
        if mount is None or not self.preflight_allowed:
            return _errors(
                403,
                "preflight capability check returned 403, please ensure client's policies "
                f'grant access to path "{name}/"',
            )
        options = {"version": "2"} if mount.version == 2 else None
        return JSONResponse(
            _envelope(
                {"type": "kv", "path": f"{name}/", "options": options, "description": "stand-in"}
            )
        )

    async def _login(self, request: Request) -> Response:
        refusal = self._refusal(request, authenticated=False)
        if refusal is not None:
            return refusal
        roles = self.approles.get(request.path_params["mount"])
        if roles is None:
            return _errors(404, "no handler for route")
        body = await request.json()
        role_id, secret_id = body.get("role_id"), body.get("secret_id")
        if role_id not in roles:
            return _errors(400, "invalid role ID")
        if roles[role_id] != secret_id:
            return _errors(400, "invalid secret id")
        self.logins += 1
        token = self.issue_token(self.approle_ttl)
        return JSONResponse(
            {
                "request_id": secrets.token_hex(8),
                "lease_id": "",
                "renewable": False,
                "lease_duration": 0,
                "data": None,
                "auth": {
                    "client_token": token,
                    "accessor": secrets.token_hex(8),
                    "policies": ["default"],
                    "lease_duration": int(self.approle_ttl),
                    "renewable": True,
                },
            }
        )

    async def _kv(self, request: Request) -> Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        mount_name, _, rest = request.path_params["rest"].partition("/")
        mount = self.mounts.get(mount_name)
        if mount is None or not rest:
            return _errors(404, f"no handler for route '{mount_name}/{rest}'")
        method = request.method
        if method == "GET" and request.query_params.get("list") == "true":
            method = "LIST"
        if mount.version == 1:
            return await self._kv1(mount, rest, method, request)
        return await self._kv2(mount, rest, method, request)

    async def _kv1(self, mount: KvMount, path: str, method: str, request: Request) -> Response:
        if method == "GET":
            await self._latch()
            if path not in mount.v1:
                return _errors(404)
            return JSONResponse(_envelope(mount.v1[path]))
        if method in ("POST", "PUT"):
            mount.v1[path] = await request.json()
            return Response(status_code=204)
        if method == "DELETE":
            mount.v1.pop(path, None)
            return Response(status_code=204)
        prefix = path.rstrip("/") + "/"
        keys = sorted({k[len(prefix) :].split("/")[0] for k in mount.v1 if k.startswith(prefix)})
        return JSONResponse(_envelope({"keys": keys})) if keys else _errors(404)

    async def _kv2(self, mount: KvMount, rest: str, method: str, request: Request) -> Response:
        kind, _, path = rest.partition("/")
        if kind == "data":
            return await self._kv2_data(mount, path, method, request)
        if kind == "metadata":
            return await self._kv2_metadata(mount, path, method, request)
        if kind in ("delete", "undelete", "destroy") and method in ("POST", "PUT"):
            return await self._kv2_versions(mount, kind, path, request)
        mismatch = {**_envelope({}), "data": None, "warnings": [_VERSIONED_PATH]}
        return JSONResponse(mismatch, status_code=404)  # what Vault answers a KV v1-style path

    async def _kv2_data(  # noqa: PLR0911 - one answer per documented case
        self, mount: KvMount, path: str, method: str, request: Request
    ) -> Response:
        versions = mount.v2.get(path)
        states = _states(mount, path)
        if method == "GET":
            await self._latch()
            wanted = int(request.query_params.get("version") or len(versions or []))
            state = states.get(wanted)
            if not versions or state is None:
                return _errors(404)
            fields = versions[wanted - 1]
            if state.deleted or state.destroyed or fields is None:
                # Vault: 404 with the version's metadata and no data
                body = _envelope({"data": None, "metadata": state.metadata(wanted)})
                return JSONResponse(body, status_code=404)
            return JSONResponse(_envelope({"data": fields, "metadata": state.metadata(wanted)}))
        if method in ("POST", "PUT"):
            body = await request.json()
            if not isinstance(body.get("data"), dict):
                return _errors(400, "no data provided")
            cas = (body.get("options") or {}).get("cas")
            if cas is not None and int(cas) != len(versions or []):
                return _errors(400, "check-and-set parameter did not match the current version")
            mount.v2.setdefault(path, []).append(body["data"])
            number = len(mount.v2[path])
            state = VersionState(_now_text())
            mount.v2_state.setdefault(path, {})[number] = state
            self._prune(mount, path)
            return JSONResponse(_envelope(state.metadata(number)))
        if method == "DELETE":  # soft-delete the latest version
            if versions:
                latest = states.get(len(versions))
                if latest is not None and not latest.deleted:
                    latest.deleted = _now_text()
            return Response(status_code=204)
        return _errors(405)

    def _prune(self, mount: KvMount, path: str) -> None:
        keep = mount.v2_max_versions.get(path) or 10
        states = mount.v2_state[path]
        for number in sorted(states)[:-keep] if len(states) > keep else []:
            del states[number]
            mount.v2[path][number - 1] = None

    async def _kv2_versions(
        self, mount: KvMount, kind: str, path: str, request: Request
    ) -> Response:
        body = await request.json()
        numbers = body.get("versions")
        if not isinstance(numbers, list) or not numbers:
            return _errors(400, "no version number provided")
        for number in numbers:
            state = _states(mount, path).get(int(number))
            if state is None:
                continue
            if kind == "delete" and not state.deleted:
                state.deleted = _now_text()
            elif kind == "undelete" and not state.destroyed:
                state.deleted = ""
            elif kind == "destroy":
                state.destroyed = True
                mount.v2[path][int(number) - 1] = None
        return Response(status_code=204)

    async def _kv2_metadata(
        self, mount: KvMount, path: str, method: str, request: Request
    ) -> Response:
        if method == "DELETE":
            mount.v2.pop(path, None)
            mount.v2_state.pop(path, None)
            mount.v2_max_versions.pop(path, None)
            return Response(status_code=204)
        if method == "LIST":
            prefix = path.rstrip("/") + "/" if path.strip("/") else ""
            keys = sorted(
                {
                    rest.split("/")[0] + ("/" if "/" in rest else "")
                    for rest in (k[len(prefix) :] for k in mount.v2 if k.startswith(prefix))
                }
            )
            return JSONResponse(_envelope({"keys": keys})) if keys else _errors(404)
        if method in ("POST", "PUT"):
            body = await request.json()
            mount.v2_max_versions[path] = int(body.get("max_versions") or 0)
            return Response(status_code=204)
        versions = mount.v2.get(path)
        if method != "GET":
            return _errors(405)
        if not versions:
            return _errors(404)
        states = _states(mount, path)
        return JSONResponse(
            _envelope(
                {
                    "current_version": len(versions),
                    "oldest_version": min(states, default=0),
                    "max_versions": mount.v2_max_versions.get(path, 0),
                    "created_time": states[min(states)].created if states else "",
                    "updated_time": states[max(states)].created if states else "",
                    "versions": {str(n): state.metadata(n) for n, state in states.items()},
                }
            )
        )


def _states(mount: KvMount, path: str) -> dict[int, VersionState]:
    """The version states of ``path``; versions a test put in ``v2`` directly are live."""
    states = mount.v2_state.setdefault(path, {}) if path in mount.v2 else {}
    for number, fields in enumerate(mount.v2.get(path, []), start=1):
        if fields is not None and number not in states:
            states[number] = VersionState(_now_text())
    return states


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": secrets.token_hex(8),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
    }


class RunningStandIn(ServedApp):
    """The Vault stand-in served on loopback; ``stop()`` makes it unreachable."""

    def __init__(
        self,
        stand_in: VaultStandIn,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        """HTTPS with ``certfile``/``keyfile``; with ``client_ca`` too, clients must present a
        certificate it issued (mutual TLS, as Vault's ``tls_require_and_verify_client_cert``)."""
        super().__init__(stand_in.app, certfile=certfile, keyfile=keyfile, client_ca=client_ca)
        self.stand_in = stand_in

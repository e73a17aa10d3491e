"""The resource policy: Rego deciding whether an attested guest may have what it asks for.

``input`` is the verified token's claims; ``data`` is ``{"plugin", "resource-path", "query"}``
of the request, plus ``"version"`` (the number about to be released) for a read of a versioned
resource; the rule is ``data.policy.allow``. Anything but ``true`` denies (an undefined
rule or a non-boolean result included).

The policy text lives in the ``kbs`` namespace of the shared store under upstream's key
(``resource-policy.rego``), so every worker and replica enforces the same policy. Each
evaluation re-reads the stored text (one small read) and recompiles only when it changed.

Decisions are remembered per claims and request by the compiled policy (a guest fetching again
with the same token asks the same question), unless the policy calls a built-in whose answer can
change between two calls (see ``CompiledPolicy.compile``). A changed policy text is a new
compiled policy, with an empty memory.
"""

from __future__ import annotations

import logging
from importlib import resources

from keybroker.errors import PolicyLimitError, PolicyParseError, StorageError
from keybroker.policy.prepared import PolicySpec
from keybroker.policy.workers import PolicyWorkers, PooledPolicy
from keybroker.protocol.models import JsonValue
from keybroker.storage.base import KeyValueStorage

log = logging.getLogger(__name__)

KBS_NAMESPACE = "kbs"
POLICY_ID = "resource-policy"
_POLICY_SUFFIX = ".rego"
_RULE = "policy/allow"
# what a request adds as data; handed over in input, so a new query string compiles nothing
REQUEST_DATA = ("plugin", "resource-path", "query", "version")
DECISION_CACHE_SIZE = 4096


def builtin_policy(name: str) -> str:
    """One of the shipped policies: ``default``, ``allow_all``, ``deny_all``, ``affirming``."""
    return (resources.files("keybroker.kbs") / "policies" / f"{name}.rego").read_text()


def resource_policy_spec(source: str) -> PolicySpec:
    return PolicySpec(source, (_RULE,), remember=DECISION_CACHE_SIZE, request_data=REQUEST_DATA)


async def compile_resource_policy(workers: PolicyWorkers, source: str) -> PooledPolicy:
    """Compile and check ``source`` in a policy worker (bounded in time and memory)."""
    policy = await workers.compile(resource_policy_spec(source))
    if policy.package != "policy":
        raise PolicyParseError(
            f"a resource policy must declare `package policy`, found `package {policy.package}`"
        )
    return policy


async def decision(policy: PooledPolicy, claims: JsonValue, data: JsonValue) -> bool:
    """Whether ``policy`` allows this request: the one path of every decision and of explain.

    An evaluation past the time or memory limit denies (and the workers log it)."""
    try:
        result = await policy.evaluate(_RULE, claims, data)
    except PolicyLimitError as e:
        log.warning("resource policy: %s; denying", e.detail)
        return False
    if result is True:
        return True
    if result is not False:
        log.warning("resource policy rule allow gave %r, not a boolean: denying", result)
    return False


class ResourcePolicy:
    def __init__(self, storage: KeyValueStorage, workers: PolicyWorkers) -> None:
        self._storage = storage
        self._workers = workers
        self._compiled: PooledPolicy | None = None

    @property
    def workers(self) -> PolicyWorkers:
        return self._workers

    async def initialize(self) -> None:
        """Install the default policy unless an operator's policy is already stored."""
        await self._storage.set(
            POLICY_ID + _POLICY_SUFFIX, builtin_policy("default").encode(), overwrite=False
        )

    async def set(self, source: str) -> None:
        compiled = await compile_resource_policy(self._workers, source)  # refuse before storing
        await self._storage.set(POLICY_ID + _POLICY_SUFFIX, source.encode())
        self._compiled = compiled

    async def list_ids(self) -> list[str]:
        keys = await self._storage.list_keys()
        return sorted(k.removesuffix(_POLICY_SUFFIX) for k in keys if k.endswith(_POLICY_SUFFIX))

    async def allows(self, claims: JsonValue, data: JsonValue) -> bool:
        return await decision(await self.current(), claims, data)

    async def current(self) -> PooledPolicy:
        raw = await self._storage.get(POLICY_ID + _POLICY_SUFFIX)
        if raw is None:  # the store was unreachable at start-up (or is new): install it now
            await self.initialize()
            raw = await self._storage.get(POLICY_ID + _POLICY_SUFFIX)
        if raw is None:
            raise StorageError("the resource policy is missing from the store")
        source = raw.decode("utf-8", errors="replace")
        if self._compiled is None or self._compiled.source != source:
            self._compiled = await compile_resource_policy(self._workers, source)
        return self._compiled

"""The resource policy: Rego deciding whether an attested guest may have what it asks for.

``input`` is the verified token's claims; ``data`` is ``{"plugin", "resource-path", "query"}``
of the request, plus ``"version"`` (the number about to be released) for a read of a versioned
resource; the rule is ``data.policy.allow``. Anything but ``true`` denies (an undefined
rule or a non-boolean result included).

There is one global policy and, optionally, **tenant policies** attached to a repository
prefix (``<repository>`` or ``<repository>/<type>``). A request for a repository path (the
``resource`` and ``pkcs11`` plugins, see ``Plugin.repository_path``) is decided by the policy
of the longest prefix that matches it whole segment by whole segment, else by the global
policy; requests to other plugins are always decided by the global policy. Exactly one policy
decides: a tenant policy replaces the global one for its prefix, it does not add to it.

The texts live in the ``kbs`` namespace of the shared store: the global one under upstream's
key (``resource-policy.rego``), tenant ones under ``tenant-policy/<prefix>.rego``, so every
worker and replica enforces the same policies. Each evaluation reads the candidate texts
(one small read, one round trip on PostgreSQL and Redis; in a guest release the store the KBS
hands in may answer from its read cache for the store's generation stamp,
``keybroker.storage.read_cache``) and recompiles only the one that decides, and only when its
text changed: a policy set or deleted through one worker or replica writes a new stamp and is
enforced by all of them at their next request.

Decisions are remembered per claims and request by the compiled policy (a guest fetching again
with the same token asks the same question), unless the policy calls a built-in whose answer can
change between two calls (see ``CompiledPolicy.compile``). A changed policy text is a new
compiled policy, with an empty memory.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources

from keybroker.errors import (
    BadRequestError,
    PolicyLimitError,
    PolicyParseError,
    ResourceNotFoundError,
    StorageError,
)
from keybroker.policy.prepared import PolicySpec
from keybroker.policy.workers import PolicyWorkers, PooledPolicy
from keybroker.protocol.models import JsonValue
from keybroker.protocol.resource_path import SEGMENT_PATTERN, ResourcePath, is_valid_segment
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.read_cache import AfterChange, no_stamp

log = logging.getLogger(__name__)

KBS_NAMESPACE = "kbs"
POLICY_ID = "resource-policy"  # the global policy's id (and upstream's storage key)
_POLICY_SUFFIX = ".rego"
_TENANT_KEYS = "tenant-policy/"
# Bounds on what an admin can create: each tenant policy is compiled, cached and listed.
MAX_TENANT_POLICIES = 1024
MAX_PREFIX_SEGMENTS = 2  # <repository> or <repository>/<type>
MAX_PREFIX_SEGMENT_LENGTH = 128
_RULE = "policy/allow"
# what a request adds as data; handed over in input, so a new query string compiles nothing
REQUEST_DATA = ("plugin", "resource-path", "query", "version")
DECISION_CACHE_SIZE = 4096


def builtin_policy(name: str) -> str:
    """One of the shipped policies: ``default``, ``allow_all``, ``deny_all``, ``affirming``."""
    return (resources.files("keybroker.kbs") / "policies" / f"{name}.rego").read_text()


@dataclass(frozen=True, slots=True)
class TenantPrefix:
    """A validated repository prefix a tenant policy is attached to: ``repo`` or ``repo/type``.

    Threat: the prefix names a storage key and appears in admin ACL paths, so it is held to
    the resource-path alphabet (no ``/`` inside a segment, no leading dot: no traversal, no
    smuggled separator) and to the global policy's reserved id."""

    segments: tuple[str, ...]

    @classmethod
    def parse(cls, unverified_segments: tuple[str, ...] | list[str]) -> TenantPrefix:
        segments = tuple(unverified_segments)
        if not 1 <= len(segments) <= MAX_PREFIX_SEGMENTS:
            raise BadRequestError(
                "a tenant policy prefix is <repository> or <repository>/<type>, "
                f"found {len(segments)} segments"
            )
        for segment in segments:
            if not is_valid_segment(segment, MAX_PREFIX_SEGMENT_LENGTH):
                raise BadRequestError(
                    f"invalid tenant policy prefix segment {segment[:64]!r}: each segment has "
                    f"at most {MAX_PREFIX_SEGMENT_LENGTH} characters and matches "
                    f"{SEGMENT_PATTERN}"
                )
        if segments[0] == POLICY_ID:
            raise BadRequestError(
                f"{POLICY_ID!r} is the global policy's id, not a repository prefix: set the "
                "global policy with POST /kbs/v0/resource-policy"
            )
        return cls(segments)

    @classmethod
    def of(cls, path: ResourcePath) -> list[TenantPrefix]:
        """The prefixes that match ``path``, most specific first (a segment too long to be a
        prefix can have no policy, and would make a key longer than the store takes)."""
        candidates = [(path.repository, path.type), (path.repository,)]
        return [
            cls(segments)
            for segments in candidates
            if all(len(segment) <= MAX_PREFIX_SEGMENT_LENGTH for segment in segments)
        ]

    @property
    def id(self) -> str:
        return "/".join(self.segments)

    @property
    def key(self) -> str:
        return f"{_TENANT_KEYS}{self.id}{_POLICY_SUFFIX}"


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


@dataclass(frozen=True)
class GoverningPolicy:
    """The policy that decides a request, and its id (``resource-policy`` or a prefix)."""

    policy_id: str
    policy: PooledPolicy


class ResourcePolicy:
    """``after_change`` is awaited after a policy is stored or deleted: the KBS passes
    :meth:`~keybroker.storage.read_cache.ReadCache.changed` (the generation stamp, written
    after the text; see :mod:`keybroker.storage.read_cache`). The default policy
    :meth:`initialize` installs needs none: it is only ever written where no global policy
    is stored, and a read that finds none installs it and reads again past its cache."""

    def __init__(
        self,
        storage: KeyValueStorage,
        workers: PolicyWorkers,
        *,
        after_change: AfterChange = no_stamp,
    ) -> None:
        self._storage = storage
        self._workers = workers
        self._after_change = after_change
        # compiled policies by id; bounded (ids of deleted policies age out)
        self._compiled: OrderedDict[str, PooledPolicy] = OrderedDict()

    @property
    def workers(self) -> PolicyWorkers:
        return self._workers

    async def initialize(self) -> None:
        """Install the default policy unless an operator's policy is already stored."""
        await self._storage.set(
            POLICY_ID + _POLICY_SUFFIX, builtin_policy("default").encode(), overwrite=False
        )

    async def set(self, source: str, prefix: TenantPrefix | None = None) -> None:
        """Store the global policy, or the tenant policy of ``prefix``, once it compiles."""
        compiled = await compile_resource_policy(self._workers, source)  # refuse before storing
        if prefix is None:
            await self._storage.set(POLICY_ID + _POLICY_SUFFIX, source.encode())
            self._remember(POLICY_ID, compiled)
            await self._after_change()
            return
        if await self._storage.get(prefix.key) is None:
            tenants = [k for k in await self._storage.list_keys() if k.startswith(_TENANT_KEYS)]
            if len(tenants) >= MAX_TENANT_POLICIES:
                raise BadRequestError(
                    f"there are already {len(tenants)} tenant policies, the most a KBS keeps "
                    f"({MAX_TENANT_POLICIES}): delete one first"
                )
        await self._storage.set(prefix.key, source.encode())
        self._remember(prefix.id, compiled)
        await self._after_change()

    async def source(self, policy_id: str) -> str:
        """The text of the global policy (``resource-policy``) or of a tenant prefix."""
        if policy_id == POLICY_ID:
            return (await self._global()).policy.source
        prefix = TenantPrefix.parse(policy_id.split("/"))
        raw = await self._storage.get(prefix.key)
        if raw is None:
            raise ResourceNotFoundError(f"no tenant resource policy for {prefix.id!r}")
        return raw.decode("utf-8", errors="replace")

    async def delete(self, prefix: TenantPrefix) -> None:
        """Remove a tenant policy: its prefix falls back to the next matching policy."""
        if await self._storage.delete(prefix.key) is None:
            raise ResourceNotFoundError(f"no tenant resource policy for {prefix.id!r}")
        self._compiled.pop(prefix.id, None)
        await self._after_change()

    async def list_ids(self) -> list[str]:
        """``resource-policy`` (the global policy, as upstream), then every tenant prefix."""
        keys = await self._storage.list_keys()
        return sorted(
            k.removeprefix(_TENANT_KEYS).removesuffix(_POLICY_SUFFIX)
            for k in keys
            if k.endswith(_POLICY_SUFFIX)
        )

    async def allows(
        self, claims: JsonValue, data: JsonValue, repository: ResourcePath | None = None
    ) -> bool:
        return await decision((await self.governing(repository)).policy, claims, data)

    async def current(self) -> PooledPolicy:
        """The global policy."""
        return (await self._global()).policy

    async def governing(self, repository: ResourcePath | None) -> GoverningPolicy:
        """The policy that decides a request for ``repository`` (None: not a repository
        path, so the global policy): the most specific tenant prefix, else the global one."""
        if repository is None:
            return await self._global()
        prefixes = TenantPrefix.of(repository)
        global_key = POLICY_ID + _POLICY_SUFFIX
        found = await self._storage.get_many([p.key for p in prefixes] + [global_key])
        for prefix in prefixes:
            if prefix.key in found:
                return await self._compiled_for(prefix.id, found[prefix.key])
        if global_key in found:
            return await self._compiled_for(POLICY_ID, found[global_key])
        return await self._global()

    async def _global(self) -> GoverningPolicy:
        raw = await self._storage.get(POLICY_ID + _POLICY_SUFFIX)
        if raw is None:  # the store was unreachable at start-up (or is new): install it now
            await self.initialize()
            raw = await self._storage.get(POLICY_ID + _POLICY_SUFFIX)
        if raw is None:
            raise StorageError("the resource policy is missing from the store")
        return await self._compiled_for(POLICY_ID, raw)

    async def _compiled_for(self, policy_id: str, raw: bytes) -> GoverningPolicy:
        source = raw.decode("utf-8", errors="replace")
        compiled = self._compiled.get(policy_id)
        if compiled is None or compiled.source != source:  # new, or changed by another worker
            compiled = await compile_resource_policy(self._workers, source)
        self._remember(policy_id, compiled)
        return GoverningPolicy(policy_id, compiled)

    def _remember(self, policy_id: str, compiled: PooledPolicy) -> None:
        self._compiled[policy_id] = compiled
        self._compiled.move_to_end(policy_id)
        while len(self._compiled) > MAX_TENANT_POLICIES + 1:
            self._compiled.popitem(last=False)

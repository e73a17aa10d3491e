"""What is known of a policy from its text alone, and the questions asked of it.

Does: check a policy's text (forbidden built-ins, declared packages, entrypoints), rewrite
per-call data into input (``keybroker.policy.request_data``), find what of input it reads
(``keybroker.policy.input_paths``), and turn an (entrypoints, input, data) question into the
canonical JSON rego-cpp is given; remember answers by that question. Does not: touch rego-cpp,
so the server can do all of this while only worker processes evaluate
(``keybroker.policy.workers``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from keybroker.errors import PolicyEvaluationError, PolicyParseError
from keybroker.policy import request_data
from keybroker.policy.input_paths import InputPaths
from keybroker.protocol.models import JsonValue

EMPTY_DOCUMENT = "{}"
_PACKAGE = re.compile(r"package\s+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*(?:#.*)?")
_UNSTABLE_BUILTIN = re.compile(r"\b(?:time|rand|uuid|http|opa|net|io\.jwt)\.[a-z_]")
# Threat: `opa.runtime().env` hands a policy the KBS process environment (database passwords),
# which it can copy into tokens or explain output. rego-cpp follows `opa.runtime`,
# `opa["runtime"]`, `opa #comment` + newline + `.runtime` and template strings, so no scan of
# the syntax is sure to see every call; the word itself is refused, comments and strings
# included (`opa` is the only root of those built-ins, and a name cannot be computed).
_FORBIDDEN_WORD = re.compile(r"(?<![A-Za-z0-9_])opa(?![A-Za-z0-9_])")


@dataclass(frozen=True)
class PolicySpec:
    """Everything a policy is compiled from; hashable, so workers keep compiled policies by it.

    See ``CompiledPolicy.compile`` for the meaning of each field."""

    source: str
    entrypoints: tuple[str, ...]
    name: str = "policy.rego"
    helpers: tuple[tuple[str, str], ...] = ()
    remember: int = 0
    request_data: tuple[str, ...] = ()
    cache_size: int = 1024

    def modules(self) -> dict[str, str]:
        """File name -> Rego, helpers first, after checking the words no policy may use."""
        if self.remember < 0:
            raise ValueError(f"remember must not be negative, got {self.remember}")
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {self.cache_size}")
        if not self.entrypoints:
            raise ValueError("a policy needs at least one entrypoint")
        modules = dict(self.helpers)
        if self.name in modules:
            raise ValueError(f"helper module name {self.name!r} clashes with the policy's")
        modules[self.name] = self.source
        for module_name, module_source in modules.items():
            if _FORBIDDEN_WORD.search(module_source):
                raise PolicyParseError(
                    f"{module_name}: policies may not use the opa.* built-ins "
                    "(opa.runtime() reveals the KBS environment); the word `opa` is refused "
                    "anywhere in the text, comments and strings included"
                )
        return modules


@dataclass(frozen=True)
class PreparedPolicy:
    """A policy's text, checked and analysed. Build it with ``of``."""

    spec: PolicySpec
    modules: Mapping[str, str]  # as rego-cpp gets them (rewritten when request_keys is set)
    packages: tuple[str, ...]
    entrypoints: frozenset[str]
    request_keys: frozenset[str] | None  # per-call data keys read through input
    input_paths: InputPaths | None  # what of input the modules can read (None: maybe all)
    deterministic: bool

    @classmethod
    def of(cls, spec: PolicySpec) -> PreparedPolicy:
        modules = spec.modules()
        packages = tuple(_declared_package(n, s) for n, s in modules.items())
        _check_entrypoints(spec.entrypoints, packages[-1], packages)
        keys = frozenset(spec.request_data)
        roots = {p.split(".")[0] for p in packages}
        rewritten = request_data.rewrite(modules, keys, roots) if keys else None
        final = modules if rewritten is None else rewritten
        return cls(
            spec=spec,
            modules=final,
            packages=packages,
            entrypoints=frozenset(spec.entrypoints),
            request_keys=None if rewritten is None else keys,
            input_paths=InputPaths.of(final.values()),
            deterministic=not any(_UNSTABLE_BUILTIN.search(m) for m in final.values()),
        )

    @property
    def package(self) -> str:
        return self.packages[-1]

    @property
    def roots(self) -> frozenset[str]:
        return frozenset(p.split(".")[0] for p in self.packages)

    def question(
        self, entrypoints: Sequence[str], input: JsonValue, data: JsonValue | None
    ) -> tuple[str, str]:
        """The input rego-cpp is handed (trimmed to what the policy reads) and the data
        document, as canonical JSON; refuses an entrypoint that was not compiled."""
        unknown = sorted(set(entrypoints) - self.entrypoints)
        if unknown:
            raise ValueError(
                f"entrypoint {unknown[0]!r} was not compiled; "
                f"expected one of {', '.join(sorted(self.entrypoints))}"
            )
        input, data = self.moved(input, data)
        document = self.data_json(data)
        input_json = to_json(input, "input")  # all of it must be JSON, read or not
        if self.input_paths is not None:
            input_json = to_json(self.input_paths.project(input), "input")
        return input_json, document

    def moved(self, input: JsonValue, data: JsonValue | None) -> tuple[JsonValue, JsonValue | None]:
        """``input`` and ``data`` as rego-cpp gets them: per-call data moved into input when
        the modules were rewritten to read it there."""
        if self.request_keys is None:
            return input, data
        given = {} if data is None else data
        if not isinstance(given, Mapping):
            raise PolicyEvaluationError(f"data must be a JSON object, found {type(data).__name__}")
        unexpected = sorted(set(given) - self.request_keys)
        if unexpected:
            raise PolicyEvaluationError(
                f"data key {unexpected[0][:64]!r} is not one of this policy's per-call keys"
            )
        return {request_data.INPUT_KEY: input, request_data.DATA_KEY: given}, None

    def data_json(self, data: JsonValue | None) -> str:
        if data is None:
            return EMPTY_DOCUMENT
        if not isinstance(data, Mapping):
            raise PolicyEvaluationError(f"data must be a JSON object, found {type(data).__name__}")
        # Threat: a data document reaching into the policy's own package overrides its rules
        # in rego-cpp (data {"policy": {"allow": true}} beats `default allow := false`).
        shadowed = sorted(self.roots.intersection(data))
        if shadowed:
            raise PolicyEvaluationError(
                f"data must not define data.{shadowed[0]}: that is the policy's own package"
            )
        return to_json(data, "data")


class AnswerMemory:
    """Answers remembered by question, in a bounded LRU; ``size`` 0 remembers nothing.

    Thread-safe. Remembered answers are shared: do not mutate them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[bytes, list[JsonValue | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)

    def key(self, entrypoints: Sequence[str], input_json: str, document: str) -> bytes:
        if not self.size:
            return b""
        return hashlib.sha256("\0".join([*entrypoints, input_json, document]).encode()).digest()

    def get(self, key: bytes) -> list[JsonValue | None] | None:
        if not self.size:
            return None
        with self._lock:
            known = self._answers.get(key)
            if known is not None:
                self._answers.move_to_end(key)
            return known

    def put(self, key: bytes, answers: list[JsonValue | None]) -> None:
        if not self.size:
            return
        with self._lock:
            self._answers[key] = answers
            if len(self._answers) > self.size:
                self._answers.popitem(last=False)


def to_json(value: JsonValue, what: str) -> str:
    """UTF-8 canonical JSON: the cache key, and text rego-cpp reads the way policies expect."""
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        text.encode("utf-8")  # lone surrogates cannot cross into rego-cpp
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise PolicyEvaluationError(f"{what} is not a JSON document: {e}") from None
    return text


def _declared_package(name: str, source: str) -> str:
    """The package a module declares: its first statement, after comments and blank lines."""
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _PACKAGE.fullmatch(stripped)
        if match is None:
            raise PolicyParseError(
                f"{name}: expected `package <dotted.name>` as the first statement"
            )
        return match.group(1)
    raise PolicyParseError(f"{name}: the module is empty; expected `package <name>`")


def _check_entrypoints(entrypoints: Sequence[str], package: str, packages: Sequence[str]) -> None:
    for entrypoint in entrypoints:
        path = entrypoint.split("/")
        if not any(
            len(path) > len(p.split(".")) and path[: len(p.split("."))] == p.split(".")
            for p in packages
        ):
            raise PolicyParseError(
                f"the policy declares `package {package}`, so it cannot define "
                f"data.{'.'.join(path)} (entrypoint {entrypoint})"
            )

"""Rego policies over ``regopy`` (rego-cpp): compile once, evaluate many times.

Does: parse and check a module when the policy changes (``CompiledPolicy.compile``), then
evaluate its entrypoints against per-call ``input`` and ``data`` documents. Does not: know what
a rule means (KBS and AS semantics live with the callers), read files, or log.

rego-cpp bakes the base documents (``data``) into a compiled bundle; ``data`` added to a running
interpreter is invisible to a bundle. So each distinct ``data`` document gets its own bundle,
built on first use and kept in a bounded LRU cache keyed by the document's canonical JSON. A
repeated (policy, data) pair evaluates from its bundle (about 0.1 ms, most of it rego-cpp
reading the input) instead of re-parsing the policy text (about 2 ms).

A policy compiled with ``request_data`` reads those per-call keys from input instead
(``keybroker.policy.request_data``), so it has one bundle whatever the requests. The text
checks and the questions asked live in ``keybroker.policy.prepared``; in the servers this
class runs only inside policy worker processes (``keybroker.policy.workers``), since an
evaluation can neither be interrupted nor bounded in memory here.

All bundles of a policy run on one interpreter: an interpreter that has run a query holds about
0.5 MiB, a bundle about 36 KiB, so one interpreter per cached bundle would cost ~0.5 GiB at 1024
entries. Queries are serialised by the policy's lock anyway.

What rego-cpp does, measured with regopy 1.5.2, and what this module does about it:

- A syntax error raises ``RegoError`` from ``add_module``; a missing ``package`` is accepted
  silently and a wrong package only makes every entrypoint undefined. Both are refused here.
- ``build`` does not resolve functions: a call to an undefined function, an unsafe variable or
  a recursive rule surfaces only on evaluation, as an error tree in an output flagged *ok*.
  ``compile`` evaluates every entrypoint (and the whole package) once with empty ``input`` and
  ``data`` to refuse what that reaches; an error behind a guard the probe does not pass still
  surfaces later, as ``PolicyEvaluationError``.
- ``Interpreter.set_input`` with Python values stores strings unescaped (``"a\\"b"`` then never
  equals the literal, and the output is not JSON) and turns integers beyond 64 bits into 0;
  ``add_data`` escapes non-ASCII, which then never equals a UTF-8 literal. Documents are
  therefore passed as UTF-8 JSON text (``set_input_term``, ``add_data_json``).
- Querying a bundle that failed to build crashes the process; ``Bundle.ok()`` is checked first.
- Conflicting rule values give a failed output with no detail at all.
- ``data`` reaching into a policy's own package overrides its rules; such data is refused.
- Not fixable here: string built-ins see a string's JSON-escaped form, in input, data and
  literals alike (``count("a\nb")`` is 4, ``crypto.sha256`` hashes the escapes). Comparisons
  are right; policies hashing or counting strings with escapes are not.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import regopy
from regopy import rego_shared

from keybroker.errors import PolicyEvaluationError, PolicyParseError
from keybroker.policy.prepared import (
    EMPTY_DOCUMENT,
    AnswerMemory,
    PolicySpec,
    PreparedPolicy,
    to_json,
)
from keybroker.protocol.models import JsonValue

__all__ = [
    "AnswerMemory",
    "CacheInfo",
    "CompiledPolicy",
    "JsonValue",
    "PolicySpec",
    "PreparedPolicy",
]

_MAX_DETAIL = 800
_EMPTY_DOCUMENT = EMPTY_DOCUMENT
_to_json = to_json


class CacheInfo(NamedTuple):
    """Bundle cache statistics, shaped like ``functools.lru_cache``'s."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class CompiledPolicy:
    """One Rego module (plus optional helper modules), checked and ready to evaluate.

    Thread-safe: regopy objects are not, so one lock guards this policy's bundles and the
    interpreter that runs them. Build it with ``compile``.
    """

    def __init__(self, prepared: PreparedPolicy) -> None:
        self._prepared = prepared
        self._modules = dict(prepared.modules)
        self._packages = prepared.packages
        self._entrypoints = prepared.entrypoints
        self._cache_size = prepared.spec.cache_size
        self._bundles: OrderedDict[str, Any] = OrderedDict()  # canonical data JSON -> Bundle
        # answers remembered by (entrypoints, input, data), when the policy is deterministic
        self._answers = AnswerMemory(prepared.spec.remember if prepared.deterministic else 0)
        self._runner = _new_interpreter()
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @classmethod
    def compile(
        cls,
        source: str,
        *,
        entrypoints: Sequence[str],
        name: str = "policy.rego",
        cache_size: int = 1024,
        helpers: Mapping[str, str] | None = None,
        remember: int = 0,
        request_data: Collection[str] = (),
    ) -> CompiledPolicy:
        """Parse and check ``source``; raise ``PolicyParseError`` with rego-cpp's message.

        ``entrypoints`` are in regopy's form (``"policy/allow"`` for ``data.policy.allow``).
        ``helpers`` are extra modules (file name -> Rego) compiled alongside ``source``.
        ``remember``: how many answers to keep, per entrypoints, input and data, for a caller
        that asks the same question again (a guest fetching with the same token). Nothing is
        remembered when a module calls a built-in whose answer can change between two calls
        (``time.*``, ``rand.*``, ``uuid.*``, ``http.*``, ``opa.*``, ``net.*``, ``io.jwt.*``,
        whose checks read the clock; found anywhere in the text, comments included, where a
        false alarm only costs the memory). Remembered answers are shared: do not mutate them.
        ``request_data``: the top-level ``data`` keys that change from call to call (a request's
        query string); when the modules can be rewritten to read them from input
        (``keybroker.policy.request_data``), a new value costs no new bundle, and ``data``
        given to ``evaluate`` may hold only those keys.
        """
        spec = PolicySpec(
            source=source,
            entrypoints=tuple(entrypoints),
            name=name,
            helpers=tuple((helpers or {}).items()),
            remember=remember,
            request_data=tuple(request_data),
            cache_size=cache_size,
        )
        return cls.from_spec(spec)

    @classmethod
    def from_spec(cls, spec: PolicySpec) -> CompiledPolicy:
        """``compile`` with its arguments gathered in a ``PolicySpec``."""
        modules = spec.modules()
        _loaded_interpreter(modules, _EMPTY_DOCUMENT, PolicyParseError)  # syntax errors first
        policy = cls(PreparedPolicy.of(spec))
        policy._check()
        return policy

    @property
    def source(self) -> str:
        return self._prepared.spec.source

    @property
    def package(self) -> str:
        """The package ``source`` declares, e.g. ``"policy"``."""
        return self._prepared.package

    @property
    def input_paths(self) -> list[str] | None:
        """The parts of input the policy can read, one per line; None when it may read all."""
        paths = self._prepared.input_paths
        return None if paths is None else paths.describe()

    @property
    def remembers(self) -> bool:
        """Whether answers are remembered (asked for, and the policy is deterministic)."""
        return self._answers.size > 0

    def remembered(self) -> int:
        return len(self._answers)

    @property
    def request_data_in_input(self) -> bool:
        """Whether per-call data reaches rego-cpp through input (one bundle for all calls)."""
        return self._prepared.request_keys is not None

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._cache_size, len(self._bundles))

    def evaluate(
        self, entrypoint: str, input: JsonValue, data: JsonValue | None = None
    ) -> JsonValue | None:
        """The entrypoint's value; None when the rule is undefined (or its value is null)."""
        return self.evaluate_many([entrypoint], input, data)[0]

    def evaluate_many(
        self, entrypoints: Sequence[str], input: JsonValue, data: JsonValue | None = None
    ) -> list[JsonValue | None]:
        """The values of several entrypoints on one input: the input is handed to rego-cpp
        once (that costs as much as a query)."""
        input_json, document = self._prepared.question(entrypoints, input, data)
        return self.evaluate_question(entrypoints, input_json, document)

    def evaluate_question(
        self, entrypoints: Sequence[str], input_json: str, document: str
    ) -> list[JsonValue | None]:
        """``evaluate_many`` on a question already put by ``PreparedPolicy.question`` (the
        server puts it; a policy worker answers it)."""
        unknown = sorted(set(entrypoints) - self._entrypoints)
        if unknown:
            raise ValueError(f"entrypoint {unknown[0]!r} was not compiled")
        key = self._answers.key(entrypoints, input_json, document)
        known = self._answers.get(key)
        if known is not None:
            return known
        with self._lock:
            bundle = self._bundle_for(document)
            self._set_input(input_json)
            results = [self._run_entrypoint(bundle, e) for e in entrypoints]
        answers = [self._value(ok, text) for ok, text in results]
        self._answers.put(key, answers)
        return answers

    def explain(self, input: JsonValue, data: JsonValue | None = None) -> dict[str, JsonValue]:
        """Every rule of the package with its value for this input (undefined rules absent).

        The slow path (text query, nothing cached), for operators asking why a decision came
        out as it did.
        """
        input, data = self._prepared.moved(input, data)
        interpreter = self._interpreter(self._prepared.data_json(data), PolicyEvaluationError)
        try:
            interpreter.set_input_term(_to_json(input, "input"))
        except regopy.RegoError as e:
            raise PolicyEvaluationError(f"rego-cpp refused the input: {_rego_text(e)}") from None
        ok, text = _run(
            lambda impl: rego_shared.rego_query(impl, f"data.{self.package}"), interpreter
        )
        value = self._value(ok, text)
        return value if isinstance(value, dict) else {}

    # --- compile-time checks --------------------------------------------------------------

    def _check(self) -> None:
        """Build with empty data and evaluate everything once, refusing what fails.

        ``build`` only parses; rego-cpp reports undefined functions, unsafe variables and
        recursion when a rule is evaluated. Refusing them here keeps a broken policy from
        being stored and then failing every request.
        """
        try:
            bundle = self._build(_EMPTY_DOCUMENT, PolicyParseError)
            for entrypoint in sorted(self._entrypoints):
                probe = _to_json(self._prepared.moved({}, None)[0], "input")
                self._probe(*self._query(bundle, entrypoint, probe))
            interpreter = self._interpreter(_EMPTY_DOCUMENT, PolicyParseError)
            interpreter.set_input_term(_to_json(self._prepared.moved({}, None)[0], "input"))
            for package in sorted(set(self._packages)):
                query = f"data.{package}"
                self._probe(
                    *_run(lambda impl, q=query: rego_shared.rego_query(impl, q), interpreter)
                )
        except (PolicyEvaluationError, regopy.RegoError) as e:  # rego-cpp failing oddly
            detail = e.detail if isinstance(e, PolicyEvaluationError) else _rego_text(e)
            raise PolicyParseError(f"policy does not compile: {detail[:_MAX_DETAIL]}") from None
        self._bundles[_EMPTY_DOCUMENT] = bundle  # evaluations without data reuse it

    def _probe(self, ok: bool, text: str) -> None:
        self._value(
            ok,
            text,
            failure="policy does not compile: it fails on empty input and data",
            error=PolicyParseError,
        )

    # --- evaluation -----------------------------------------------------------------------

    def _query(self, bundle: Any, entrypoint: str, input_json: str) -> tuple[bool, str]:
        """Run one entrypoint of ``bundle`` on the shared interpreter. Caller holds the lock."""
        self._set_input(input_json)
        return self._run_entrypoint(bundle, entrypoint)

    def _set_input(self, input_json: str) -> None:
        try:
            self._runner.set_input_term(input_json)
        except regopy.RegoError as e:
            raise PolicyEvaluationError(f"rego-cpp refused the input: {_rego_text(e)}") from None

    def _run_entrypoint(self, bundle: Any, entrypoint: str) -> tuple[bool, str]:
        return _run(
            lambda impl: rego_shared.rego_bundle_query_entrypoint(impl, bundle._impl, entrypoint),
            self._runner,
        )

    def _bundle_for(self, document: str) -> Any:
        """The cached bundle for this data document, built on a miss. Caller holds the lock."""
        bundle = self._bundles.get(document)
        if bundle is not None:
            self._hits += 1
            self._bundles.move_to_end(document)
            return bundle
        self._misses += 1
        # Built under the lock: a build costs about as much as one evaluation from text, and
        # two threads missing on the same document must not both build it.
        bundle = self._build(document, PolicyEvaluationError)
        self._bundles[document] = bundle
        while len(self._bundles) > self._cache_size:
            self._bundles.popitem(last=False)
        return bundle

    def _build(self, document: str, error: type[PolicyEvaluationError | PolicyParseError]) -> Any:
        builder = self._interpreter(document, error)
        try:
            bundle = builder.build(None, sorted(self._entrypoints))
        except regopy.RegoError as e:
            raise error(
                f"rego-cpp could not build the policy: {self._describe(_rego_text(e))}"
            ) from None
        if not bundle.ok():  # never query it: rego-cpp crashes on a failed bundle
            raise error("rego-cpp could not build the policy for this data document")
        return bundle

    def _interpreter(
        self, document: str, error: type[PolicyEvaluationError | PolicyParseError]
    ) -> Any:
        return _loaded_interpreter(self._modules, document, error)

    def _value(
        self,
        ok: bool,
        text: str,
        *,
        failure: str = "policy evaluation failed",
        error: type[PolicyEvaluationError | PolicyParseError] = PolicyEvaluationError,
    ) -> JsonValue | None:
        """The first expression of a query's output, None when undefined."""
        if not ok:
            raise error(
                f"{failure}: rego-cpp reported an error without detail "
                "(conflicting values for one rule give this)"
            )
        if text == "undefined":
            return None
        try:
            # strict=False: rego-cpp may emit raw control characters inside strings
            document = json.loads(text, strict=False)
        except ValueError:
            raise error(f"{failure}: {self._describe(text)}") from None
        results = document if isinstance(document, list) else [document]
        if not results or not isinstance(results[0], dict):
            return None
        expressions = results[0].get("expressions")
        if not isinstance(expressions, list) or not expressions:
            return None
        value: JsonValue = expressions[0]
        return value

    def _describe(self, text: str) -> str:
        return _describe_errors(text, self._modules)


# --- helpers ------------------------------------------------------------------------------


def _new_interpreter() -> Any:
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE  # otherwise rego-cpp prints errors to stdout
    return interpreter


def _loaded_interpreter(
    modules: Mapping[str, str],
    document: str,
    error: type[PolicyEvaluationError | PolicyParseError],
) -> Any:
    """A fresh interpreter holding ``document`` as data and every module."""
    interpreter = _new_interpreter()
    try:
        if document != _EMPTY_DOCUMENT:
            interpreter.add_data_json(document)
    except regopy.RegoError as e:
        raise PolicyEvaluationError(f"rego-cpp refused the data: {_rego_text(e)}") from None
    for module_name, module_source in modules.items():
        try:
            interpreter.add_module(module_name, module_source)
        except regopy.RegoError as e:
            detail = _describe_errors(_rego_text(e), modules)
            raise error(f"policy does not compile: {detail}") from None
    return interpreter


def _run(query: Any, interpreter: Any) -> tuple[bool, str]:
    """Run a query and read its raw output.

    regopy's ``Output`` json-parses the text in its constructor, so an evaluation error
    (reported as an error tree in an output flagged ok) would be lost as a JSONDecodeError;
    the C API functions of ``regopy.rego_shared`` keep the text.
    """
    try:
        impl = query(interpreter._impl)
    except regopy.RegoError as e:
        raise PolicyEvaluationError(f"policy evaluation failed: {_rego_text(e)}") from None
    try:
        return bool(rego_shared.rego_output_ok(impl)), str(rego_shared.rego_output_string(impl))
    finally:
        rego_shared.rego_free_output(impl)


def _rego_text(error: regopy.RegoError) -> str:
    return str(error.args[0]) if error.args else ""


_ERROR = re.compile(rb"\(error(?: (\d+):|(?=\s))")
_LOCATION = re.compile(rb"\|(\d+)\|(\d+)")
_MESSAGE = re.compile(rb"\(errormsg (\d+):")


def _describe_errors(text: str, modules: Mapping[str, str]) -> str:
    """rego-cpp's error tree as ``file:line:col: message; ...``, without source or input.

    The tree is ``(error <n>:<file>|<offset>|<len> (errormsg <n>:<message>) (errorast ...))``,
    each string prefixed by its length in bytes.
    """
    raw = text.encode("utf-8")
    found: list[str] = []
    for error in _ERROR.finditer(raw):
        location = ""
        cursor = error.end()
        if error.group(1) is not None:
            file_end = cursor + int(error.group(1))
            file_name = raw[cursor:file_end].decode("utf-8", "replace")
            span = _LOCATION.match(raw, file_end)
            if span is not None:
                location = _position(file_name, int(span.group(1)), modules) + ": "
                cursor = span.end()
        message = _MESSAGE.search(raw, cursor)
        if message is None:
            continue
        body = raw[message.end() : message.end() + int(message.group(1))]
        entry = location + body.decode("utf-8", "replace")
        if entry not in found:
            found.append(entry)
    detail = "; ".join(found) if found else "rego-cpp gave no error message"
    return detail[:_MAX_DETAIL]


def _position(file_name: str, offset: int, modules: Mapping[str, str]) -> str:
    source = modules.get(file_name)
    if source is None:
        return file_name
    before = source.encode("utf-8")[:offset]
    line = before.count(b"\n") + 1
    column = len(before) - (before.rfind(b"\n") + 1) + 1
    return f"{file_name}:{line}:{column}"

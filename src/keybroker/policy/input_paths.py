"""Which parts of ``input`` a Rego policy can read, found from its text; and the projection
of an input onto them.

rego-cpp spends about 5 µs on each key and value of the input it is handed, whether or not a
rule reads it: an EAR token's claims cost about 0.3 ms, a TDX quote's claims with an event
log several times that. Most policies read a handful of fields. Handing rego-cpp only those
makes evaluation cheaper, and it lets remembered answers (``CompiledPolicy(remember=...)``)
be reused across guests that differ only in what the policy never looks at (nonces, keys).

Does: scan the modules' tokens for every reference to ``input`` and record the path each one
follows while its steps are literal (``input.a["b"]``) or iterate (``input.a[_]``, ``[k]``,
``[0]``), and how the value at its end is used:

- ``count(<ref>)``: only the keys or elements are needed, not what they hold;
- ``some v in <ref>`` / ``every k, v in <ref>``: ``v`` stands for each element, and its own
  references are followed in turn (anywhere in the modules: a name reused for something else
  only keeps more);
- anything else (a comparison, a function argument, ``x := <ref>``): the whole value.

Refuses (``InputPaths.of`` returns None, meaning "hand over all of input") when it cannot be
sure it saw every read: ``input`` used whole (``walk(input)``, ``x := input``), ``with``
(which replaces input inside a rule), ``import input``, and template strings (``$"..."``),
whose ``{...}`` parts are expressions.

The projection is sound by construction: every value a reference can reach is kept, whole
where the policy may look at all of it; an object keeps only the keys some reference names,
which only a whole-value use could notice. Keeping more than needed is always safe, so when
in doubt the scanner keeps more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from keybroker.protocol.models import JsonValue

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<template>\$["`])
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    spaced: bool  # whitespace or a comment comes before it
    line_start: bool  # first on its line, outside any bracket: where a rule head starts


_OPENING, _CLOSING = frozenset("([{"), frozenset(")]}")


def _tokens(source: str) -> list[_Token] | None:
    """The tokens of ``source``; None when it holds something the scanner does not follow."""
    tokens: list[_Token] = []
    spaced, new_line, depth = True, True, 0
    for match in TOKEN.finditer(source):
        kind, text = match.lastgroup or "punct", match.group()
        if kind == "template" or (kind == "punct" and text in '"`'):  # or unterminated
            return None
        if kind in ("space", "comment"):
            spaced = True
            new_line = new_line or "\n" in text or kind == "comment"
            continue
        tokens.append(_Token(kind, text, spaced, new_line and depth == 0))
        depth += (text in _OPENING) - (text in _CLOSING) if kind == "punct" else 0
        spaced = new_line = False
    return tokens


@dataclass
class _Node:
    """What is read below one point of the input."""

    whole: bool = False
    keys: dict[str, _Node] = field(default_factory=dict)
    each: _Node | None = None  # every member, whatever its key or index

    def key(self, name: str) -> _Node:
        return self.keys.setdefault(name, _Node())

    def every(self) -> _Node:
        if self.each is None:
            self.each = _Node()
        return self.each

    def describe(self, prefix: str) -> list[str]:
        if self.whole:
            return [prefix]
        lines: list[str] = []
        for name in sorted(self.keys):
            lines += self.keys[name].describe(f"{prefix}[{json.dumps(name)}]")
        if self.each is not None:
            lines += self.each.describe(f"{prefix}[_]") or [f"{prefix}[_] (present)"]
        return lines


class _UnboundedReadError(Exception):
    """The modules read input in a way the scanner does not follow."""


class InputPaths:
    """The parts of ``input`` some modules can read. Build with ``of``."""

    def __init__(self, root: _Node) -> None:
        self._root = root

    @classmethod
    def of(cls, modules: Iterable[str]) -> InputPaths | None:
        """The paths read by ``modules`` together; None when all of input may be read."""
        root = _Node()
        streams: list[list[_Token]] = []
        for source in modules:
            tokens = _tokens(source)
            if tokens is None:
                return None
            streams.append(tokens)
        try:
            _Scanner(streams, root).run()
        except _UnboundedReadError:
            return None
        return None if root.whole else cls(root)

    def describe(self) -> list[str]:
        """One line per path read, ``input["a"][_]["b"]`` style (for docs and tests)."""
        return self._root.describe("input")

    def project(self, value: JsonValue) -> JsonValue:
        """``value`` with only what the modules can read."""
        return _project(value, self._root)


def _project(value: JsonValue, node: _Node) -> JsonValue:
    if node.whole:
        return value
    if isinstance(value, Mapping):
        kept: dict[str, JsonValue] = {}
        for name, member in value.items():
            literal = node.keys.get(name)
            if literal is not None and node.each is not None:
                kept[name] = _project(member, _union(literal, node.each))
            elif literal is not None:
                kept[name] = _project(member, literal)
            elif node.each is not None:
                kept[name] = _project(member, node.each)
        return kept
    if isinstance(value, list) and node.each is not None:
        return [_project(member, node.each) for member in value]
    return value  # a scalar, or a list only named by keys (undefined in Rego): kept as is


def _union(first: _Node, second: _Node) -> _Node:
    """What either node reads: a member named literally and also reached by iteration."""
    if first.whole or second.whole:
        return _Node(whole=True)
    merged = _Node()
    for name in first.keys.keys() | second.keys.keys():
        merged.keys[name] = _union(first.keys.get(name, _Node()), second.keys.get(name, _Node()))
    if first.each is not None or second.each is not None:
        merged.each = _union(first.each or _Node(), second.each or _Node())
    return merged


_ITERATORS = frozenset({"some", "every"})


class _Scanner:
    def __init__(self, streams: list[list[_Token]], root: _Node) -> None:
        self._streams = streams
        self._root = root
        self._aliases: dict[str, list[_Node]] = {}
        self._bindings: set[tuple[int, int]] = set()  # (stream, index) of an alias being bound
        # rego-cpp lets a module define its own `count`, which may read anything
        self._count_is_builtin = not any(
            t.line_start and t.text == "count" for tokens in streams for t in tokens
        )

    def run(self) -> None:
        self._refuse_what_replaces_input()
        for number, tokens in enumerate(self._streams):
            for index in range(len(tokens)):
                if _is_reference_start(tokens, index, "input"):
                    self._reference(number, index, [self._root])
        self._follow_aliases()

    def _refuse_what_replaces_input(self) -> None:
        """``with`` (anywhere: a false alarm only costs speed) and ``import input``."""
        for tokens in self._streams:
            for index, token in enumerate(tokens):
                if token.kind != "ident":
                    continue
                following = tokens[index + 1].text if index + 1 < len(tokens) else ""
                if token.text == "with" or (token.text == "import" and following == "input"):
                    raise _UnboundedReadError

    def _follow_aliases(self) -> None:
        """Resolve every occurrence of every alias against every node it may stand for, until
        no new alias appears (an alias iterating over another alias)."""
        resolved: dict[str, int] = {}
        while any(len(nodes) != resolved.get(name) for name, nodes in self._aliases.items()):
            for name, nodes in list(self._aliases.items()):
                fresh = nodes[resolved.get(name, 0) :]
                resolved[name] = len(nodes)
                if not fresh:
                    continue
                for number, tokens in enumerate(self._streams):
                    for index in range(len(tokens)):
                        if (number, index) in self._bindings:
                            continue
                        if _is_reference_start(tokens, index, name):
                            self._reference(number, index, fresh)

    def _reference(self, number: int, start: int, nodes: list[_Node]) -> None:
        """Follow one reference from ``start`` and record how its value is used."""
        tokens = self._streams[number]
        current, end = _steps(tokens, start + 1, nodes)
        if self._counted(tokens, start, end):
            for node in current:
                node.every()
        elif not self._iterated(number, tokens, start, end, current):
            for node in current:
                node.whole = True

    def _counted(self, tokens: list[_Token], start: int, end: int) -> bool:
        """``count(<ref>)``: the number of members matters, not their values."""
        return (
            self._count_is_builtin
            and start >= 2
            and tokens[start - 1].text == "("
            and not tokens[start].spaced
            and tokens[start - 2].text == "count"
            and not tokens[start - 1].spaced
            and (start < 3 or tokens[start - 3].text != ".")
            and end < len(tokens)
            and tokens[end].text == ")"
        )

    def _iterated(
        self, number: int, tokens: list[_Token], start: int, end: int, nodes: list[_Node]
    ) -> bool:
        """``some [k,] v in <ref>`` or ``every [k,] v in <ref>``: ``v`` is each member."""
        if start < 3 or tokens[start - 1].text != "in" or tokens[start - 2].kind != "ident":
            return False
        if end < len(tokens) and not _ends_domain(tokens[end]):
            return False
        value = start - 2
        first = value
        if value >= 3 and tokens[value - 1].text == "," and tokens[value - 2].kind == "ident":
            first = value - 2
        if first < 1 or tokens[first - 1].text not in _ITERATORS:
            return False
        name = tokens[value].text
        members = [node.every() for node in nodes]
        if name != "_":
            self._aliases.setdefault(name, []).extend(members)
            self._bindings.add((number, value))
        return True


def _steps(tokens: list[_Token], index: int, nodes: list[_Node]) -> tuple[list[_Node], int]:
    """Follow ``.name``, ``["name"]`` and ``[var]`` steps written without spaces; return the
    nodes reached and the index of the first token after the reference."""
    current = list(nodes)
    while index < len(tokens) and not tokens[index].spaced:
        step = tokens[index]
        if step.text == "." and _at(tokens, index + 1, "ident", adjacent=True):
            name = tokens[index + 1].text
            current = [n.key(name) for n in current]
            index += 2
            continue
        if step.text != "[" or not _at(tokens, index + 2, "punct", "]"):
            break
        inner = tokens[index + 1]
        if inner.kind == "string":
            try:
                name = json.loads(inner.text)
            except ValueError:  # an escape JSON does not know: the value is kept whole
                break
            current = [n.key(name) for n in current]
        elif inner.kind == "raw":
            current = [n.key(inner.text[1:-1]) for n in current]
        elif inner.kind in ("ident", "number"):
            current = [n.every() for n in current]
        else:
            break
        index += 3
    return current, index


def _ends_domain(token: _Token) -> bool:
    return token.text in ("{", "}", ";", ")", "]", "|") or token.spaced


def _at(
    tokens: list[_Token], index: int, kind: str, text: str | None = None, *, adjacent: bool = False
) -> bool:
    if index >= len(tokens):
        return False
    token = tokens[index]
    if adjacent and token.spaced:
        return False
    return token.kind == kind and (text is None or token.text == text)


def _is_reference_start(tokens: list[_Token], index: int, name: str) -> bool:
    """``name`` as a variable or root, not as a field (``x.input``) or part of a longer name."""
    token = tokens[index]
    if token.kind != "ident" or token.text != name:
        return False
    return not (index > 0 and tokens[index - 1].text == "." and not token.spaced)

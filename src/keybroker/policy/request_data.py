"""Per-call ``data`` keys moved into ``input``, so a new value costs no compilation.

rego-cpp bakes ``data`` into a compiled bundle: a resource policy reading ``data.query`` would
need a new bundle (tens of milliseconds) for every distinct query string a guest sends. Instead
the modules are rewritten so that a reference to ``input`` reads ``input.input`` and a
reference to one of the per-call keys (``data.query``, ``data["resource-path"]``) reads
``input.data``; the engine then hands rego-cpp ``{"input": <input>, "data": <per-call data>}``
and one bundle serves every request. Policy authors keep writing ``data.query``.

Does not: rewrite what it cannot follow. ``rewrite`` returns None (the caller then keeps one
bundle per data document) for a module using ``with`` (rego-cpp aborts on ``with data.x``),
``import input`` or ``import data``, template strings, ``data`` used whole or with a computed
key, or a per-call key that is also a package root. Rewritten modules have longer lines, so a
column in an error message can be a few characters off the author's text.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from keybroker.policy.input_paths import TOKEN

INPUT_KEY = "input"
DATA_KEY = "data"
_SKIPPED = ("space", "comment")


def rewrite(
    modules: Mapping[str, str], keys: Collection[str], roots: Collection[str]
) -> dict[str, str] | None:
    """``modules`` reading per-call ``keys`` from input (see the module docstring), or None."""
    if set(keys) & set(roots):
        return None
    rewritten: dict[str, str] = {}
    for name, source in modules.items():
        text = _rewrite_module(source, frozenset(keys), frozenset(roots))
        if text is None:
            return None
        rewritten[name] = text
    return rewritten


def _rewrite_module(source: str, keys: frozenset[str], roots: frozenset[str]) -> str | None:
    tokens: list[tuple[str, str, int, bool]] = []  # kind, text, offset, whitespace before
    spaced = True
    for match in TOKEN.finditer(source):
        kind, text = match.lastgroup or "punct", match.group()
        if kind == "template" or (kind == "punct" and text in '"`'):
            return None
        if kind in _SKIPPED:
            spaced = True
            continue
        tokens.append((kind, text, match.start(), spaced))
        spaced = False
    edits: list[tuple[int, str]] = []  # offset of a `data` or `input` token, replacement
    for index, (kind, text, offset, _) in enumerate(tokens):
        if kind != "ident":
            continue
        if text == "with" or (text == "import" and _text(tokens, index + 1) in ("input", "data")):
            return None
        if text not in ("input", "data") or _text(tokens, index - 1) == ".":
            continue  # a field named like a root (`x.input`), not a reference
        if text == "input":
            edits.append((offset, f"input.{INPUT_KEY}"))
            continue
        key = _first_step(tokens, index)
        if key in keys:
            edits.append((offset, f"input.{DATA_KEY}"))
        elif key not in roots:  # `data` whole, a computed key, or a key never provided
            return None
    for offset, replacement in sorted(edits, reverse=True):
        length = len("input") if source.startswith("input", offset) else len("data")
        source = source[:offset] + replacement + source[offset + length :]
    return source


def _text(tokens: list[tuple[str, str, int, bool]], index: int) -> str | None:
    return tokens[index][1] if 0 <= index < len(tokens) else None


def _first_step(tokens: list[tuple[str, str, int, bool]], index: int) -> str | None:
    """The key ``data`` at ``index`` is followed by (``.key``, ``["key"]``), or None."""
    following = tokens[index + 1 : index + 4]
    if len(following) >= 2 and following[0][1] == "." and following[1][0] == "ident":
        return following[1][1]
    if len(following) == 3 and following[0][1] == "[" and not following[0][3]:
        kind, text, _, _ = following[1]
        if following[2][1] != "]":
            return None
        if kind == "raw":
            return text[1:-1]
        if kind == "string":
            try:
                value = json.loads(text)
            except ValueError:
                return None
            return value if isinstance(value, str) else None
    return None

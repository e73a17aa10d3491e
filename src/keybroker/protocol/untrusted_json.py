"""Parsing JSON and TOML documents that come from outside (guests, attestation clients, admins,
identity providers) with a bound on their nesting depth.

Python's parsers recurse once per level: a few hundred kilobytes of ``[`` exhaust the
interpreter's stack and raise ``RecursionError``, which no handler expects (a 500, and no audit
record). A document that parses but is nested a few hundred levels deep breaks the next
recursive walk instead (canonical JSON, policy input, the audit record). Every untrusted
document therefore goes through these functions: they answer :class:`BadRequestError` for
malformed text and for more than :data:`MAX_DEPTH` levels of arrays and objects (tables).

Bodies parsed by pydantic (``model_validate_json``) are bounded by pydantic itself (200 levels).
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

import yaml

from keybroker.errors import BadRequestError
from keybroker.protocol.models import JsonValue

# Evidence, init-data and policies nest a handful of levels; 64 leaves room to spare.
MAX_DEPTH = 64


def parse_json(text: str | bytes, *, what: str, max_depth: int = MAX_DEPTH) -> JsonValue:
    """The JSON value of ``text``; ``what`` names the document in the error message."""
    try:
        value: JsonValue = json.loads(text)
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequestError(f"{what} is not valid json: {e}") from None
    check_depth(value, what=what, max_depth=max_depth)
    return value


def parse_json_prefix(text: str, start: int, *, what: str, max_depth: int = MAX_DEPTH) -> JsonValue:
    """The JSON value that begins at ``text[start]``; whatever follows it is ignored."""
    try:
        decoded: tuple[JsonValue, int] = json.JSONDecoder().raw_decode(text, start)
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except json.JSONDecodeError as e:
        raise BadRequestError(f"{what} is not valid json: {e}") from None
    check_depth(decoded[0], what=what, max_depth=max_depth)
    return decoded[0]


def parse_toml(text: str, *, what: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The table of the TOML document ``text``."""
    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except tomllib.TOMLDecodeError as e:
        raise BadRequestError(f"{what} is not valid toml: {e}") from None
    check_depth(value, what=what, max_depth=max_depth)
    return value


def parse_yaml(text: str, *, what: str, max_depth: int = MAX_DEPTH) -> JsonValue:
    """The value of the YAML document ``text`` (PyYAML's safe loader: no object construction).

    Anchors and aliases are refused: a handful of them nests shared references into a structure
    whose walk (the depth check, pydantic) takes exponential time ("billion laughs"), and
    upstream's files never use them.
    """

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, "YAML aliases are not accepted", event.start_mark
                )
            return super().compose_node(parent, index)

    try:
        # Safe-loader scalars beyond JSON's (dates) reach the checking parser, as before.
        value: JsonValue = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise _too_deep(what, max_depth) from None
    except yaml.YAMLError as e:
        raise BadRequestError(f"{what} is not valid yaml: {e}") from None
    check_depth(value, what=what, max_depth=max_depth)
    return value


def check_depth(value: object, *, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse ``value`` if its arrays and objects nest more than ``max_depth`` levels
    (iterative: the check itself never recurses)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise _too_deep(what, max_depth)
        stack.extend((child, depth + 1) for child in children)


def _too_deep(what: str, max_depth: int) -> BadRequestError:
    return BadRequestError(f"{what} is nested more than {max_depth} levels deep")

"""Reading into JSON in tests: each step checks the shape it expects, so a reply of the wrong
shape fails the test with its value shown, and mypy sees the narrowed type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keybroker.protocol.models import JsonValue


def obj(value: JsonValue) -> Mapping[str, JsonValue]:
    """``value``, which must be a JSON object."""
    assert isinstance(value, Mapping), f"expected a JSON object, found {value!r:.200}"
    return value


def arr(value: JsonValue) -> Sequence[JsonValue]:
    """``value``, which must be a JSON array."""
    assert isinstance(value, list | tuple), f"expected a JSON array, found {value!r:.200}"
    return value


def objs(value: JsonValue) -> list[Mapping[str, JsonValue]]:
    """``value``, which must be a JSON array of objects."""
    return [obj(item) for item in arr(value)]


def at(value: JsonValue, *path: str | int) -> JsonValue:
    """The value at ``path`` (member names and array indices) inside ``value``."""
    for step in path:
        value = arr(value)[step] if isinstance(step, int) else obj(value)[step]
    return value


def integer(value: JsonValue) -> int:
    """``value``, which must be a JSON integer (not a boolean)."""
    assert type(value) is int, f"expected a JSON integer, found {value!r:.200}"
    return value


def string(value: JsonValue) -> str:
    """``value``, which must be a JSON string."""
    assert isinstance(value, str), f"expected a JSON string, found {value!r:.200}"
    return value


def mutable_obj(value: JsonValue) -> dict[str, JsonValue]:
    """``value``, which must be a JSON object parsed or built as a dict, for a test to edit."""
    assert isinstance(value, dict), f"expected a JSON object (dict), found {value!r:.200}"
    return value


def mutable_arr(value: JsonValue) -> list[JsonValue]:
    """``value``, which must be a JSON array parsed or built as a list, for a test to edit."""
    assert isinstance(value, list), f"expected a JSON array (list), found {value!r:.200}"
    return value
